"""The paper's non-LoRA baselines (fedfft, linear-probe, vision-head): whole modules trained through PEFT's
modules_to_save, so the update is still "the adapter state" and every path works on it by tensor name and shape.

Each baseline is checked against figures computed here from the base model's own modules, never from the recipe:
what it trains (count and names), that a local round changes exactly those weights, that an update goes through the
coordinator's validation and aggregation into its evaluator, and that the result merges into a plain checkpoint.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from coordinator.config import CoordinatorConfig
from coordinator.evaluation import Evaluator
from coordinator.validation import validate_update
from edge_client.config import ClientConfig
from edge_client.trainer import LocalTrainer, TrainSettings
from export.merge import merge_adapter, read_adapter_config
from export.metadata import recipe_name
from flora.algorithms import make_strategy
from flora.errors import ConfigError, ProtocolError, RejectReason
from flora.modeling.adapter import (
    adapter_parameters,
    attach_lora,
    check_adapter_tensors,
    get_adapter_state,
    lower_rank_of,
    save_adapter_dir,
)
from flora.modeling.loading import load_clip
from flora.modeling.recipes import get_recipe
from flora.protocol import Envelope, adapter_to_body
from flora.protocol.wire_settings import adapter_size_problem

BASELINES = ("fedfft", "linear-probe", "vision-head")
TEMPLATE = "a photo of the digit {label}."


def trained_weights(model, recipe: str) -> set[str]:
    """The base CLIPModel's parameters the baseline should train, by what each baseline means."""
    names = {name for name, _ in model.named_parameters()}
    if recipe == "fedfft":  # everything but the token table and the temperature
        return names - {"text_model.embeddings.token_embedding.weight", "logit_scale"}
    if recipe == "linear-probe":
        return {"visual_projection.weight"}
    assert recipe == "vision-head"
    return {n for n in names if n.startswith(("vision_model.", "visual_projection."))}


def base_parameters(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("recipe", BASELINES)
def test_a_baseline_trains_what_it_says_and_counts_it(tiny_model_dir, recipe):
    base = load_clip(tiny_model_dir).model
    params = dict(base.named_parameters())
    expected = trained_weights(base, recipe)
    count = sum(params[n].numel() for n in expected)
    model = attach_lora(base, get_recipe(recipe))
    state = get_adapter_state(model)
    # The update's tensors are the trained weights under PEFT's names: one per weight, nothing else.
    assert {k.removeprefix("base_model.model.") for k in state} == expected
    assert sum(t.numel() for t in state.values()) == count == adapter_parameters(model)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == count
    assert not any(".lora_" in k for k in state)
    assert get_recipe(recipe).trains_vision_tower and not get_recipe(recipe).has_lora


def test_baseline_sizes_against_the_tiny_models_shapes(tiny_model_dir):
    """The counts above, spelled out from the tiny CLIP's config for the smallest two."""
    config = load_clip(tiny_model_dir).model.config
    vision, projection = config.vision_config.hidden_size, config.projection_dim
    base = load_clip(tiny_model_dir).model
    assert adapter_parameters(attach_lora(base, get_recipe("linear-probe"))) == vision * projection
    vision_tower = sum(p.numel() for p in load_clip(tiny_model_dir).model.vision_model.parameters())
    head = adapter_parameters(attach_lora(load_clip(tiny_model_dir).model, get_recipe("vision-head")))
    assert head == vision_tower + vision * projection


@pytest.mark.parametrize("recipe", BASELINES)
def test_a_round_changes_exactly_the_baselines_weights_and_survives_the_coordinator(
    tiny_model_dir, digits, tmp_path, recipe
):
    data = digits.subset(range(48))
    trainer = LocalTrainer(load_clip(tiny_model_dir), get_recipe(recipe), data, progress=False, max_batch_size=16)
    assert trainer.trains_images and trainer.cache_status == "off"  # image path trains: no embedding cache
    start = {k: v.numpy() for k, v in trainer.adapter_state().items()}
    settings = TrainSettings(learning_rate=1e-2, batch_size=16, prompt_template=TEMPLATE)
    tensors, metrics = trainer.train_round(start, settings, round_=1)
    assert metrics["image_embeddings_cached"] == 0

    # The coordinator's side: the real validation (wire body, names, shapes), FedAvg, and its evaluator.
    body, meta = adapter_to_body({k: v.numpy() for k, v in tensors.items()})
    env = Envelope(
        kind="update", run="r", sender="c1", round=1, data={"num_examples": len(data), "metrics": {}},
        body=body, body_meta=meta,
    )  # fmt: skip
    update = validate_update(
        env, topic_node="c1", run_id="r", round_=1, selected={"c1"}, already=set(), global_tensors=start
    )
    strategy = make_strategy("fedavg")
    strategy.begin(1, start)
    strategy.accumulate(update)
    aggregated = strategy.aggregate()
    assert all(np.allclose(aggregated[k], tensors[k].numpy(), atol=1e-6) for k in start)
    evaluator = Evaluator(load_clip(tiny_model_dir), get_recipe(recipe), data, template=TEMPLATE, seed=0)
    assert evaluator.evaluate(aggregated)["accuracy"] >= 0

    # Merged into a plain checkpoint (export's path), exactly the baseline's weights differ from the base.
    adapter_dir = save_adapter_dir(evaluator.model, tmp_path / "adapter", base_model=str(tiny_model_dir))
    merged = merge_adapter(str(tiny_model_dir), adapter_dir).model
    before, after = base_parameters(load_clip(tiny_model_dir).model), base_parameters(merged)
    assert before.keys() == after.keys()
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    assert changed == trained_weights(merged, recipe)
    assert recipe_name(read_adapter_config(adapter_dir)) == recipe
    # and the merged model computes what the coordinator's unmerged one does
    inputs = evaluator.clip.tokenizer(["a photo of the digit 3."], return_tensors="pt")
    pixels = evaluator.pixels[:4]
    with torch.no_grad():
        want = evaluator.model(**inputs, pixel_values=pixels).logits_per_image
        got = merged(**inputs, pixel_values=pixels).logits_per_image
    assert torch.allclose(want, got, atol=1e-5)


def test_a_wrong_baseline_update_is_refused_by_name_and_shape_never_as_a_lora_rank(tiny_model_dir):
    expected = {k: v.numpy() for k, v in get_adapter_state(
        attach_lora(load_clip(tiny_model_dir).model, get_recipe("vision-head"))).items()}  # fmt: skip
    name = "base_model.model.visual_projection.weight"
    narrower = {**expected, name: expected[name][:, :2]}
    assert lower_rank_of(expected, narrower) is None  # not a LoRA factor: no lower-rank reading of it
    with pytest.raises(ProtocolError) as info:
        check_adapter_tensors(expected, narrower, allow_lower_rank=True)
    assert info.value.reason is RejectReason.TENSOR_SHAPES and "LoRA rank" not in info.value.detail
    paper = {k: v.numpy() for k, v in get_adapter_state(
        attach_lora(load_clip(tiny_model_dir).model, get_recipe("paper"))).items()}  # fmt: skip
    with pytest.raises(ProtocolError) as info:  # a client on another recipe: the names say so
        check_adapter_tensors(expected, paper)
    assert info.value.reason is RejectReason.TENSOR_NAMES


def test_baselines_refuse_what_they_cannot_do_with_the_setting_to_change(tmp_path):
    from flora.modeling.families.siglip import write_tiny_siglip

    siglip = load_clip(write_tiny_siglip(tmp_path / "siglip"))
    with pytest.raises(ConfigError, match=r"visual_projection.*does not have"):
        attach_lora(siglip.model, get_recipe("linear-probe"))  # PEFT alone would silently train nothing
    client = dict(node_id="c1", model="m", data_dir=tmp_path, recipe="fedfft")
    with pytest.raises(ConfigError, match='quantization = "none"'):
        ClientConfig(**client, quantization="4bit")
    with pytest.raises(ConfigError, match="no LoRA layers; remove lora_rank"):
        ClientConfig(**client, lora_rank=1)
    for strategy in ("ffa_lora", "svd_lora"):
        with pytest.raises(ConfigError, match=f"strategy '{strategy}' acts on LoRA factors.*use a strategy"):
            CoordinatorConfig(node_id="coord", model="m", recipe="fedfft", strategy=strategy)
    with pytest.raises(ConfigError, match="set require_4bit = false"):
        CoordinatorConfig(node_id="coord", model="m", recipe="vision-head", require_4bit=True)
    with pytest.raises(ConfigError, match="unknown recipe 'fedft'; choose one of: both-towers, fedfft"):
        ClientConfig(**{**client, "recipe": "fedft"})


def test_an_adapter_too_large_for_one_message_is_named_with_the_fix():
    vit_b32_fedfft = 126_000_000  # ViT-B/32 without its token table: ~126M values
    problem = adapter_size_problem(vit_b32_fedfft, encoding="float32", recipe="fedfft")
    assert "481 MiB as float32: over the 64 MiB" in problem and "use a LoRA recipe or a smaller model" in problem
    assert "int8-channel" not in problem  # 120 MiB in int8 does not fit either
    problem = adapter_size_problem(40_000_000, encoding="float32", recipe="vision-head")
    assert "set wire_encoding = int8-channel (38 MiB)" in problem
    assert adapter_size_problem(40_000_000, encoding="int8-channel", recipe="vision-head") is None
    assert adapter_size_problem(157_952, encoding="float32", recipe="fedfft") is None  # the tiny CLIP's


def test_a_grid_with_baselines_runs_end_to_end(tmp_path, digits):
    from flora.app.simulate import load_experiment, run_grid
    from flora.data.datasets import write_image_folder

    data = write_image_folder(digits.subset(range(200)), tmp_path / "digits-200")
    config = tmp_path / "experiment.toml"
    config.write_text(
        f"""
name = "baselines"
out = "{tmp_path / "grid"}"
dataset = "{data}"
clients = 2
rounds = 2
batch_size = 16
recipes = ["linear-probe", "fedfft"]
splits = ["iid"]
strategies = ["fedavg"]
objectives = ["class-prompts"]
"""
    )
    rows = run_grid(load_experiment(config), progress=False)
    model = load_clip(tmp_path / "grid" / "models" / "tiny-clip").model
    counts = {r: sum(p.numel() for n, p in model.named_parameters() if n in trained_weights(model, r)) for r in
              ("linear-probe", "fedfft")}  # fmt: skip
    assert [r["recipe"] for r in rows] == ["linear-probe", "fedfft"]
    for row in rows:
        assert row["trainable_parameters"] == counts[row["recipe"]]
        assert row["bytes_per_update"] == 4 * counts[row["recipe"]]
        assert row["bytes_per_round"] > 2 * row["bytes_per_update"]  # two clients' updates went over the broker
        assert len(row["validation_accuracy_per_round"]) == 2 and 0 <= row["test_accuracy"] <= 1
    table = (tmp_path / "grid" / "table.md").read_text()
    assert "| fedfft | iid | fedavg | class-prompts |" in table and f"| {counts['fedfft']:,} |" in table
    assert json.loads((tmp_path / "grid" / "results.json").read_text())["cells"] == rows


def test_the_coordinator_refuses_to_start_a_run_whose_adapter_cannot_travel(tiny_model_dir, tmp_path, monkeypatch):
    """The size check at its real call site: the cap lowered below the tiny fedfft adapter (617 KiB) stands for
    a large model's (fedfft on ViT-B/32 is 481 MiB, too much to load in a test)."""
    from coordinator.main import build_coordinator
    from flora.protocol import wire_settings

    monkeypatch.setattr(wire_settings, "MAX_RAW_BYTES", 512 * 1024)
    monkeypatch.setattr(wire_settings, "UPDATE_HEADER_ROOM", 1024)
    config = dict(node_id="coord", model=str(tiny_model_dir), broker_url="memory://size-check", run_id="r")
    with pytest.raises(ConfigError, match="recipe 'fedfft' on this model sends 157,952 values per update"):
        build_coordinator(CoordinatorConfig(**config, recipe="fedfft", checkpoint_dir=tmp_path / "a"))
    build_coordinator(CoordinatorConfig(**config, recipe="linear-probe", checkpoint_dir=tmp_path / "b"))


def test_a_baseline_exports_to_onnx_matching_pytorch(tiny_model_dir, tmp_path, digits):
    """`flora export`'s pipeline on a whole-module adapter: merged, exported, validated, and stamped with its recipe."""
    import onnx

    from export.pipeline import export_and_validate

    model = attach_lora(load_clip(tiny_model_dir).model, get_recipe("vision-head"))
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    adapter_dir = save_adapter_dir(model, tmp_path / "adapter", base_model=str(tiny_model_dir))
    result = export_and_validate(
        str(tiny_model_dir),
        adapter_dir,
        tmp_path / "onnx",
        eval_data=digits.subset(range(64)),
        prompt_template=TEMPLATE,
    )
    assert result.max_abs_diff <= 1e-4 and result.onnxruntime_accuracy == result.pytorch_accuracy
    meta = {p.key: p.value for p in onnx.load(str(tmp_path / "onnx" / "model.onnx")).metadata_props}
    assert meta["recipe"] == "vision-head"


@pytest.mark.parametrize("recipe", ("linear-probe", "vision-head"))
def test_an_image_only_baseline_trains_a_client_with_fewer_examples_than_class_prompts(tiny_model_dir, digits, recipe):
    """Four examples against ten class prompts: more texts than the micro-batch, so the step takes the
    gradient-cache path, which once also ran a backward pass through the frozen text tower and failed
    ("element 0 of tensors does not require grad") on such clients of a Dirichlet(0.1) split."""
    data = digits.subset(range(4))
    trainer = LocalTrainer(load_clip(tiny_model_dir), get_recipe(recipe), data, progress=False, max_batch_size=16)
    assert trainer.trains_images and not trainer.trains_text
    prompts = tuple(TEMPLATE.format(label=d) for d in range(10))
    start = {k: v.clone() for k, v in trainer.adapter_state().items()}
    settings = TrainSettings(learning_rate=1e-2, batch_size=16, prompt_template=TEMPLATE, class_prompts=prompts)
    tensors, _ = trainer.train_round({k: v.numpy() for k, v in start.items()}, settings, round_=1)
    assert any(not torch.equal(tensors[k], start[k]) for k in start)


def test_the_coordinator_says_at_start_when_few_large_updates_fit_its_reassembly_buffer(caplog):
    from coordinator.main import FEW_CONCURRENT_UPLOADS, warn_if_few_concurrent_uploads
    from flora.protocol.reassembly import ChunkLimits
    from flora.protocol.wire_settings import UPDATE_HEADER_ROOM, concurrent_uploads

    limit = ChunkLimits().max_buffered_bytes
    values = 20_000_000  # a whole-module baseline of a mid-sized model: 76 MiB as float32, 19 MiB as int8
    assert concurrent_uploads(values, encoding="float32", buffered_bytes=limit) == limit // (
        4 * values + UPDATE_HEADER_ROOM
    )
    config = CoordinatorConfig(node_id="coord", model="m", recipe="fedfft")
    with caplog.at_level("WARNING", logger="coordinator.main"):
        assert warn_if_few_concurrent_uploads(values, config) == 3
    assert "reassembles at most 3 chunked updates at once" in caplog.text and "fewer clients per round" in caplog.text
    caplog.clear()
    paper_on_vit_b32 = 24_576  # LoRA r=2 on the text out_proj: hundreds of updates fit
    with caplog.at_level("WARNING", logger="coordinator.main"):
        assert warn_if_few_concurrent_uploads(paper_on_vit_b32, config) >= FEW_CONCURRENT_UPLOADS
    assert "reassembles" not in caplog.text
