"""The prompt an adapter was trained with travels with it, and export and infer use it unless told otherwise."""

from __future__ import annotations

import json
import logging

import pytest

from export.manifest import Manifest
from export.pipeline import export_and_validate
from export.zero_shot import ZeroShotHead
from flora.modeling.training_info import TRAINING_INFO_FILE, TrainingInfo, resolve_prompt_template

TRAINED = "a photo of the digit {label}."


def test_training_info_round_trips_and_a_damaged_file_is_ignored(tmp_path):
    info = TrainingInfo(TRAINED, ("0", "1"), run_id="r", recipe="paper")
    (tmp_path / TRAINING_INFO_FILE).write_text(json.dumps(info.to_dict()))
    assert TrainingInfo.read(tmp_path) == info
    (tmp_path / TRAINING_INFO_FILE).write_text("{not json")
    assert TrainingInfo.read(tmp_path) is None
    assert TrainingInfo.read(tmp_path / "missing") is None


def test_the_training_prompt_is_the_default_and_an_override_warns(caplog):
    info = TrainingInfo(TRAINED)
    assert resolve_prompt_template(None, info, "default {label}", what="export") == TRAINED
    assert resolve_prompt_template(None, None, "default {label}", what="export") == "default {label}"
    with caplog.at_level(logging.WARNING):
        assert resolve_prompt_template("a {label}", info, "default {label}", what="export") == "a {label}"
    assert "trained with 'a photo of the digit {label}.'" in caplog.text


@pytest.fixture
def trained_adapter(tmp_path, tiny_model_dir):
    """A PEFT adapter directory written the way the coordinator writes global_adapter/, with its training info."""
    from flora.modeling.adapter import attach_lora, save_adapter_dir
    from flora.modeling.loading import load_clip
    from flora.modeling.recipes import get_recipe

    model = attach_lora(load_clip(tiny_model_dir).model, get_recipe("paper"), seed=0)
    info = TrainingInfo(TRAINED, tuple(str(d) for d in range(10)), run_id="demo", recipe="paper")
    return save_adapter_dir(
        model,
        tmp_path / "global_adapter",
        base_model=str(tiny_model_dir),
        extra_json={TRAINING_INFO_FILE: info.to_dict()},
    )


def test_export_uses_the_training_prompt_and_classes_by_default(tmp_path, tiny_model_dir, trained_adapter, caplog):
    from peft import PeftModel

    from flora.modeling.loading import load_clip

    PeftModel.from_pretrained(load_clip(tiny_model_dir).model, trained_adapter)  # still a plain PEFT directory
    with caplog.at_level(logging.WARNING):
        result = export_and_validate(str(tiny_model_dir), trained_adapter, tmp_path / "onnx", parts="vision")
    manifest = Manifest.read(tmp_path / "onnx")
    assert result.ok and manifest.prompt_template == TRAINED
    assert manifest.zero_shot_head is not None
    head = ZeroShotHead.load(tmp_path / "onnx" / manifest.zero_shot_head)
    assert head.labels == [str(d) for d in range(10)] and head.prompt_template == TRAINED  # the run's, no --labels
    assert "trained with" not in caplog.text


def test_an_export_with_another_prompt_says_so(tmp_path, tiny_model_dir, trained_adapter, caplog):
    with caplog.at_level(logging.WARNING):
        export_and_validate(
            str(tiny_model_dir), trained_adapter, tmp_path / "onnx", parts="vision", prompt_template="a {label}"
        )
    assert Manifest.read(tmp_path / "onnx").prompt_template == "a {label}"
    assert "the adapter was trained with 'a photo of the digit {label}.'" in caplog.text
