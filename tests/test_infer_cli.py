"""`flora infer` as a device runs it: ONNX Runtime only, with PyTorch and transformers made unimportable."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from export.manifest import MANIFEST_FILE
from export.merge import merge_adapter
from export.pipeline import export_and_validate
from flora.data.datasets import load_image_folder, pixel_values
from flora.modeling import scoring
from flora.modeling.adapter import attach_lora, get_adapter_state, save_adapter_dir, set_adapter_state
from flora.modeling.loading import load_clip
from flora.modeling.recipes import get_recipe

TEMPLATE = "a photo of the digit {label}."
BLOCKED = ("torch", "transformers", "peft", "bitsandbytes")


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_model_dir, test_folder):
    model = attach_lora(load_clip(tiny_model_dir).model, get_recipe("both-towers"))
    torch.manual_seed(2)
    set_adapter_state(model, {k: torch.randn_like(v) * 0.2 for k, v in get_adapter_state(model).items()})
    adapter = save_adapter_dir(model, tmp_path_factory.mktemp("adapter") / "adapter", base_model=str(tiny_model_dir))
    out = tmp_path_factory.mktemp("export") / "onnx"
    export_and_validate(
        str(tiny_model_dir),
        adapter,
        out,
        eval_data=load_image_folder(test_folder),
        prompt_template=TEMPLATE,
        parts="vision,model",
        latency_repeats=1,
    )
    return out, merge_adapter(str(tiny_model_dir), adapter)


@pytest.fixture(scope="module")
def no_torch(tmp_path_factory):
    """A PYTHONPATH entry whose torch, transformers, peft and bitsandbytes raise on import."""
    blocker = tmp_path_factory.mktemp("blocker")
    for name in BLOCKED:
        (blocker / f"{name}.py").write_text(f"raise ImportError('{name} is blocked: flora infer must not need it')\n")
    return blocker


def flora_without_torch(blocker: Path, *args: str) -> subprocess.CompletedProcess:
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(blocker), "HOME": str(blocker)}
    return subprocess.run(
        [sys.executable, "-m", "flora.app", *args], capture_output=True, text=True, timeout=120, env=env, cwd=Path.cwd()
    )


@pytest.fixture(scope="module")
def sample_images(test_folder):
    return [sorted((test_folder / digit).iterdir())[0] for digit in ("0", "3", "7", "9")]


def pytorch_top1(clip, paths, labels, template):
    from PIL import Image

    images = [Image.open(p).convert("RGB") for p in paths]
    logits = scoring.zero_shot_logits(
        clip.model,
        pixel_values(clip.image_processor, images),
        scoring.tokenize(clip.tokenizer, scoring.class_prompts(labels, template)),
    )
    return [labels[i] for i in logits.argmax(dim=1).tolist()]


def test_the_blocker_really_blocks_torch(no_torch):
    result = subprocess.run(
        [sys.executable, "-c", "import torch"], capture_output=True, text=True, env={"PYTHONPATH": str(no_torch)}
    )
    assert result.returncode != 0 and "blocked" in result.stderr


def test_infer_without_torch_agrees_with_pytorch(exported, no_torch, sample_images):
    out, clip = exported
    result = flora_without_torch(no_torch, "infer", "--model", str(out), "--top-k", "3", *map(str, sample_images))
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert [r["image"] for r in report["results"]] == [str(p) for p in sample_images]
    assert all(len(r["top_k"]) == 3 for r in report["results"])
    scores = [s["score"] for r in report["results"] for s in r["top_k"]]
    assert all(0.0 < s <= 1.0 for s in scores)
    # The vision tower and the zero-shot head: the device ships no text model at all.
    assert set(report["files"]) == {"vision"}
    labels = [str(d) for d in range(10)]
    assert [r["top_k"][0]["label"] for r in report["results"]] == pytorch_top1(clip, sample_images, labels, TEMPLATE)


def test_infer_with_new_labels_uses_the_text_side(exported, no_torch, sample_images, tmp_path):
    out, clip = exported
    labels = ["seven", "three", "zero", "nine", "cat"]
    (tmp_path / "labels.txt").write_text("# my classes\n" + "\n".join(labels) + "\n\n")
    template = "a picture of the number {label}."
    result = flora_without_torch(
        no_torch, "infer", "--model", str(out), "--labels", str(tmp_path / "labels.txt"),
        "--prompt-template", template, "--top-k", "1", str(sample_images[0].parent.parent / "7"),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    paths = [Path(r["image"]) for r in report["results"]]
    assert len(paths) == len(list((sample_images[0].parent.parent / "7").iterdir()))  # a folder expands
    assert report["labels"] == 5 and "model" in report["files"]  # text embeddings from the whole model
    got = [r["top_k"][0]["label"] for r in report["results"]]
    assert got == pytorch_top1(clip, paths, labels, template)


def test_provider_choice_falls_back_and_says_which_ran(exported, no_torch, sample_images):
    out, _ = exported
    result = flora_without_torch(no_torch, "infer", "--model", str(out), "--provider", "cuda", str(sample_images[0]))
    assert result.returncode == 0, result.stderr
    available = ort.get_available_providers()
    expected = "CUDAExecutionProvider" if "CUDAExecutionProvider" in available else "CPUExecutionProvider"
    assert f"execution provider: {expected}" in result.stderr
    assert json.loads(result.stdout)["execution_providers"] == {"vision": expected}
    if expected == "CPUExecutionProvider":
        assert "CUDAExecutionProvider is not available" in result.stderr and "onnxruntime-gpu" in result.stderr


def test_a_device_bundle_of_vision_model_and_head_is_enough(exported, no_torch, sample_images, tmp_path):
    out, _ = exported
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    for name in ("vision_model.onnx", "zero_shot_head.npz", "processor_config.json"):
        shutil.copy(out / name, bundle / name)  # no tokenizer, no text model
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    manifest["files"] = {"vision": manifest["files"]["vision"]}
    (bundle / MANIFEST_FILE).write_text(json.dumps(manifest))
    ok = flora_without_torch(no_torch, "infer", "--model", str(bundle), str(sample_images[0]))
    assert ok.returncode == 0, ok.stderr
    (tmp_path / "labels.txt").write_text("apple\npear\n")
    refused = flora_without_torch(
        no_torch, "infer", "--model", str(bundle), "--labels", str(tmp_path / "labels.txt"), str(sample_images[0])
    )
    assert refused.returncode == 2 and "no text tower" in refused.stderr and "Traceback" not in refused.stderr


def test_bad_inputs_fail_with_the_fix_in_the_message(exported, no_torch, tmp_path):
    out, _ = exported
    missing_model = flora_without_torch(no_torch, "infer", "--model", str(tmp_path), str(tmp_path))
    assert missing_model.returncode == 2
    assert "no images found" in missing_model.stderr  # inputs are checked before the model is opened
    (tmp_path / "x.png").write_bytes(b"not really a png")
    no_manifest = flora_without_torch(no_torch, "infer", "--model", str(tmp_path), str(tmp_path / "x.png"))
    assert no_manifest.returncode == 2 and "flora export" in no_manifest.stderr
    unreadable = flora_without_torch(no_torch, "infer", "--model", str(out), str(tmp_path / "x.png"))
    assert unreadable.returncode == 1  # nothing classified
    assert json.loads(unreadable.stdout)["errors"][0]["image"] == str(tmp_path / "x.png")


def test_infer_help(no_torch):
    result = flora_without_torch(no_torch, "infer", "--help")
    assert result.returncode == 0 and "usage: flora infer" in result.stdout and "--provider" in result.stdout


def test_softmax_scores_sum_to_one_over_all_labels(exported, no_torch, sample_images):
    out, _ = exported
    result = flora_without_torch(no_torch, "infer", "--model", str(out), "--top-k", "10", str(sample_images[1]))
    scores = [s["score"] for s in json.loads(result.stdout)["results"][0]["top_k"]]
    assert sum(scores) == pytest.approx(1.0, abs=1e-4) and scores == sorted(scores, reverse=True)
    assert np.isfinite(scores).all()


def test_another_prompt_than_the_exports_is_used_with_a_warning(exported, sample_images, caplog):
    import logging

    from export.infer import run_infer
    from export.manifest import Manifest

    out, _ = exported
    exported_template = Manifest.read(out).prompt_template
    with caplog.at_level(logging.WARNING, logger="export.infer"):
        run_infer(out, sample_images[:1], prompt_template=exported_template)
        assert "was exported with" not in caplog.text  # the export's own prompt: nothing to say
        run_infer(out, sample_images[:1], prompt_template="a sketch of {label}")
    assert f"was exported with {exported_template!r}" in caplog.text
