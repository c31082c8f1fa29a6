"""The zero-shot head for a label set of the user's choosing (--labels), with no eval data at hand."""

from __future__ import annotations

import numpy as np
import torch

from export.infer import run_infer
from export.merge import merge_adapter
from export.pipeline import export_and_validate
from export.zero_shot import ZeroShotHead, read_labels
from flora.modeling import scoring
from flora.modeling.adapter import attach_lora, get_adapter_state, save_adapter_dir, set_adapter_state
from flora.modeling.loading import load_clip
from flora.modeling.recipes import get_recipe


def test_head_holds_the_given_labels_and_matches_pytorch(tmp_path, tiny_model_dir, test_folder):
    model = attach_lora(load_clip(tiny_model_dir).model, get_recipe("paper"))
    torch.manual_seed(4)
    set_adapter_state(model, {k: torch.randn_like(v) * 0.5 for k, v in get_adapter_state(model).items()})
    adapter = save_adapter_dir(model, tmp_path / "adapter", base_model=str(tiny_model_dir))
    (tmp_path / "labels.txt").write_text("zero\nseven\ncat\n")
    labels = read_labels(tmp_path / "labels.txt")
    template = "a picture of the number {label}."

    result = export_and_validate(
        str(tiny_model_dir), adapter, tmp_path / "onnx", parts="vision", labels=labels, prompt_template=template,
        latency_repeats=1,
    )  # fmt: skip
    head = ZeroShotHead.load(tmp_path / "onnx" / "zero_shot_head.npz")
    assert head.labels == labels and head.prompt_template == template
    assert head.info["recipe"] == "paper"

    clip = merge_adapter(str(tiny_model_dir), adapter)
    with torch.no_grad():
        expected = scoring.text_embeddings(
            clip.model, scoring.tokenize(clip.tokenizer, [template.format(label=x) for x in labels])
        )
    np.testing.assert_allclose(head.embeddings, expected.numpy(), atol=1e-6)
    # No eval data: agreement is measured on synthetic images and said to be so; no accuracy is claimed.
    record = result.exports[0]
    assert "synthetic" in record.test["on"] and "accuracy" not in record.test
    assert result.onnxruntime_accuracy is None and "onnxruntime_accuracy" not in result.to_dict()

    image = next((test_folder / "7").iterdir())
    report = run_infer(tmp_path / "onnx", [image], top_k=3)
    assert sorted(entry["label"] for entry in report["results"][0]["top_k"]) == sorted(labels)
