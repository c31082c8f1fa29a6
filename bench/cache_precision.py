"""Does a faster image cache change what training learns? int8 against float32 embeddings (issue 15).

    .venv/bin/python bench/cache_precision.py > cache_precision.json
    .venv/bin/python bench/cache_precision.py --seeds 0,1,2 --vit-b32-images 32   # the defaults

Two measurements, side by side in one run:
- the demo task (`flora demo`'s: scikit-learn digits, the tiny CLIP, the prompt "a photo of the digit {label}.",
  80/20 split), the paper recipe, one round of 2 local epochs at the demo's learning rate, from the same start
  and seed, once with the image cache in float32 and once in int8 (`cache_precision`): the trained model's
  held-out accuracy (evaluated through the fp32 vision tower, as deployment would), per seed, and the gap.
  The paper recipe trains only the text tower, so on the tiny CLIP's random vision tower it stays near chance
  (10%) and the comparison would say little: the base is first "pre-trained" (the demo's `both-towers` LoRA,
  3 epochs on the training split, merged into the weights and saved), standing in for a real CLIP checkpoint;
- the embeddings themselves on the ViT-B/32 architecture (CLIPConfig() defaults, random weights): the cosine and
  the relative L2 error of the int8 rows against the float32 ones, and the build time of each (single thread).

Prints one JSON object on stdout; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
TARGET_POINTS = 0.5


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def pretrained_tiny(out: Path, seed: int = 0) -> Path:
    """The tiny CLIP after 3 epochs of the demo's both-towers LoRA on the digits' training split, merged, saved."""
    from edge_client.trainer import LocalTrainer, TrainSettings
    from flora.data.digits import DIGIT_TEMPLATE, load_digits_images
    from flora.data.partition import train_test_split
    from flora.modeling.loading import load_clip
    from flora.modeling.recipes import get_recipe
    from flora.modeling.tiny import write_tiny_clip

    data = load_digits_images()
    train_idx, _ = train_test_split(data.labels, 0.2, seed=seed)
    clip = load_clip(write_tiny_clip(out.parent / "tiny-random"))
    trainer = LocalTrainer(clip, get_recipe("both-towers"), data.subset(train_idx), progress=False, max_batch_size=64)
    settings = TrainSettings(local_epochs=3, learning_rate=3e-3, batch_size=32, prompt_template=DIGIT_TEMPLATE)
    trainer.train_round({k: v.numpy() for k, v in trainer.adapter_state().items()}, settings, round_=1)
    merged = trainer.model.merge_and_unload()
    merged.save_pretrained(out)
    clip.processor.save_pretrained(out)
    return out


def demo_task(seed: int, model_dir: Path) -> dict[str, Any]:
    from edge_client.trainer import LocalTrainer, TrainSettings
    from flora.data.datasets import pixel_values
    from flora.data.digits import DIGIT_TEMPLATE, load_digits_images
    from flora.data.partition import train_test_split
    from flora.modeling import scoring
    from flora.modeling.loading import load_clip
    from flora.modeling.recipes import get_recipe

    data = load_digits_images()
    train_idx, test_idx = train_test_split(data.labels, 0.2, seed=seed)
    train, test = data.subset(train_idx), data.subset(test_idx)
    settings = TrainSettings(local_epochs=2, learning_rate=3e-3, batch_size=32, prompt_template=DIGIT_TEMPLATE)
    out: dict[str, Any] = {"seed": seed, "train_images": len(train), "test_images": len(test)}
    for precision in ("float32", "int8"):
        clip = load_clip(model_dir)
        started = time.perf_counter()
        trainer = LocalTrainer(
            clip, get_recipe("paper"), train, seed=seed, max_batch_size=32, progress=False, cache_precision=precision
        )
        build_s = time.perf_counter() - started
        start = {k: v.numpy() for k, v in trainer.adapter_state().items()}
        trainer.train_round(start, settings, round_=1)
        accuracy = scoring.evaluate(  # through the fp32 tower (reloaded on use), as the exported model sees images
            trainer.model,
            clip.tokenizer,
            pixel_values(clip.image_processor, test.images),
            test.labels,
            scoring.class_prompts(test.class_names, DIGIT_TEMPLATE),
        )["accuracy"]
        out[precision] = {"test_accuracy": accuracy, "cache_build_s": build_s}
        log(f"  seed {seed} {precision}: accuracy {accuracy:.4f}, cache {build_s:.2f}s")
    out["accuracy_gap_points"] = 100 * abs(out["int8"]["test_accuracy"] - out["float32"]["test_accuracy"])
    return out


def vit_b32_embeddings(images: int, model_dir: Path) -> dict[str, Any]:
    import torch

    from edge_client.cache_build import embed_images
    from flora.modeling.loading import load_clip

    sys.path.insert(0, str(ROOT / "bench"))
    from local_training import synthetic_data

    data = synthetic_data(images)
    clip = load_clip(model_dir)
    rows, seconds = {}, {}
    for precision in ("float32", "int8", "float32"):  # fp32 twice: the second is the one timed beside int8
        started = time.perf_counter()
        rows[precision] = embed_images(clip, clip.model, data.images, precision=precision, chunk=32)
        seconds[precision] = time.perf_counter() - started
    exact, fast = rows["float32"], rows["int8"]
    cosine = torch.nn.functional.cosine_similarity(fast, exact, dim=1)
    relative = (fast - exact).norm(dim=1) / exact.norm(dim=1)
    return {
        "images": images,
        "min_cosine": float(cosine.min()),
        "max_relative_l2": float(relative.max()),
        "float32_s": seconds["float32"],
        "int8_s": seconds["int8"],
        "speedup": seconds["float32"] / seconds["int8"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1,2", help="demo-task seeds (split, adapter init, batches)")
    parser.add_argument("--vit-b32-images", type=int, default=32, help="images for the ViT-B/32 embedding check")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    args = parser.parse_args()
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    import torch

    torch.set_num_threads(args.threads)
    sys.path.insert(0, str(ROOT / "bench"))
    from local_training import write_vit_b32

    report: dict[str, Any] = {"torch_threads": args.threads, "target_points": TARGET_POINTS}
    with tempfile.TemporaryDirectory(prefix="flora-bench-") as tmp:
        log("pre-training the tiny CLIP (both-towers LoRA, 3 epochs, merged)")
        tiny = pretrained_tiny(Path(tmp) / "tiny-pretrained")
        runs = []
        for seed in [int(s) for s in args.seeds.split(",") if s.strip()]:
            log(f"demo task, seed {seed}")
            runs.append(demo_task(seed, tiny))
        gaps = [r["accuracy_gap_points"] for r in runs]
        report["demo_task"] = {
            "recipe": "paper",
            "runs": runs,
            "max_gap_points": max(gaps),
            "median_gap_points": statistics.median(gaps),
            "within_target": max(gaps) <= TARGET_POINTS,
        }
        if args.vit_b32_images > 0:
            log("ViT-B/32 embeddings, float32 and int8")
            report["vit_b32_embeddings"] = vit_b32_embeddings(args.vit_b32_images, write_vit_b32(Path(tmp) / "b32"))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
