"""Does a faster image cache change what training learns? int8, bfloat16, ONNX int8 against float32 (issue 15).

    .venv/bin/python bench/cache_precision.py > cache_precision.json
    .venv/bin/python bench/cache_precision.py --seeds 0,1,2 --vit-b32-images 32 --precisions int8,bfloat16
    .venv/bin/python bench/cache_precision.py --seeds $(seq -s, 0 39) --precisions bfloat16,int8,onnx-int8 \
        --noise-control 0.016
    # the defaults (bfloat16 only where the CPU has AMX or AVX512-BF16)

Two measurements, side by side in one run:
- the demo task (`flora demo`'s: scikit-learn digits, the tiny CLIP, the prompt "a photo of the digit {label}.",
  80/20 split), the paper recipe, one round of 2 local epochs at the demo's learning rate, from the same start
  and seed, once with the image cache in float32 and once in each faster precision (`cache_precision`): the
  trained model's held-out accuracy (evaluated through the fp32 vision tower, as deployment would), per seed,
  and each precision's gap to float32.
  The paper recipe trains only the text tower, so on the tiny CLIP's random vision tower it stays near chance
  (10%) and the comparison would say little: the base is first "pre-trained" (the demo's `both-towers` LoRA,
  3 epochs on the training split, merged into the weights and saved), standing in for a real CLIP checkpoint;
- the embeddings themselves on the ViT-B/32 architecture (CLIPConfig() defaults, random weights): the cosine and
  the relative L2 error of each precision's rows against the float32 ones, and the build time of each (single
  thread).

Per precision over the seeds: the worst and median gap to float32, and the mean of the signed per-seed gaps with
its 95% confidence interval (`mean_with_ci95`: why the mean is the measure of "equal accuracy"), and the rows'
median relative L2 error to float32's on the demo task.

Trials beside the precisions: `--noise-control` (float32 rows moved by random noise of a chosen size) and
`--mean-correction K,...` (bfloat16 rows less their mean difference from the float32 rows of the first K training
images, as embedding K images in float32 as well would measure it: is bfloat16's shift of the result systematic?).

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


def default_precisions() -> str:
    from edge_client.cache_build import cpu_has_bf16

    return "int8,bfloat16" if cpu_has_bf16() else "int8"


NOISE = "float32+noise"  # the control: float32 rows, each moved by a random vector of a chosen relative size


def perturb(rows: Any, relative: float, seed: int) -> None:
    """Move each row, in place, by a random direction of L2 norm `relative` x the row's norm."""
    import torch

    noise = torch.randn(rows.shape, generator=torch.Generator().manual_seed(seed), dtype=rows.dtype)
    rows += noise / noise.norm(dim=1, keepdim=True) * rows.norm(dim=1, keepdim=True) * relative


MEAN_CORRECTED = "bfloat16-mean{}"  # the trial: bfloat16 rows less their mean error, measured on k images


def correct_mean(rows: Any, exact: Any, images: int) -> None:
    """Move `rows` (normalised embeddings), in place, by the mean of `exact - rows` over their first `images` rows
    (what embedding those images in float32 as well would measure), then normalise them again."""
    shift = (exact[:images] - rows[:images]).mean(dim=0)
    rows += shift
    rows /= rows.norm(dim=1, keepdim=True)


def mean_with_ci95(values: list[float]) -> tuple[float, float]:
    """The mean of paired per-seed differences and the half-width of its 95% confidence interval (Student's t).

    Why a mean, not only the worst seed: one test image is 0.28 point, and a perturbation of the embeddings as
    small as bfloat16's moves a seed's result by an image or two either way (a random one of that size too), so
    the worst of N seeds grows with N whatever the method; the mean difference is what "equal accuracy" can be
    measured as, and its interval says whether enough seeds were run to tell.
    """
    from scipy.stats import t as student_t  # scikit-learn's dependency, there with the digits data

    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, float("inf")
    t = float(student_t.ppf(0.975, len(values) - 1))
    return mean, t * statistics.stdev(values) / len(values) ** 0.5


def cache_precision_of(run: str) -> str:
    """The `cache_precision` a run of the demo task builds its cache at (the trials start from float32 or bfloat16)."""
    if run == NOISE:
        return "float32"
    return "bfloat16" if run.startswith("bfloat16-mean") else run


def demo_task(
    seed: int, model_dir: Path, precisions: list[str], noise: float = 0.0, mean_correction: tuple[int, ...] = ()
) -> dict[str, Any]:
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
    trials = [*([NOISE] if noise else []), *(MEAN_CORRECTED.format(k) for k in mean_correction)]
    exact = None
    for precision in ("float32", *precisions, *trials):
        clip = load_clip(model_dir)
        started = time.perf_counter()
        trainer = LocalTrainer(
            clip,
            get_recipe("paper"),
            train,
            seed=seed,
            max_batch_size=32,
            progress=False,
            cache_precision=cache_precision_of(precision),
        )
        build_s = time.perf_counter() - started
        if precision == "float32":
            exact = trainer.image_embeds.clone()
        if precision == NOISE:
            perturb(trainer.image_embeds, noise, seed)
        if precision.startswith("bfloat16-mean"):
            correct_mean(trainer.image_embeds, exact, int(precision.removeprefix("bfloat16-mean")))
        if precision != "float32":  # the rows this run trains on, against float32's
            relative = (trainer.image_embeds - exact).norm(dim=1) / exact.norm(dim=1)
            out.setdefault("relative_l2", {})[precision] = {
                "median": float(relative.median()),
                "max": float(relative.max()),
            }
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
    exact = out["float32"]["test_accuracy"]
    compared = [*precisions, *trials]
    out["accuracy_gap_points"] = {p: 100 * abs(out[p]["test_accuracy"] - exact) for p in compared}
    out["signed_gap_points"] = {p: 100 * (out[p]["test_accuracy"] - exact) for p in compared}
    return out


def vit_b32_embeddings(images: int, model_dir: Path, precisions: list[str]) -> dict[str, Any]:
    import torch

    from edge_client.cache_build import embed_images
    from flora.modeling.loading import load_clip

    sys.path.insert(0, str(ROOT / "bench"))
    from local_training import synthetic_data

    data = synthetic_data(images)
    clip = load_clip(model_dir)
    rows, seconds = {}, {}
    # fp32 first untimed (first-touch of the weights, kernel set-up), then fp32 and each precision in turn, twice,
    # keeping each one's faster build: a shared machine's load moves under a single timing.
    embed_images(clip, clip.model, data.images, precision="float32", chunk=32)
    out: dict[str, Any] = {"images": images}
    onnx_tower = None
    if "onnx-int8" in precisions:  # its file, a one-off per base model, built apart and timed apart
        from edge_client.onnx_vision import OnnxVisionTower

        onnx_tower = OnnxVisionTower(clip, clip.model, None, model_key="bench")
        out["onnx-int8_file_build_s"] = onnx_tower.build_seconds
    for _ in range(2):
        for precision in ("float32", *precisions):
            started = time.perf_counter()
            rows[precision] = embed_images(
                clip, clip.model, data.images, precision=precision, chunk=32, onnx_tower=onnx_tower
            )
            seconds[precision] = min(seconds.get(precision, float("inf")), time.perf_counter() - started)
    if onnx_tower is not None:
        onnx_tower.close()
    exact = rows["float32"]
    out["float32_s"] = seconds["float32"]
    for precision in precisions:
        fast = rows[precision]
        cosine = torch.nn.functional.cosine_similarity(fast, exact, dim=1)
        relative = (fast - exact).norm(dim=1) / exact.norm(dim=1)
        out[precision] = {
            "min_cosine": float(cosine.min()),
            "max_relative_l2": float(relative.max()),
            "build_s": seconds[precision],
            "speedup": seconds["float32"] / seconds[precision],
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1,2", help="demo-task seeds (split, adapter init, batches)")
    parser.add_argument("--vit-b32-images", type=int, default=32, help="images for the ViT-B/32 embedding check")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument(
        "--precisions",
        default=None,
        help="faster precisions to compare with float32 (default: int8, and bfloat16 "
        "where the CPU has AMX or AVX512-BF16)",
    )
    parser.add_argument(
        "--noise-control",
        type=float,
        default=0.0,
        help="also train on float32 rows each moved by a random vector of this relative L2 size (0: off), to see "
        "what gap an error of that size, in no particular direction, makes (bfloat16's: 0.0043)",
    )
    parser.add_argument(
        "--mean-correction",
        default="",
        help="also train on bfloat16 rows less the mean bfloat16-vs-float32 difference measured on the first K "
        "training images, for each K of this comma-separated list (a trial, not a cache precision)",
    )
    args = parser.parse_args()
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    import torch

    torch.set_num_threads(args.threads)
    sys.path.insert(0, str(ROOT / "bench"))
    from local_training import write_vit_b32

    from edge_client.cache_build import resolve_cache_precision

    precisions = [p.strip() for p in (args.precisions or default_precisions()).split(",") if p.strip()]
    mean_correction = tuple(int(k) for k in args.mean_correction.split(",") if k.strip())
    if mean_correction and "bfloat16" not in precisions:
        parser.error("--mean-correction corrects bfloat16 rows: add bfloat16 to --precisions")
    for precision in precisions:  # refused here, with the reason, rather than after the pre-training
        resolve_cache_precision(precision, device="cpu", autocast_dtype=None, quantized=False)
    report: dict[str, Any] = {"torch_threads": args.threads, "target_points": TARGET_POINTS, "precisions": precisions}
    with tempfile.TemporaryDirectory(prefix="flora-bench-") as tmp:
        log("pre-training the tiny CLIP (both-towers LoRA, 3 epochs, merged)")
        tiny = pretrained_tiny(Path(tmp) / "tiny-pretrained")
        runs = []
        for seed in [int(s) for s in args.seeds.split(",") if s.strip()]:
            log(f"demo task, seed {seed}")
            runs.append(demo_task(seed, tiny, precisions, args.noise_control, mean_correction))
        report["demo_task"] = {"recipe": "paper", "runs": runs, "noise_control": args.noise_control}
        trials = [*([NOISE] if args.noise_control else []), *(MEAN_CORRECTED.format(k) for k in mean_correction)]
        for precision in [*precisions, *trials]:
            gaps = [r["accuracy_gap_points"][precision] for r in runs]
            signed = [r["signed_gap_points"][precision] for r in runs]
            mean, half_width = mean_with_ci95(signed)
            report["demo_task"][precision] = {
                "max_gap_points": max(gaps),
                "median_gap_points": statistics.median(gaps),
                "every_seed_within_target": max(gaps) <= TARGET_POINTS,
                "mean_gap_points": mean,
                "mean_gap_ci95_points": half_width,
                "mean_within_target": abs(mean) + half_width <= TARGET_POINTS,
                "median_relative_l2": statistics.median(r["relative_l2"][precision]["median"] for r in runs),
            }
        if args.vit_b32_images > 0:
            log(f"ViT-B/32 embeddings, float32 and {', '.join(precisions)}")
            model = write_vit_b32(Path(tmp) / "b32")
            report["vit_b32_embeddings"] = vit_b32_embeddings(args.vit_b32_images, model, precisions)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
