"""Median and trimmed mean spill updates to disk: the numbers of the in-memory stack, flat RAM, no files left."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from flora.algorithms import ClientUpdate, Median, TrimmedMean, make_strategy
from flora.algorithms.robust import coordinate_median, trimmed_mean
from flora.algorithms.spill import SpilledRows

ROOT = Path(__file__).resolve().parent.parent
LAYOUT = {"a.lora_A": (2, 7), "a.lora_B": (5, 2), "scalar_like": (1,), "c": (3, 4, 2)}


def in_memory(combine, global_tensors, updates):
    """What the strategies computed before spilling: stack every update as float64, reduce, cast to float32."""
    return {
        name: combine(np.stack([np.asarray(u[name], dtype=np.float64) for u in updates])).astype(np.float32)
        for name in global_tensors
    }


def run(strategy, global_tensors, updates):
    strategy.begin(1, global_tensors)
    for i, tensors in enumerate(updates):
        strategy.accumulate(ClientUpdate(f"c{i}", 1, tensors, 10))
    return strategy.aggregate()


def random_updates(n, rng, *, ties=False):
    updates = []
    for _ in range(n):
        u = {k: rng.standard_normal(shape).astype(np.float32) for k, shape in LAYOUT.items()}
        if ties:  # few distinct values: equal middle elements, equal values across the trimming cut
            u = {k: np.round(v).astype(np.float32) for k, v in u.items()}
        updates.append(u)
    return updates


@pytest.mark.parametrize("n", [1, 2, 3, 4, 7, 10, 11])
@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("block_bytes", [8, 200, 10**6])  # one coordinate per block, a few, everything at once
def test_spilled_median_and_trimmed_mean_equal_the_in_memory_computation(n, ties, block_bytes):
    rng = np.random.default_rng(n * 7 + ties)
    g = {k: np.zeros(shape, np.float32) for k, shape in LAYOUT.items()}
    updates = random_updates(n, rng, ties=ties)
    strategies = [(Median(), coordinate_median)]
    for fraction in (0.0, 0.1, 0.2, 0.25, 0.3, 0.49):  # k = floor(fraction * n): 0, and up to n // 2 - 1
        strategies.append((TrimmedMean(fraction), lambda s, f=fraction: trimmed_mean(s, f)))
    for strategy, combine in strategies:
        strategy.block_bytes = block_bytes
        got = run(strategy, g, updates)
        expected = in_memory(combine, g, updates)
        assert set(got) == set(expected)
        for name in expected:
            assert got[name].dtype == np.float32 and got[name].shape == expected[name].shape
            assert np.array_equal(got[name], expected[name]), (strategy.name, name)


def test_float64_and_float16_updates_are_read_back_exactly():
    g = {"w": np.zeros((3, 3), np.float32)}
    rng = np.random.default_rng(0)
    updates = [{"w": rng.standard_normal((3, 3))} for _ in range(4)]  # float64: no rounding on the way to disk
    updates += [{"w": rng.standard_normal((3, 3)).astype(np.float16)} for _ in range(3)]
    for strategy, combine in ((Median(), coordinate_median), (TrimmedMean(0.2), lambda s: trimmed_mean(s, 0.2))):
        strategy.block_bytes = 64
        assert np.array_equal(run(strategy, g, updates)["w"], in_memory(combine, g, updates)["w"])


def test_rounds_reuse_the_strategy_and_a_round_without_updates_fails_clearly():
    g = {"w": np.zeros(4, np.float32)}
    median = make_strategy("median")  # the coordinator's path: built by name from the run's config
    assert np.array_equal(run(median, g, [{"w": np.full(4, float(i))} for i in range(5)])["w"], np.full(4, 2.0))
    assert np.array_equal(run(median, g, [{"w": np.full(4, 9.0)}])["w"], np.full(4, 9.0))  # round 2: fresh
    median.begin(3, g)
    with pytest.raises(ValueError, match="no accepted updates"):
        median.aggregate()


def test_memory_held_does_not_grow_with_the_number_of_clients():
    """Accumulating 200 updates of 64 KiB (float64) each must not keep them: in memory that is 12.5 MiB."""
    g = {"w": np.zeros(8192, np.float32)}
    update = {"w": np.ones(8192, np.float32)}
    strategy = TrimmedMean(0.1)
    strategy.block_bytes = 256 * 1024
    strategy.begin(1, g)
    tracemalloc.start()
    try:
        before, _ = tracemalloc.get_traced_memory()
        for i in range(200):
            strategy.accumulate(ClientUpdate(f"c{i}", 1, update, 10))
        held, _ = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        out = strategy.aggregate()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert np.array_equal(out["w"], np.ones(8192, np.float32))
    assert held - before < 1024 * 1024  # a file position and a counter, not 200 updates
    assert peak - before < 4 * 256 * 1024 + 8192 * 4 * 4  # a block and its sorted copy, plus the result


def test_the_spill_file_is_never_visible_and_is_gone_when_the_process_dies(tmp_path):
    spill = SpilledRows({"w": (1000,)}, directory=str(tmp_path))
    spill.append({"w": np.ones(1000)})
    assert spill.rows == 1 and os.listdir(tmp_path) == []  # unlinked at creation: a crash cannot leave it
    spill.close()
    # A coordinator killed in the middle of a round: the directory stays empty, nothing to prune afterwards.
    script = textwrap.dedent(
        f"""
        import os, numpy as np
        from flora.algorithms import ClientUpdate, Median
        m = Median(); m.spill_dir = {str(tmp_path)!r}
        m.begin(1, {{"w": np.zeros(4096, np.float32)}})
        for i in range(50):
            m.accumulate(ClientUpdate(str(i), 1, {{"w": np.ones(4096, np.float32)}}, 1))
        print(len(os.listdir({str(tmp_path)!r})), flush=True)
        os.kill(os.getpid(), 9)
        """
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == -9 and proc.stdout.strip() == "0"
    assert os.listdir(tmp_path) == []
