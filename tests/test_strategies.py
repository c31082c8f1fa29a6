import numpy as np
import pytest

from flora.algorithms import ClientUpdate, FedAvg, weighted_mean


def test_weighted_mean_matches_hand_computed_numbers():
    # (1*10 + 4*30) / 40 = 3.25 ; (2*10 + 0*30) / 40 = 0.5 ; (-1*10 + 1*30)/40 = 0.5
    a = {"w": np.array([1.0, 2.0]), "b": np.array([-1.0])}
    b = {"w": np.array([4.0, 0.0]), "b": np.array([1.0])}
    out = weighted_mean([(a, 10), (b, 30)])
    np.testing.assert_allclose(out["w"], [3.25, 0.5])
    np.testing.assert_allclose(out["b"], [0.5])
    assert out["w"].dtype == np.float32


def test_weighted_mean_rejects_bad_weights():
    with pytest.raises(ValueError):
        weighted_mean([({"w": np.ones(1)}, 0)])
    with pytest.raises(ValueError):
        weighted_mean([])


def test_fedavg_streams_to_the_same_result_as_the_pure_function():
    rng = np.random.default_rng(0)
    global_tensors = {"A": np.zeros((2, 3), np.float32), "B": np.zeros((3, 2), np.float32)}
    clients = [({k: rng.normal(size=v.shape) for k, v in global_tensors.items()}, int(n)) for n in (5, 17, 3)]
    strategy = FedAvg()
    strategy.begin(1, global_tensors)
    for i, (tensors, n) in enumerate(clients):
        strategy.accumulate(ClientUpdate(f"c{i}", 1, tensors, n))
    streamed = strategy.aggregate()
    expected = weighted_mean(clients)
    for name in global_tensors:
        np.testing.assert_allclose(streamed[name], expected[name], rtol=1e-6)


def test_fedavg_with_no_updates_refuses_to_aggregate():
    strategy = FedAvg()
    strategy.begin(1, {"w": np.zeros(1, np.float32)})
    with pytest.raises(ValueError, match="no accepted updates"):
        strategy.aggregate()
