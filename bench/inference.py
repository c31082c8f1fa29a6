"""Image-tower inference on CPU (issue 6): PyTorch eager vs ONNX Runtime fp32 vs ONNX Runtime int8.

    .venv/bin/python bench/inference.py > inference.json

The model is CLIP's ViT-B/32 architecture (transformers' CLIPConfig defaults: 768 wide, 12 layers,
patch 32, 224x224 input, 512-d projection) with random weights: latency does not depend on the
weight values. The measured module is the image tower + visual projection + L2 normalisation,
exactly what `flora export --parts vision` writes (the same exporter and the same int8 quantizer,
export/onnx_export.py and export/quantize.py), and PyTorch runs that same wrapper eagerly.

Fairness: PyTorch gets torch.set_num_threads(T) and ONNX Runtime intra_op_num_threads=T (inter-op 1),
T = --threads (default: all cores). Batches 1 and 32 in the same run, same input tensors. Each figure
is the median of --repeats timed calls (batch 32: a third as many), taken in 3 passes; a pass times
one block of calls per runtime, in an order rotated each pass, each block after --warmup untimed
calls, so load from other processes on a shared machine falls on all three runtimes alike.

Agreement: int8 vs fp32 top-1 agreement on the tiny model's digits test split (359 images; split
flora.data.partition.train_test_split(labels, 0.2, seed=0)), for the vision tower scored against
the zero-shot head (the device setup) and for the whole model, through the torch-free runtime.
Measured twice: on the untrained tiny checkpoint, whose near-constant predictions make agreement
trivial (reported, with its number of distinct predicted classes, so nobody mistakes it for
evidence), and after training a LoRA adapter on the train split (--train-epochs), which is the
figure checked against the target.

Every int8 scheme of export.quantize.INT8_SCHEMES is timed and scored in the same run (`int8` = full,
`int8_first_attn_fp32`, `int8_attn_fp32`), so each one's cost in speed and size sits beside its effect on
agreement. `flora export`'s default, `--int8-scheme auto`, keeps the first scheme that meets the agreement
threshold: the targets section reports, per part, which one that is on the trained tiny model and the
ViT-B/32 speed-up it comes with.

Prints one JSON object on stdout; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

TARGET_FP32_SPEEDUP_B1 = 1.3
TARGET_INT8_SPEEDUP_B1 = 2.0
TARGET_AGREEMENT = 0.99
MIB = 1024 * 1024
# export.quantize.INT8_SCHEMES name -> this benchmark's key (fastest first, as `auto` tries them).
SCHEME_KEYS = {"full": "int8", "first-attention-fp32": "int8_first_attn_fp32", "attention-fp32": "int8_attn_fp32"}


def progress(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def rotated_blocks_median_ms(runs: dict[str, Any], *, repeats: int, warmup: int, passes: int = 3) -> dict[str, float]:
    """Median ms per callable over `passes` passes; each pass gives every runtime one block of calls.

    The machine is shared, so runtimes are not timed one after the other once: a burst of someone
    else's load would land on whichever was being timed. Each pass times a block per runtime, in an
    order rotated every pass, so bursts spread over all of them. Blocks, not single calls: both
    runtimes' thread pools spin for a while after a call, so a call right after the other runtime
    is slowed by it; each block starts with `warmup` untimed calls that absorb that tail.
    """
    names = list(runs)
    per_block = max(1, -(-repeats // passes))
    times: dict[str, list[float]] = {name: [] for name in names}
    for pass_ in range(passes):
        for name in names[pass_ % len(names) :] + names[: pass_ % len(names)]:
            for _ in range(warmup):
                runs[name]()
            for _ in range(per_block):
                start = time.perf_counter()
                runs[name]()
                times[name].append(time.perf_counter() - start)
    return {name: 1000.0 * statistics.median(values) for name, values in times.items()}


def vit_b32_image_latency(work: Path, threads: int, repeats: dict[int, int], warmup: int) -> dict[str, Any]:
    import numpy as np
    import torch
    from transformers import CLIPConfig, CLIPModel

    from export.onnx_export import export_part, part_module
    from export.parts import VISION_TOWER
    from export.providers import make_session
    from export.quantize import INT8_SCHEMES, make_precision

    torch.manual_seed(0)
    model = CLIPModel(CLIPConfig()).eval()  # ViT-B/32 shapes, random weights
    tower = part_module(model, VISION_TOWER)
    size = model.config.vision_config.image_size
    progress("exporting the ViT-B/32 image tower to ONNX (fp32)")
    fp32 = export_part(model, VISION_TOWER, {"pixel_values": torch.randn(1, 3, size, size)}, work / "vision_model.onnx")
    progress(f"quantizing to int8 (dynamic, per channel), schemes {', '.join(INT8_SCHEMES)}")
    files = {"fp32": fp32}
    for scheme, key in SCHEME_KEYS.items():
        files[key] = make_precision("int8", fp32, work / f"vision_model_{key}.onnx", int8_scheme=scheme)
    sessions = {name: make_session(path, "cpu", threads=threads)[0] for name, path in files.items()}
    eager_bytes = sum(
        p.numel() * p.element_size() for p in [*model.vision_model.parameters(), *model.visual_projection.parameters()]
    )

    results: dict[str, Any] = {}
    for batch, count in repeats.items():
        pixels = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(batch))
        feeds = {"pixel_values": pixels.numpy()}

        def eager(pixels=pixels):
            with torch.inference_mode():
                return tower(pixels)

        runs = {
            "pytorch_eager": eager,
            **{
                f"onnxruntime_{name}": (lambda s=session, f=feeds: s.run(None, f)) for name, session in sessions.items()
            },
        }
        progress(f"batch {batch}: {count} timed calls each of {', '.join(runs)}, in 3 rotated passes")
        row = {f"{name}_ms": ms for name, ms in rotated_blocks_median_ms(runs, repeats=count, warmup=warmup).items()}
        with torch.inference_mode():
            reference = tower(pixels).numpy()
        for name, session in sessions.items():
            got = session.run(None, feeds)[0]
            row[f"onnxruntime_{name}_min_cosine_vs_eager"] = float(
                ((got * reference).sum(1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(reference, axis=1))).min()
            )
        for name in sessions:
            row[f"speedup_{name}_vs_eager"] = row["pytorch_eager_ms"] / row[f"onnxruntime_{name}_ms"]
        row["repeats"] = count
        results[f"batch_{batch}"] = row
    results["size_mib"] = {
        "pytorch_fp32_parameters": eager_bytes / MIB,
        **{f"onnx_{name}": path.stat().st_size / MIB for name, path in files.items()},
    }
    results["size_ratio_int8_vs_fp32_onnx"] = files["int8"].stat().st_size / fp32.stat().st_size
    return results


def train_tiny_adapter(clip: Any, train: Any, template: str, *, epochs: int, seed: int = 0) -> float:
    """Centralised LoRA training of the tiny model (demo recipe and learning rate); returns the last loss.

    The untrained tiny model predicts (nearly) one class for every image, so int8 and fp32 would
    "agree" trivially; a trained adapter gives it real margins between classes, as a deployed model has.
    """
    import numpy as np
    import torch

    from flora.data.datasets import pixel_values
    from flora.modeling import scoring
    from flora.modeling.adapter import attach_lora
    from flora.modeling.recipes import get_recipe

    model = attach_lora(clip.model, get_recipe("both-towers"), seed=seed)
    pixels = pixel_values(clip.image_processor, train.images)
    labels = torch.as_tensor(train.labels)
    prompts = scoring.tokenize(clip.tokenizer, scoring.class_prompts(train.class_names, template))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3, weight_decay=0.2)
    rng = np.random.default_rng(seed)
    model.train()
    for _ in range(epochs):
        for idx in np.array_split(rng.permutation(len(labels)), max(1, len(labels) // 32)):
            classes, targets = torch.unique(labels[idx], return_inverse=True)
            text = scoring.text_embeddings(model, {k: v[classes] for k, v in prompts.items()})
            images = scoring.image_embeddings(model, pixels[idx])
            loss = scoring.contrastive_loss(images, text, targets, scoring.logit_scale(model))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    clip.model = model.merge_and_unload().eval()
    return float(loss.item())


def tiny_test_split_agreement(work: Path, train_epochs: int) -> dict[str, Any]:
    """int8 vs fp32 top-1 agreement on the digits test split, for the tiny CLIP base and a trained adapter."""
    from flora.data.digits import load_digits_images
    from flora.data.partition import train_test_split
    from flora.modeling.loading import load_clip
    from flora.modeling.tiny import write_tiny_clip

    model_dir = write_tiny_clip(work / "tiny-clip")
    digits = load_digits_images()
    train_idx, test_idx = train_test_split(digits.labels, 0.2, seed=0)
    results: dict[str, Any] = {"examples": len(test_idx)}
    progress("tiny model, untrained: export, quantize, score")
    results["untrained"] = _agreement(load_clip(model_dir), digits.subset(test_idx), work / "untrained")
    progress(f"tiny model: training a LoRA adapter for {train_epochs} epochs on the train split")
    clip = load_clip(model_dir)
    last_loss = train_tiny_adapter(clip, digits.subset(train_idx), _template(), epochs=train_epochs)
    progress("tiny model, trained: export, quantize, score")
    results["trained"] = {"train_epochs": train_epochs, "last_train_loss": last_loss}
    results["trained"].update(_agreement(clip, digits.subset(test_idx), work / "trained"))
    # The same exports (deterministic) scored on the 1437 training images: a larger sample, apart from the test split,
    # to judge the int8 schemes by without tuning them on the split the target is checked on.
    progress("tiny model, trained: the same scores on the train split")
    results["trained_scored_on_train_split"] = _agreement(clip, digits.subset(train_idx), work / "trained-train")
    return results


def _template() -> str:
    from flora.data.digits import DIGIT_TEMPLATE

    return DIGIT_TEMPLATE


def _agreement(clip: Any, test: Any, out: Path) -> dict[str, Any]:
    import numpy as np
    import torch

    from export.evaluate import ScoringSet, TorchReference
    from export.onnx_export import export_part
    from export.parts import VISION_TOWER, WHOLE_MODEL
    from export.preprocess import ImagePreprocessor
    from export.quality import accuracy, top1_agreement
    from export.quantize import make_precision
    from export.runtime import OnnxClip
    from flora.modeling import scoring

    clip.processor.save_pretrained(out)
    data = ScoringSet(test.images, test.labels, test.class_names, _template(), "digits test split")
    reference = TorchReference.compute(clip, data)
    prompts = data.prompts
    sample = {
        **scoring.tokenize(clip.tokenizer, [prompts[0], prompts[0] + " " + prompts[1]]),
        "pixel_values": torch.randn(2, 3, 32, 32),
    }
    ranked = np.sort(reference.logits, axis=1)
    results: dict[str, Any] = {
        "pytorch_accuracy": accuracy(reference.logits, test.labels),
        "pytorch_distinct_predicted_classes": len(np.unique(reference.logits.argmax(1))),
        "pytorch_median_top1_top2_margin": float(np.median(ranked[:, -1] - ranked[:, -2])),
    }
    for part in (VISION_TOWER, WHOLE_MODEL):
        fp32 = export_part(clip.model, part, sample, out / part.filename("fp32"))
        files = {"fp32": fp32}
        for scheme, key in SCHEME_KEYS.items():
            files[key] = make_precision("int8", fp32, out / f"{part.name}_{key}.onnx", int8_scheme=scheme)
        logits = {}
        for name, path in files.items():
            runner = OnnxClip(
                {part.name: path},
                ImagePreprocessor.from_dir(out),
                logit_scale=reference.logit_scale,
                tokenizer_dir=out,
                max_text_length=clip.model.config.text_config.max_position_embeddings,
                head=reference.head(data) if part.name == "vision" else None,
            )
            logits[name] = runner.logits(data.images, data.class_names, data.prompt_template, batch_size=256)[1]
        results[part.name] = {
            "fp32_top1_agreement_with_pytorch": top1_agreement(logits["fp32"], reference.logits),
            "fp32_accuracy": accuracy(logits["fp32"], test.labels),
        }
        for key in SCHEME_KEYS.values():
            results[part.name][f"{key}_top1_agreement_with_fp32"] = top1_agreement(logits[key], logits["fp32"])
            results[part.name][f"{key}_accuracy"] = accuracy(logits[key], test.labels)
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--threads", type=int, default=os.cpu_count(), help="threads for both runtimes (default: all cores)"
    )
    parser.add_argument(
        "--repeats", type=int, default=20, help="timed calls at batch 1 (batch 32: a third, at least 3)"
    )
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls before each timed block")
    parser.add_argument("--train-epochs", type=int, default=8, help="epochs of the tiny model's adapter training")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

    import onnxruntime
    import torch
    import transformers

    torch.set_num_threads(args.threads)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="flora-bench-inference-") as tmp:
        work = Path(tmp)
        latency = vit_b32_image_latency(
            work, args.threads, {1: args.repeats, 32: max(3, args.repeats // 3)}, args.warmup
        )
        agreement = tiny_test_split_agreement(work, args.train_epochs)
    b1 = latency["batch_1"]
    report = {
        "benchmark": "bench/inference.py",
        "model": "CLIP ViT-B/32 architecture, random weights; image tower + projection + L2 norm",
        "threads": args.threads,
        "machine": {
            "cpu_count": os.cpu_count(),
            "processor": platform.processor() or platform.machine(),
            "load_average_at_start": os.getloadavg(),
        },
        "versions": {
            "torch": torch.__version__,
            "onnxruntime": onnxruntime.__version__,
            "transformers": transformers.__version__,
        },
        "latency": latency,
        "tiny_test_split": agreement,
        "targets": {
            "fp32_speedup_b1": {
                "target": TARGET_FP32_SPEEDUP_B1,
                "measured": b1["speedup_fp32_vs_eager"],
                "met": b1["speedup_fp32_vs_eager"] >= TARGET_FP32_SPEEDUP_B1,
            },
            "int8_speedup_b1": {
                "target": TARGET_INT8_SPEEDUP_B1,
                "measured": b1["speedup_int8_vs_eager"],
                "met": b1["speedup_int8_vs_eager"] >= TARGET_INT8_SPEEDUP_B1,
            },
            **{
                f"int8_full_agreement_trained_{part}": {
                    "target": TARGET_AGREEMENT,
                    "measured": agreement["trained"][part]["int8_top1_agreement_with_fp32"],
                    "met": agreement["trained"][part]["int8_top1_agreement_with_fp32"] >= TARGET_AGREEMENT,
                }
                for part in ("vision", "model")
            },
            **{
                f"int8_auto_trained_{part}": auto_scheme_outcome(agreement["trained"][part], b1)
                for part in ("vision", "model")
            },
        },
        "seconds": time.monotonic() - started,
    }
    print(json.dumps(report, indent=2))
    return 0


def auto_scheme_outcome(scores: dict[str, Any], batch1: dict[str, Any]) -> dict[str, Any]:
    """What `flora export --int8-scheme auto` keeps for this part (the first scheme at or above the agreement
    target, as the export decides with the test split as --eval-data), and whether that meets both targets."""
    candidates = [
        (scheme, scores[f"{key}_top1_agreement_with_fp32"], batch1[f"speedup_{key}_vs_eager"])
        for scheme, key in SCHEME_KEYS.items()
    ]
    passing = [c for c in candidates if c[1] >= TARGET_AGREEMENT]
    scheme, agreement, speedup = passing[0] if passing else max(candidates, key=lambda c: c[1])
    return {
        "scheme": scheme,
        "agreement": agreement,
        "vit_b32_speedup_b1": speedup,
        "met": agreement >= TARGET_AGREEMENT and speedup >= TARGET_INT8_SPEEDUP_B1,
    }


if __name__ == "__main__":
    sys.exit(main())
