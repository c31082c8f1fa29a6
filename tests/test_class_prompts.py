"""The class-prompt objective (protocol 1.2, `train.class_prompts`): the loss, the field's rules, and a round."""

from __future__ import annotations

import math
import threading

import numpy as np
import pytest

from coordinator.main import build_coordinator
from coordinator.objective import objective_settings
from edge_client.main import build_agent
from edge_client.trainer import LocalTrainer, TrainSettings
from flora.data.datasets import write_image_folder
from flora.errors import ConfigError, ProtocolError, RejectReason
from flora.modeling.loading import load_clip
from flora.modeling.recipes import get_recipe
from flora.protocol import Envelope, envelope_from_bytes, envelope_to_bytes
from flora.protocol.envelope import PROTOCOL_VERSION
from flora.protocol.schema import MAX_CLASS_PROMPTS, MAX_PROMPT_CHARS, check_data
from tests.integration.helpers import TEMPLATE, client_configs, coordinator_config

PROMPTS = tuple(TEMPLATE.format(label=d) for d in "0123456789")


def hand_loss(images: np.ndarray, texts: np.ndarray, targets: list[int], scale: float, shift=0.0) -> float:
    """CLIP's loss written out: image->text cross-entropy over every text; text->image over the texts present,
    each with a uniform target over the images that carry it; the mean of the two. `shift`: added per text."""
    logits = scale * images @ texts.T + shift
    image_terms = [math.log(np.exp(row).sum()) - row[t] for row, t in zip(logits, targets)]
    text_terms = []
    for text in sorted(set(targets)):
        column = logits[:, text]
        carriers = [i for i, t in enumerate(targets) if t == text]
        log_softmax = column - math.log(np.exp(column).sum())
        text_terms.append(-sum(log_softmax[i] for i in carriers) / len(carriers))
    return (float(np.mean(image_terms)) + float(np.mean(text_terms))) / 2


def test_the_loss_contrasts_a_one_class_batch_with_every_class_prompt(tiny_model_dir, digits):
    import torch

    sevens = digits.subset(np.flatnonzero(digits.labels == 7)[:12])  # one class, as under strong label skew
    trainer = LocalTrainer(load_clip(tiny_model_dir), get_recipe("paper"), sevens, progress=False)
    batch = list(range(8))
    in_batch, _ = trainer.batch_gradients(batch, TEMPLATE)
    loss, grads = trainer.batch_gradients(batch, TEMPLATE, class_prompts=PROMPTS)

    with torch.no_grad():
        trainer.model.eval()  # dropout is off in the tiny model; eval() only makes that explicit
        tokens = trainer.family.tokenize(trainer.clip.tokenizer, list(PROMPTS), "cpu")
        texts = trainer.family.text_embeddings(trainer.model, tokens).numpy()
        scale = float(trainer.family.logit_scale(trainer.model))
    images = trainer.image_embeds[batch].numpy()
    # sevens.class_names are the ten digits, and its labels are 7: target 7 among all ten prompts.
    assert loss == pytest.approx(hand_loss(images, texts, [7] * 8, scale), rel=1e-5)
    # In-batch, the only text is the batch's own prompt: image->text is log(1) = 0, only text->image is left.
    own = texts[7:8]
    assert in_batch == pytest.approx(hand_loss(images, own, [0] * 8, scale), rel=1e-5)
    assert loss > in_batch + 0.1 and grads  # the other nine classes now push the sevens away from them

    # FedLC's calibration: each class's logit lowered by tau * n^(-1/4), n its local count (at least 1).
    calibrated, _ = trainer.batch_gradients(batch, TEMPLATE, class_prompts=PROMPTS, logit_calibration=2.0)
    counts = np.ones(10)
    counts[7] = 12  # all twelve local examples are sevens
    shift = -2.0 * counts**-0.25
    assert calibrated == pytest.approx(hand_loss(images, texts, [7] * 8, scale, shift), rel=1e-5)
    assert calibrated < loss  # the absent classes weigh less in the softmax


def test_a_local_class_the_run_does_not_name_keeps_its_target(tiny_model_dir, digits):
    data = digits.subset(range(20))
    trainer = LocalTrainer(load_clip(tiny_model_dir), get_recipe("paper"), data, progress=False)
    texts, index, every = trainer.round_texts(TrainSettings(prompt_template=TEMPLATE, class_prompts=PROMPTS[:5]))
    assert every and texts[:5] == list(PROMPTS[:5]) and texts[5:] == list(PROMPTS[5:])
    assert [texts[i] for i in index.tolist()] == [PROMPTS[label] for label in data.labels]


def test_class_prompts_are_read_from_the_instruction_and_bounded():
    assert TrainSettings.from_instruction({"class_prompts": list(PROMPTS)}).class_prompts == PROMPTS
    assert TrainSettings.from_instruction({}).class_prompts == ()  # a 1.1 coordinator: the in-batch loss
    assert TrainSettings.from_instruction({"logit_calibration": 1}).logit_calibration == 1.0
    for bad in (-1, 101, "1", float("nan")):
        with pytest.raises(ValueError, match="logit_calibration"):
            TrainSettings.from_instruction({"logit_calibration": bad})
    for bad in (
        "a photo",
        [],
        ["ok", 5],
        ["x" * (MAX_PROMPT_CHARS + 1)],
        [""],
        ["same", "same"],
        [f"p{i}" for i in range(MAX_CLASS_PROMPTS + 1)],
    ):
        with pytest.raises(ValueError, match="class_prompts"):
            TrainSettings.from_instruction({"class_prompts": bad})
        with pytest.raises(ProtocolError) as info:
            check_data("train", {"selected": ["a"], "train": {"class_prompts": bad}})
        assert info.value.reason is RejectReason.MALFORMED and "class_prompts" in info.value.detail


def test_the_field_is_a_minor_version_addition():
    assert PROTOCOL_VERSION == "1.3"
    train = {"selected": ["a"], "train": {"class_prompts": list(PROMPTS)}}
    for version in ("1.0", "1.1", "1.2", "1.3", "1.9"):  # another minor: accepted, the field read when present
        env = envelope_from_bytes(
            envelope_to_bytes(Envelope(kind="train", run="r", sender="c", round=1, data=train, version=version))
        )
        assert check_data("train", env.data)["train"]["class_prompts"] == list(PROMPTS)
    with pytest.raises(ProtocolError) as info:  # another major: refused, whatever it holds
        envelope_from_bytes(
            envelope_to_bytes(Envelope(kind="train", run="r", sender="c", round=1, data=train, version="2.0"))
        )
    assert info.value.reason is RejectReason.VERSION


def test_the_coordinator_sends_class_prompts_unless_told_in_batch():
    assert objective_settings("class-prompts", ["cat", "dog"], "a {label}.") == {"class_prompts": ["a cat.", "a dog."]}
    assert objective_settings("in-batch", ["cat", "dog"], "a {label}.") == {}
    assert objective_settings("class-prompts", ["cat"], "a {label}.", 0.5) == {
        "class_prompts": ["a cat."],
        "logit_calibration": 0.5,
    }
    assert objective_settings("class-prompts", None, "a {label}.") == {}  # no class names known: in-batch
    with pytest.raises(ConfigError, match="shorten"):
        objective_settings("class-prompts", ["x" * 400], "{label}")


class TextsSeen:
    def __init__(self):
        self.texts: dict[str, int] = {}

    def on_update_accepted(self, event):
        self.texts[event.node] = event.metrics["texts_contrasted"]


@pytest.mark.parametrize(("objective", "expected"), [("class-prompts", 10), ("in-batch", 1)])
def test_a_round_of_one_class_clients_contrasts_with_every_class(
    tmp_path, tiny_model_dir, digits, test_folder, objective, expected
):
    data_dirs = [
        write_image_folder(digits.subset(np.flatnonzero(digits.labels == d)[:15]), tmp_path / f"data-{d}")
        for d in (3, 8)
    ]
    url = f"memory://class-prompts-{objective}"
    seen = TextsSeen()
    config = coordinator_config(
        tmp_path,
        tiny_model_dir,
        url,
        test_folder,
        clients=2,
        rounds=1,
        run_id="cp",
        local_epochs=1,
        objective=objective,
    )
    coordinator = build_coordinator(config, subscribers=[seen])
    agents = [build_agent(c, progress=False) for c in client_configs(tmp_path, tiny_model_dir, url, data_dirs, "cp")]
    threads = [threading.Thread(target=a.run, kwargs={"max_seconds": 120}, daemon=True) for a in agents]
    for t in threads:
        t.start()
    report = coordinator.run()
    for t in threads:
        t.join(timeout=60)
    assert report["rounds"][0]["participants"] == 2
    assert seen.texts == {"client-0": expected, "client-1": expected}
