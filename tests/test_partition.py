import numpy as np
import pytest

from flora.data.partition import dirichlet, few_shot, iid, partition, pathological, train_test_split
from flora.errors import ConfigError

LABELS = np.repeat(np.arange(10), 50)  # 500 examples, 10 balanced classes


def assert_disjoint_cover(parts, n):
    joined = np.concatenate(parts)
    assert len(joined) == len(np.unique(joined)) == n


def label_skew(parts, labels):
    """Mean total-variation distance between each client's label distribution and the global one."""
    global_dist = np.bincount(labels, minlength=10) / len(labels)
    return np.mean([0.5 * np.abs(np.bincount(labels[p], minlength=10) / len(p) - global_dist).sum() for p in parts])


def test_iid_sizes_and_cover():
    parts = iid(LABELS, 4, seed=1)
    assert_disjoint_cover(parts, 500)
    assert [len(p) for p in parts] == [125, 125, 125, 125]


def test_dirichlet_small_beta_skews_labels_more_than_iid():
    skewed = dirichlet(LABELS, 5, beta=0.1, seed=0)
    mild = dirichlet(LABELS, 5, beta=100.0, seed=0)
    assert_disjoint_cover(skewed, 500)
    assert label_skew(skewed, LABELS) > 0.4 > 0.15 > label_skew(mild, LABELS)
    assert min(len(p) for p in skewed) >= 2


def test_partitions_are_reproducible_by_seed():
    a, b, c = (dirichlet(LABELS, 4, beta=0.5, seed=s) for s in (7, 7, 8))
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))


def test_pathological_gives_each_client_two_classes():
    parts = pathological(LABELS, 5, classes_per_client=2, seed=0)
    assert_disjoint_cover(parts, 500)
    assert all(len(np.unique(LABELS[p])) <= 2 for p in parts)


def test_few_shot_counts_per_class():
    parts = few_shot(LABELS, 3, shots=4, seed=0)
    for p in parts:
        assert np.array_equal(np.bincount(LABELS[p], minlength=10), np.full(10, 4))
    assert len(np.unique(np.concatenate(parts))) == 120
    with pytest.raises(ConfigError, match="fewer than"):
        few_shot(LABELS, 20, shots=4)


def test_stratified_split_keeps_every_class_and_is_disjoint():
    train, test = train_test_split(LABELS, 0.2, seed=0)
    assert len(np.intersect1d(train, test)) == 0 and len(train) + len(test) == 500
    assert np.array_equal(np.bincount(LABELS[test]), np.full(10, 10))


def test_bad_partition_requests_are_clear():
    with pytest.raises(ConfigError, match="unknown partitioner"):
        partition(LABELS, 2, "random")
    with pytest.raises(ConfigError, match="cannot split"):
        iid(LABELS[:3], 4)
    with pytest.raises(ConfigError, match="beta must be > 0"):
        dirichlet(LABELS, 2, beta=0)
