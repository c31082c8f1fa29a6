"""Model loading, LoRA recipes and adapter get/set, on the tiny checkpoint loaded via from_pretrained."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from flora.errors import ConfigError, ProtocolError, RejectReason
from flora.modeling import scoring
from flora.modeling.adapter import attach_lora, get_adapter_state, save_adapter_dir, set_adapter_state
from flora.modeling.loading import load_clip
from flora.modeling.recipes import get_recipe


def test_tiny_checkpoint_loads_through_from_pretrained(tiny_model_dir):
    clip = load_clip(tiny_model_dir)
    assert type(clip.model).__name__ == "CLIPModel"
    ids = clip.tokenizer(["a photo of the digit 7."])["input_ids"][0]
    assert ids[0] == clip.tokenizer.bos_token_id and ids[-1] == clip.tokenizer.eos_token_id
    assert clip.model.config.text_config.eos_token_id == clip.tokenizer.eos_token_id


def test_paper_recipe_targets_only_text_out_proj(tiny_model_dir):
    model = attach_lora(load_clip(tiny_model_dir).model, get_recipe("paper"))
    names = list(get_adapter_state(model))
    layers = model.base_model.model.config.text_config.num_hidden_layers
    assert len(names) == 2 * layers  # lora_A and lora_B per text layer
    assert all("text_model" in n and "out_proj" in n for n in names)
    a = get_adapter_state(model)[names[0]]
    assert a.shape[0] == 2  # rank 2


def test_unknown_recipe_and_missing_checkpoint_are_clear(tmp_path):
    with pytest.raises(ConfigError, match="choose one of"):
        get_recipe("huge")
    with pytest.raises(ConfigError, match="cannot load checkpoint"):
        load_clip(tmp_path / "no-model-here")


def test_same_seed_gives_same_initial_adapter(tiny_model_dir):
    a = get_adapter_state(attach_lora(load_clip(tiny_model_dir).model, get_recipe("both-towers"), seed=3))
    b = get_adapter_state(attach_lora(load_clip(tiny_model_dir).model, get_recipe("both-towers"), seed=3))
    c = get_adapter_state(attach_lora(load_clip(tiny_model_dir).model, get_recipe("both-towers"), seed=4))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_adapter_get_set_round_trip_and_checks(tiny_model_dir):
    model = attach_lora(load_clip(tiny_model_dir).model, get_recipe("paper"))
    state = get_adapter_state(model)
    new = {k: torch.randn_like(v) for k, v in state.items()}
    set_adapter_state(model, new)
    assert all(torch.equal(get_adapter_state(model)[k], new[k]) for k in new)
    name = next(iter(new))
    with pytest.raises(ProtocolError) as info:
        set_adapter_state(model, {**new, name: torch.zeros(5, 5)})
    assert info.value.reason is RejectReason.TENSOR_SHAPES
    with pytest.raises(ProtocolError) as info:
        set_adapter_state(model, {k: v for k, v in new.items() if k != name})
    assert info.value.reason is RejectReason.TENSOR_NAMES
    assert all(torch.equal(get_adapter_state(model)[k], new[k]) for k in new)  # nothing half-loaded


@pytest.mark.parametrize(
    ("recipe", "quantization"), [*((name, "none") for name in ("paper", "both-towers", "fedfft", "linear-probe",
    "vision-head", "text-full")), ("paper", "4bit")],
)  # fmt: skip
def test_adapter_state_reads_and_writes_what_peft_itself_does(tiny_model_dir, recipe, quantization):
    """The adapter's tensors are found once and then read and written directly: the same as PEFT's own
    state-dict functions, for every recipe (LoRA factors and whole modules) and on a 4-bit base."""
    from peft import get_peft_model_state_dict

    model = attach_lora(load_clip(tiny_model_dir, quantization=quantization).model, get_recipe(recipe))
    ours, peft_own = get_adapter_state(model), get_peft_model_state_dict(model)
    assert sorted(ours) == sorted(peft_own)
    assert all(torch.equal(ours[k], peft_own[k].float()) for k in ours)
    new = {k: torch.randn_like(v) for k, v in ours.items()}
    set_adapter_state(model, new)
    assert all(torch.equal(get_peft_model_state_dict(model)[k].float(), new[k]) for k in new)
    ours[next(iter(ours))].zero_()  # a copy: changing what was read leaves the model alone
    assert all(torch.equal(get_adapter_state(model)[k], new[k]) for k in new)


def test_adapter_state_follows_a_module_replaced_after_the_first_read(tiny_model_dir):
    """A module swapped in place (as the image path is released and brought back) is read anew, not the
    tensors of the one it replaced."""
    import copy

    model = attach_lora(load_clip(tiny_model_dir).model, get_recipe("both-towers"))
    get_adapter_state(model)  # finds the names
    vision = model.base_model.model.vision_model
    model.base_model.model.vision_model = copy.deepcopy(vision)
    new = {k: torch.randn_like(v) for k, v in get_adapter_state(model).items()}
    set_adapter_state(model, new)
    changed = [k for k in new if "vision_model" in k]
    assert changed
    swapped = dict(model.base_model.model.vision_model.named_parameters())
    old = dict(vision.named_parameters())
    for name in swapped:
        if "lora_" in name:
            peft_name = "base_model.model.vision_model." + name.replace(".default", "")
            assert torch.equal(swapped[name], new[peft_name])
            assert not torch.equal(old[name], new[peft_name])


def test_adapter_dir_loads_with_plain_peft_and_gives_the_toolkits_logits(tiny_model_dir, digits, tmp_path):
    from peft import PeftModel
    from transformers import CLIPModel

    clip = load_clip(tiny_model_dir)
    model = attach_lora(clip.model, get_recipe("both-towers"))
    torch.manual_seed(0)
    set_adapter_state(model, {k: torch.randn_like(v) * 0.1 for k, v in get_adapter_state(model).items()})
    adapter_dir = save_adapter_dir(model, tmp_path / "adapter", base_model=str(tiny_model_dir))
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in adapter_dir.iterdir()}

    prompts = scoring.class_prompts(digits.class_names, "a photo of the digit {label}.")
    from flora.data.datasets import pixel_values

    pixels = pixel_values(clip.image_processor, digits.images[:20])
    text = scoring.tokenize(clip.tokenizer, prompts)
    ours = scoring.zero_shot_logits(model, pixels, text)

    plain = PeftModel.from_pretrained(CLIPModel.from_pretrained(tiny_model_dir), str(adapter_dir)).eval()
    with torch.no_grad():
        theirs = plain(**text, pixel_values=pixels).logits_per_image
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    base_logits = scoring.zero_shot_logits(load_clip(tiny_model_dir).model, pixels, text)
    assert not torch.allclose(base_logits, theirs, atol=1e-3)  # the adapter really changed the model


def test_contrastive_loss_equals_clip_loss_when_prompts_are_distinct():
    torch.manual_seed(0)
    images = torch.nn.functional.normalize(torch.randn(4, 8), dim=-1)
    texts = torch.nn.functional.normalize(torch.randn(4, 8), dim=-1)
    scale = torch.tensor(10.0)
    ours = scoring.contrastive_loss(images, texts, torch.arange(4), scale)
    logits = scale * images @ texts.t()
    clip = (
        torch.nn.functional.cross_entropy(logits, torch.arange(4))
        + torch.nn.functional.cross_entropy(logits.t(), torch.arange(4))
    ) / 2
    torch.testing.assert_close(ours, clip)


def test_contrastive_loss_with_shared_prompts_hand_computed():
    # Two images share prompt 0. Image->text: CE per image; text->image: prompt 0 targets both images equally.
    images = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    texts = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    targets = torch.tensor([0, 0, 1])
    loss = scoring.contrastive_loss(images, texts, targets, torch.tensor(1.0))
    e = np.e
    img = -np.log(e / (e + 1))  # every image: logit 1 for its prompt, 0 for the other
    txt0 = -0.5 * (np.log(e / (2 * e + 1)) * 2)  # prompt 0 over images (1, 1, 0)
    txt1 = -np.log(e / (e + 2))  # prompt 1 over images (0, 0, 1)
    expected = (img + (txt0 + txt1) / 2) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-6)
