"""The memory budget: measured steps choose the micro-batch; gradient accumulation keeps the coordinator's batch."""

from __future__ import annotations

import math

import numpy as np
import pytest

from edge_client.cache_build import embed_images
from edge_client.memory_budget import PeakMemoryMeter, candidate_batch_sizes, images_per_chunk, plan_batches
from edge_client.trainer import LocalTrainer, TrainSettings
from flora.errors import ConfigError
from flora.modeling.loading import load_clip
from flora.modeling.recipes import get_recipe

TEMPLATE = "a photo of the digit {label}."


def test_candidates_are_the_configured_batch_then_powers_of_two_below_it():
    assert candidate_batch_sizes(32) == [32, 16, 8, 4, 2, 1]
    assert candidate_batch_sizes(48) == [48, 32, 16, 8, 4, 2, 1]
    assert candidate_batch_sizes(1) == [1]


def test_plan_takes_the_largest_batch_that_fits_and_checkpointing_only_when_needed():
    calls = []

    def measure(micro, checkpointing):  # a step's peak: 100 MB fixed + 1 MB per example, halved by checkpointing
        calls.append((micro, checkpointing))
        return 100 + micro * (0.5 if checkpointing else 1.0)

    plan = plan_batches(measure, largest=64, budget_mb=140)
    # 64 needs 164, or 132 with checkpointing: it fits with checkpointing, so no smaller batch is tried.
    assert (plan.micro_batch_size, plan.activation_checkpointing, plan.peak_mb) == (64, True, 132)
    assert calls == [(64, False), (64, True)]
    calls.clear()
    plan = plan_batches(measure, largest=64, budget_mb=140, checkpointing="off")
    assert (plan.micro_batch_size, plan.activation_checkpointing) == (32, False)
    assert calls == [(64, False), (32, False)]
    assert plan.for_batch(128) == (32, 4) and plan.for_batch(100) == (32, 4) and plan.for_batch(8) == (8, 1)
    # No budget: nothing is measured.
    calls.clear()
    assert plan_batches(measure, largest=64, budget_mb=None).micro_batch_size == 64 and not calls


def test_a_budget_below_any_step_is_a_clear_error():
    with pytest.raises(ConfigError, match=r"memory_budget_mb = 50 is too small.*batch 1.*peaks at 101 MB"):
        plan_batches(lambda micro, ckpt: 100 + micro, largest=8, budget_mb=50, checkpointing="off")
    with pytest.raises(ConfigError, match="gradient_checkpointing must be one of auto, on, off"):
        plan_batches(lambda micro, ckpt: 1.0, largest=8, budget_mb=50, checkpointing="sometimes")


def test_cpu_meter_reports_a_peak_that_resets():
    import torch

    meter = PeakMemoryMeter("cpu")
    meter.reset()
    before = meter.peak_mb()
    block = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
    grown = meter.peak_mb()
    del block
    meter.reset()
    assert meter.kind == "process_peak_rss"
    assert grown >= before + 60
    assert meter.peak_mb() < grown - 30  # the peak was reset after the block was freed


@pytest.fixture(scope="module")
def trainer(tiny_model_dir, digits):
    # both-towers: images go through the (trained) vision tower, so memory grows with the batch.
    return LocalTrainer(
        load_clip(tiny_model_dir),
        get_recipe("both-towers"),
        digits.subset(range(512)),
        max_batch_size=256,
        progress=False,
    )


def test_gradient_accumulation_gives_the_full_batch_gradient(trainer):
    idx = np.random.default_rng(0).permutation(512)[:96]
    loss_full, full = trainer.batch_gradients(idx, TEMPLATE)
    loss_micro, micro = trainer.batch_gradients(idx, TEMPLATE, micro=16)  # 6 micro-batches, gradient cache
    assert loss_micro == pytest.approx(loss_full, rel=1e-6)
    assert set(micro) == set(full) and len(full) == 36
    for name in full:
        np.testing.assert_allclose(micro[name].numpy(), full[name].numpy(), rtol=1e-4, atol=1e-6, err_msg=name)


def test_a_small_budget_picks_a_smaller_batch_and_accumulation_keeps_the_coordinators(trainer):
    full = trainer.measure_step_mb(256, False)
    small = trainer.measure_step_mb(32, False)
    assert full > small + 20  # activations of 224 more images through both towers
    budget = (full + small) / 2
    plan = trainer.fit_memory_budget(budget, "off")
    try:
        assert 32 <= plan.micro_batch_size < 256 and not plan.activation_checkpointing
        assert plan.peak_mb <= budget and plan.trials[0][0] == 256 and plan.trials[0][2] > budget
        settings = TrainSettings(local_epochs=1, learning_rate=5e-3, batch_size=256, prompt_template=TEMPLATE)
        start = {k: v.numpy() for k, v in trainer.adapter_state().items()}
        _, metrics = trainer.train_round(start, settings, round_=1)
        assert metrics["batch_size"] == 256 and metrics["micro_batch_size"] == plan.micro_batch_size
        assert metrics["accumulation_steps"] == math.ceil(256 / plan.micro_batch_size)
        assert metrics["steps"] == 2  # optimizer steps: 512 examples / the coordinator's 256, not the micro-batch
        assert metrics["peak_memory_kind"] == "process_peak_rss" and metrics["peak_memory_mb"] < full
    finally:
        trainer.fit_memory_budget(None)


def test_gradient_checkpointing_on_gives_the_same_gradients(trainer):
    idx = np.arange(0, 512, 8)
    _, plain = trainer.batch_gradients(idx, TEMPLATE)
    plan = trainer.fit_memory_budget(None, "on")
    try:
        assert plan.activation_checkpointing and trainer.clip.model.vision_model.encoder.gradient_checkpointing
        _, checkpointed = trainer.batch_gradients(idx, TEMPLATE)
    finally:
        trainer.fit_memory_budget(None)
    assert not trainer.clip.model.vision_model.encoder.gradient_checkpointing
    for name in plain:
        np.testing.assert_allclose(checkpointed[name].numpy(), plain[name].numpy(), rtol=1e-5, atol=1e-7)


def test_a_budget_below_the_model_itself_fails_at_start_with_what_to_change(trainer):
    with pytest.raises(ConfigError, match=r"memory_budget_mb = 1 is too small.*already take.*Raise memory_budget_mb"):
        trainer.fit_memory_budget(1.0)
    trainer.fit_memory_budget(None)
    with pytest.raises(ConfigError, match=r"memory_budget_mb = 50 is too small.*before any training step"):
        plan_batches(lambda micro, ckpt: 1.0, largest=8, budget_mb=50, baseline_mb=60)


def test_images_per_chunk_fills_the_room_left_and_never_goes_below_one():
    assert images_per_chunk(2000, 800, 60, 32) == 20  # (2000 - 800) // 60
    assert images_per_chunk(2000, 800, 10, 32) == 32  # never more than asked for
    assert images_per_chunk(2000, 1990, 60, 32) == 1  # no room: one at a time, the plan refuses the budget later
    assert images_per_chunk(2000, 800, 0, 32) == 32  # nothing measurable per image


def test_the_cache_build_sizes_its_chunks_by_the_budget_and_computes_the_same_embeddings(
    tiny_model_dir, digits, caplog
):
    clip = load_clip(tiny_model_dir)
    images = digits.subset(range(24)).images
    free = embed_images(clip, clip.model, images, precision="float32", chunk=16)
    with caplog.at_level("INFO", logger="edge_client.cache_build"):
        tight = embed_images(clip, clip.model, images, precision="float32", chunk=16, memory_budget_mb=1)
        roomy = embed_images(clip, clip.model, images, precision="float32", chunk=16, memory_budget_mb=1e6)
    chunks = [r.getMessage() for r in caplog.records if "a chunk within memory_budget_mb" in r.getMessage()]
    assert chunks[0].startswith("image embeddings: 1 images a chunk")  # no room: the process is over budget already
    assert chunks[1].startswith("image embeddings: 16 images a chunk")
    assert tight.shape == roomy.shape == free.shape == (24, free.shape[1])
    assert np.allclose(tight.numpy(), free.numpy(), atol=1e-5) and np.allclose(roomy.numpy(), free.numpy(), atol=1e-5)


def test_without_a_resettable_peak_the_cache_build_keeps_its_chunk(tiny_model_dir, digits, caplog, monkeypatch):
    """Where /proc/self/clear_refs cannot be written (some sandboxes) the peak is the process's lifetime one: read
    as one image's cost it would shrink every chunk to a single image, so the budget is not applied to chunks."""
    real_open = open

    def no_clear_refs(path, *args, **kwargs):
        if str(path) == "/proc/self/clear_refs":
            raise PermissionError(path)
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr("builtins.open", no_clear_refs)
    clip = load_clip(tiny_model_dir)
    images = digits.subset(range(8)).images
    with caplog.at_level("INFO", logger="edge_client.cache_build"):
        embeds = embed_images(clip, clip.model, images, precision="float32", chunk=4, memory_budget_mb=1)
    assert "cannot reset its peak memory; the cache build keeps its chunk size" in caplog.text
    assert "a chunk within memory_budget_mb" not in caplog.text
    assert embeds.shape[0] == 8
