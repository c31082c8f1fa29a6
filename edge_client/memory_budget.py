"""Fit local training into a memory budget by measuring, not guessing.

`PeakMemoryMeter` reads the peak since its last reset: on a GPU, the most memory PyTorch had
allocated (`torch.cuda.max_memory_allocated`); on CPU, the process's peak resident set (Linux
`VmHWM`, reset through `/proc/self/clear_refs`, after handing freed heap back to the OS so that
an earlier, larger step does not count against a later one).

`plan_batches` runs real training steps (forward and backward, no optimizer update) at candidate
micro-batch sizes, largest first (the configured batch size, then the powers of two below it), first
without and then with activation checkpointing, and keeps the first that fits. The trainer reaches
the coordinator's batch size by accumulating gradients over micro-batches, so the budget changes
how a step is computed, not what it computes.
"""

from __future__ import annotations

import logging
import math
import resource
from collections.abc import Callable
from dataclasses import dataclass

from flora.errors import ConfigError
from flora.heap import release_freed_memory

log = logging.getLogger(__name__)

CHECKPOINTING_MODES = ("auto", "on", "off")


def _status_kib(key: str) -> int | None:
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


class PeakMemoryMeter:
    """Peak memory since `reset()`: CUDA allocations on a GPU, resident set size on CPU."""

    def __init__(self, device: str):
        self.device = device
        self.cuda = device.startswith("cuda")
        self.kind = "cuda_max_allocated" if self.cuda else "process_peak_rss"

    def reset(self, *, collect: bool = True) -> None:
        if self.cuda:
            import torch

            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        release_freed_memory(collect)
        try:
            with open("/proc/self/clear_refs", "w") as handle:
                handle.write("5")  # Linux: reset the peak RSS (VmHWM) to the current RSS
        except OSError:
            # Not Linux, or not allowed: the lifetime peak is all there is. It can only overstate a
            # step's need, so a budget planned on it errs on the safe side.
            self.kind = "process_peak_rss_lifetime"

    def current_mb(self) -> float:
        if self.cuda:
            import torch

            return torch.cuda.memory_allocated(self.device) / 2**20
        rss = _status_kib("VmRSS")
        return rss / 1024 if rss is not None else self.peak_mb()

    def peak_mb(self) -> float:
        if self.cuda:
            import torch

            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        hwm = _status_kib("VmHWM") if self.kind == "process_peak_rss" else None
        if hwm is not None:
            return hwm / 1024
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


@dataclass(frozen=True)
class BatchPlan:
    """How a step is computed: micro-batches of `micro_batch_size`, activation checkpointing or not."""

    micro_batch_size: int
    activation_checkpointing: bool
    budget_mb: float | None = None
    peak_mb: float | None = None  # measured peak of one step with this plan (None when there was no budget)
    trials: tuple[tuple[int, bool, float], ...] = ()  # (micro batch, checkpointing, measured peak MB), in order

    def for_batch(self, effective_batch: int) -> tuple[int, int]:
        """(micro batch, accumulation steps) that together make `effective_batch`."""
        micro = max(1, min(self.micro_batch_size, effective_batch))
        return micro, math.ceil(effective_batch / micro)


def images_per_chunk(budget_mb: float, in_use_mb: float, per_image_mb: float, largest: int) -> int:
    """How many images one inference chunk may hold for its peak to stay within `budget_mb`.

    `per_image_mb`, measured on a chunk of one image, also carries what any chunk costs once (buffers a
    quantized layer dequantizes into), so the answer errs small. At least 1: an image has to be embedded, and
    a budget too small for even that is the training plan's to refuse, with the fix in its message.
    """
    room = budget_mb - in_use_mb
    if per_image_mb <= 0:
        return largest
    return max(1, min(largest, int(room // per_image_mb)))


def candidate_batch_sizes(largest: int) -> list[int]:
    """`largest`, then the powers of two below it, down to 1."""
    if largest < 1:
        raise ValueError(f"largest batch must be >= 1, got {largest}")
    sizes = [largest]
    power = 1 << (largest.bit_length() - 1)
    if power == largest:
        power //= 2
    while power >= 1:
        sizes.append(power)
        power //= 2
    return sizes


def plan_batches(
    measure: Callable[[int, bool], float],
    *,
    largest: int,
    budget_mb: float | None,
    checkpointing: str = "auto",
    baseline_mb: float | None = None,
) -> BatchPlan:
    """The largest micro-batch (and checkpointing choice) whose measured step peak fits `budget_mb`.

    `measure(micro_batch, checkpointing)` runs one training step and returns its peak memory in MB.
    With no budget nothing is measured: the largest batch, checkpointing only if it is forced on.
    `baseline_mb`, the memory in use before any step, fails a budget it already exceeds without measuring.
    """
    if checkpointing not in CHECKPOINTING_MODES:
        choices = ", ".join(CHECKPOINTING_MODES)
        raise ConfigError(f"gradient_checkpointing must be one of {choices}, got {checkpointing!r}")
    if budget_mb is None:
        return BatchPlan(largest, checkpointing == "on")
    if baseline_mb is not None and baseline_mb >= budget_mb:
        raise ConfigError(
            f"memory_budget_mb = {budget_mb:g} is too small: the model, the data and the runtime already take "
            f"{baseline_mb:.0f} MB before any training step. Raise memory_budget_mb, or lower the base model's "
            "footprint (quantization = '4bit')."
        )
    modes = {"auto": (False, True), "on": (True,), "off": (False,)}[checkpointing]
    trials: list[tuple[int, bool, float]] = []
    for micro in candidate_batch_sizes(largest):
        for ckpt in modes:
            peak = measure(micro, ckpt)
            trials.append((micro, ckpt, peak))
            log.info(
                "memory budget %.0f MB: batch %d%s needs %.0f MB%s",
                budget_mb,
                micro,
                " with activation checkpointing" if ckpt else "",
                peak,
                "" if peak <= budget_mb else " (too much)",
            )
            if peak <= budget_mb:
                return BatchPlan(micro, ckpt, budget_mb, peak, tuple(trials))
    smallest = min(trials, key=lambda t: t[2])
    raise ConfigError(
        f"memory_budget_mb = {budget_mb:g} is too small: the leanest training step measured (batch {smallest[0]}"
        f"{', activation checkpointing on' if smallest[1] else ''}) peaks at {smallest[2]:.0f} MB. Raise "
        "memory_budget_mb, or lower the base model's footprint (quantization = '4bit'), or allow "
        "gradient_checkpointing = 'auto'."
    )
