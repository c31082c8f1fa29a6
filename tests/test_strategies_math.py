"""Every strategy's math against numbers worked out by hand, plus wrappers and LoRA-aware aggregation."""

from __future__ import annotations

import numpy as np
import pytest

from flora.algorithms import (
    CentralDP,
    ClientUpdate,
    FedAdam,
    FedAvg,
    FFALoRA,
    Median,
    NormClipping,
    SVDLoRA,
    TrimmedMean,
    make_strategy,
)
from flora.algorithms.dp import clip_update
from flora.algorithms.fedopt import fedadam_step, fedavgm_step, fedyogi_step
from flora.algorithms.lora import AggregationErrorMeter, naive_aggregation_error, refactorize
from flora.algorithms.robust import coordinate_median, trimmed_mean
from flora.modeling.lora_factors import fit_to_rank, truncate


def run(strategy, global_tensors, updates):
    strategy.begin(1, global_tensors)
    for i, (tensors, n) in enumerate(updates):
        strategy.accumulate(ClientUpdate(f"c{i}", 1, tensors, n))
    return strategy.aggregate()


def test_fedavgm_step_by_hand():
    # v = 0.9 * 0.2 + 0.5 = 0.68 ; w = 1 + 1 * 0.68 = 1.68
    w, v = fedavgm_step(np.array(1.0), np.array(0.5), np.array(0.2), lr=1.0, beta=0.9)
    assert (w, v) == pytest.approx((1.68, 0.68))


def test_fedadam_and_fedyogi_steps_by_hand():
    kw = dict(lr=0.01, beta1=0.9, beta2=0.99, tau=1e-3)
    # step 1 from zero moments, delta 0.1: m = 0.01, v = 0.0001, w = 0.01 * 0.01 / (0.01 + 0.001)
    w, m, v = fedadam_step(np.array(0.0), np.array(0.1), np.array(0.0), np.array(0.0), **kw)
    assert (m, v, w) == pytest.approx((0.01, 1e-4, 0.01 * 0.01 / 0.011))
    w, m, v = fedyogi_step(np.array(0.0), np.array(0.1), np.array(0.0), np.array(0.0), **kw)
    assert v == pytest.approx(1e-4)  # 0 - 0.01 * 0.01 * sign(0 - 0.01) = +0.0001
    # from v = 0.0004: Adam v = 0.99 * 0.0004 + 0.01 * 0.01 = 0.000496 ; Yogi v = 0.0004 + 0.0001 = 0.0005
    _, _, v_adam = fedadam_step(np.array(0.0), np.array(0.1), np.array(0.0), np.array(4e-4), **kw)
    _, _, v_yogi = fedyogi_step(np.array(0.0), np.array(0.1), np.array(0.0), np.array(4e-4), **kw)
    assert (v_adam, v_yogi) == pytest.approx((4.96e-4, 5e-4))


def test_server_optimizer_state_survives_a_restart():
    g = {"w": np.zeros(3, np.float32)}
    updates = [({"w": np.array([0.1, -0.2, 0.3])}, 5)]
    uninterrupted = FedAdam()
    first = run(uninterrupted, g, updates)
    expected = run(uninterrupted, first, updates)
    before = FedAdam()
    first_again = run(before, g, updates)
    after = FedAdam()
    after.load_state_dict(before.state_dict())  # what a checkpoint carries across a crash
    np.testing.assert_allclose(run(after, first_again, updates)["w"], expected["w"])


def test_median_and_trimmed_mean_by_hand():
    stacked = np.array([[1.0, 5.0], [2.0, -1.0], [10.0, 0.0]])
    np.testing.assert_allclose(coordinate_median(stacked), [2.0, 0.0])
    np.testing.assert_allclose(trimmed_mean(np.array([[1.0], [2.0], [3.0], [4.0], [100.0]]), 0.2), [3.0])
    with pytest.raises(ValueError, match="leaves nothing"):
        trimmed_mean(np.ones((2, 1)), 0.5)


def test_robust_strategies_ignore_one_scaled_attacker():
    g = {"w": np.zeros(2, np.float32)}
    honest = [({"w": np.array([1.0, 1.0]) + 0.01 * i}, 10) for i in range(9)]
    poisoned = [*honest, ({"w": np.array([100.0, -100.0])}, 10)]
    assert np.abs(run(Median(), g, poisoned)["w"] - 1.04).max() < 0.02
    assert np.abs(run(TrimmedMean(0.1), g, poisoned)["w"] - 1.04).max() < 0.02
    assert np.abs(run(FedAvg(), g, poisoned)["w"]).max() > 9  # plain FedAvg is dragged far away


def test_norm_clipping_by_hand():
    clipped, norm, was = clip_update({"w": np.array([3.0, 4.0])}, {"w": np.zeros(2)}, 1.0)
    assert norm == 5.0 and was and np.allclose(clipped["w"], [0.6, 0.8])
    same, _, was = clip_update({"w": np.array([0.3, 0.4])}, {"w": np.zeros(2)}, 1.0)
    assert not was and np.allclose(same["w"], [0.3, 0.4])
    out = run(
        NormClipping(FedAvg(), max_norm=1.0),
        {"w": np.zeros(2, np.float32)},
        [({"w": np.array([3.0, 4.0])}, 1), ({"w": np.array([0.0, 0.0])}, 1)],
    )
    np.testing.assert_allclose(out["w"], [0.3, 0.4])


def test_central_dp_weights_equally_and_adds_calibrated_noise():
    g = {"w": np.zeros(20_000, np.float32)}
    updates = [({"w": np.full(20_000, 0.001)}, 1000), ({"w": np.full(20_000, -0.001)}, 1)]
    quiet = run(CentralDP(FedAvg(), clip_norm=10.0, noise_multiplier=0.0), g, updates)
    np.testing.assert_allclose(quiet["w"], 0.0, atol=1e-9)  # equal weights despite 1000 vs 1 examples
    dp = CentralDP(FedAvg(), clip_norm=0.5, noise_multiplier=2.0, seed=1)
    noisy = run(dp, g, updates)
    assert dp.round_metrics()["dp_noise_std"] == pytest.approx(2.0 * 0.5 / 2)
    assert np.std(noisy["w"]) == pytest.approx(0.5, rel=0.05)


def test_naive_aggregation_error_by_hand_and_against_dense():
    # exact = 0.5*1*2 + 0.5*3*4 = 7 ; naive = (0.5*1 + 0.5*3)(0.5*2 + 0.5*4) = 2*3 = 6 ; error = 1
    assert naive_aggregation_error(
        [np.array([[1.0]]), np.array([[3.0]])], [np.array([[2.0]]), np.array([[4.0]])], [1, 1]
    ) == pytest.approx(1.0)
    rng = np.random.default_rng(0)
    Bs = [rng.normal(size=(6, 2)) for _ in range(3)]
    As = [rng.normal(size=(2, 5)) for _ in range(3)]
    w = np.array([1.0, 2.0, 3.0]) / 6
    dense = sum(wk * B @ A for wk, B, A in zip(w, Bs, As)) - sum(wk * B for wk, B in zip(w, Bs)) @ sum(
        wk * A for wk, A in zip(w, As)
    )
    assert naive_aggregation_error(Bs, As, [1, 2, 3]) == pytest.approx(np.linalg.norm(dense), rel=1e-9)
    meter = AggregationErrorMeter({"m.lora_A.weight": As[0], "m.lora_B.weight": Bs[0]})
    for B, A, n in zip(Bs, As, [1, 2, 3]):
        meter.add({"m.lora_A.weight": A, "m.lora_B.weight": B}, n)
    assert meter.error() == pytest.approx(np.linalg.norm(dense), rel=1e-9)


def test_svd_refactorization_is_exact_at_full_rank_and_optimal_below():
    rng = np.random.default_rng(1)
    Bs = [rng.normal(size=(8, 2)), rng.normal(size=(8, 3))]  # different client ranks
    As = [rng.normal(size=(2, 7)), rng.normal(size=(3, 7))]
    target = (1 * Bs[0] @ As[0] + 3 * Bs[1] @ As[1]) / 4
    B, A = refactorize(Bs, As, [1, 3], rank=5)
    np.testing.assert_allclose(B @ A, target, atol=1e-10)
    B2, A2 = refactorize(Bs, As, [1, 3], rank=2)
    s = np.linalg.svd(target, compute_uv=False)
    assert np.linalg.norm(target - B2 @ A2) == pytest.approx(np.sqrt(np.sum(s[2:] ** 2)), rel=1e-9)  # Eckart-Young
    Bt, At = truncate(B, A, 2)
    np.testing.assert_allclose(Bt @ At, B2 @ A2, atol=1e-10)  # leading components first
    assert B2.shape == (8, 2) and A2.shape == (2, 7)


def test_svd_lora_strategy_aggregates_products_not_factors():
    rng = np.random.default_rng(2)
    g = {"x.lora_A.weight": np.zeros((2, 6), np.float32), "x.lora_B.weight": np.zeros((5, 2), np.float32)}
    ups = [
        ({"x.lora_A.weight": rng.normal(size=(2, 6)), "x.lora_B.weight": rng.normal(size=(5, 2))}, n) for n in (1, 1)
    ]
    out = run(SVDLoRA(), g, ups)
    exact = sum(u["x.lora_B.weight"] @ u["x.lora_A.weight"] for u, _ in ups) / 2
    s = np.linalg.svd(exact, compute_uv=False)
    err = np.linalg.norm(exact - out["x.lora_B.weight"] @ out["x.lora_A.weight"])
    assert err == pytest.approx(np.sqrt(np.sum(s[2:] ** 2)), rel=1e-5)
    naive = run(FedAvg(), g, ups)
    assert np.linalg.norm(exact - naive["x.lora_B.weight"] @ naive["x.lora_A.weight"]) > err


def test_ffa_lora_expects_only_b_and_keeps_a():
    g = {"x.lora_A.weight": np.ones((2, 3), np.float32), "x.lora_B.weight": np.zeros((4, 2), np.float32)}
    strategy = FFALoRA()
    assert list(strategy.expected_update(g)) == ["x.lora_B.weight"]
    assert strategy.configure_train(1, {})["client_hooks"] == [{"name": "ffa_lora", "params": {}}]
    out = run(
        strategy, g, [({"x.lora_B.weight": np.full((4, 2), 1.0)}, 1), ({"x.lora_B.weight": np.full((4, 2), 4.0)}, 3)]
    )
    np.testing.assert_allclose(out["x.lora_B.weight"], 3.25)
    np.testing.assert_array_equal(out["x.lora_A.weight"], g["x.lora_A.weight"])
    meter = AggregationErrorMeter(g)
    meter.add({"x.lora_B.weight": np.full((4, 2), 1.0)}, 1)
    meter.add({"x.lora_B.weight": np.full((4, 2), 4.0)}, 3)
    assert meter.error() == pytest.approx(0.0, abs=1e-12)  # shared A: averaging B is exact


def test_make_strategy_wraps_and_explains_bad_parameters():
    assert isinstance(make_strategy("fedavg", {"clip_norm": 2.0}), NormClipping)
    dp = make_strategy("fedadam", {"clip_norm": 1.0, "noise_multiplier": 0.5})
    assert isinstance(dp, CentralDP) and isinstance(dp.inner, FedAdam)
    with pytest.raises(ValueError, match=r"takes parameters \['mu'\]"):
        make_strategy("fedprox", {"mew": 0.1})
    with pytest.raises(ValueError, match="choose one of"):
        make_strategy("krum")
    with pytest.raises(ValueError, match="mean-based"):
        make_strategy("median", {"noise_multiplier": 1.0})


def test_clients_of_lower_rank_start_from_the_truncated_global_and_aggregate_exactly():
    rng = np.random.default_rng(3)
    alpha, R = 16.0, 4
    g = {"x.lora_A.weight": rng.normal(size=(R, 6)), "x.lora_B.weight": rng.normal(size=(5, R))}
    g_out = run(SVDLoRA(), g, [(g, 1)])  # re-factorised: components ordered by singular value
    global_update = alpha / R * g_out["x.lora_B.weight"] @ g_out["x.lora_A.weight"]
    start = fit_to_rank(g_out, 2)
    client_update = alpha / 2 * start["x.lora_B.weight"] @ start["x.lora_A.weight"]
    s = np.linalg.svd(global_update, compute_uv=False)
    # the rank-2 client starts from the best rank-2 approximation of the global update (PEFT scaling included)
    assert np.linalg.norm(global_update - client_update) == pytest.approx(np.sqrt(np.sum(s[2:] ** 2)), rel=1e-6)
    # one rank-4 and one rank-2 client: the aggregate equals the mean of their true updates
    low = {"x.lora_A.weight": rng.normal(size=(2, 6)), "x.lora_B.weight": rng.normal(size=(5, 2))}
    high = {"x.lora_A.weight": rng.normal(size=(R, 6)), "x.lora_B.weight": rng.normal(size=(5, R))}
    out = run(SVDLoRA(), g, [(low, 1), (high, 1)])
    true_mean = (
        alpha / 2 * low["x.lora_B.weight"] @ low["x.lora_A.weight"]
        + alpha / R * high["x.lora_B.weight"] @ high["x.lora_A.weight"]
    ) / 2
    got = alpha / R * out["x.lora_B.weight"] @ out["x.lora_A.weight"]
    s = np.linalg.svd(true_mean, compute_uv=False)
    assert np.linalg.norm(true_mean - got) == pytest.approx(np.sqrt(np.sum(s[R:] ** 2)), rel=1e-6)


def test_validation_accepts_a_lower_rank_only_when_the_strategy_does():
    from coordinator.validation import validate_update
    from flora.errors import ProtocolError
    from flora.protocol import Envelope, adapter_to_body

    g = {"x.lora_A.weight": np.zeros((4, 6), np.float32), "x.lora_B.weight": np.zeros((5, 4), np.float32)}
    body, meta = adapter_to_body({"x.lora_A.weight": np.ones((2, 6)), "x.lora_B.weight": np.ones((5, 2))})
    env = Envelope(kind="update", run="r", sender="c", round=1, data={"num_examples": 3}, body=body, body_meta=meta)
    kwargs = dict(topic_node="c", run_id="r", round_=1, selected={"c"}, already=set(), global_tensors=g)
    assert validate_update(env, allow_lower_rank=True, max_update_norm=100.0, **kwargs).tensors[
        "x.lora_A.weight"
    ].shape == (2, 6)
    with pytest.raises(ProtocolError, match="shape"):
        validate_update(env, **kwargs)
    body, meta = adapter_to_body({"x.lora_A.weight": np.ones((2, 6)), "x.lora_B.weight": np.ones((5, 3))})
    mixed = Envelope(kind="update", run="r", sender="c", round=1, data={"num_examples": 3}, body=body, body_meta=meta)
    with pytest.raises(ProtocolError, match="shape"):  # A and B must agree on the rank
        validate_update(mixed, allow_lower_rank=True, **kwargs)
