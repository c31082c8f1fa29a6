"""Split a labelled dataset across clients: IID, Dirichlet non-IID, pathological, few-shot.

Pure functions of (labels, clients, seed) returning one sorted index array per client, so a
partition is reproducible and testable without images.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from flora.errors import ConfigError

PARTITIONERS = ("iid", "dirichlet", "pathological", "few-shot")


def _check(labels: np.ndarray, num_clients: int) -> None:
    if num_clients < 1:
        raise ConfigError(f"num_clients must be >= 1, got {num_clients}")
    if len(labels) < num_clients:
        raise ConfigError(f"cannot split {len(labels)} examples across {num_clients} clients")


def iid(labels: Sequence[int], num_clients: int, *, seed: int = 0) -> list[np.ndarray]:
    labels = np.asarray(labels)
    _check(labels, num_clients)
    order = np.random.default_rng(seed).permutation(len(labels))
    return [np.sort(part) for part in np.array_split(order, num_clients)]


def dirichlet(
    labels: Sequence[int], num_clients: int, *, beta: float = 0.5, seed: int = 0, min_size: int = 2
) -> list[np.ndarray]:
    """Per class, draw client shares from Dir(beta): small beta, strong label skew.

    Redraws (up to 100 times) until every client holds at least `min_size` examples, the usual
    remedy for empty clients at small beta.
    """
    labels = np.asarray(labels)
    _check(labels, num_clients)
    if beta <= 0:
        raise ConfigError(f"dirichlet beta must be > 0, got {beta}")
    if min_size * num_clients > len(labels):
        raise ConfigError(f"min_size {min_size} x {num_clients} clients exceeds {len(labels)} examples")
    rng = np.random.default_rng(seed)
    for _ in range(100):
        parts: list[list[int]] = [[] for _ in range(num_clients)]
        for cls in np.unique(labels):
            members = rng.permutation(np.flatnonzero(labels == cls))
            shares = rng.dirichlet(np.full(num_clients, beta))
            cuts = (np.cumsum(shares) * len(members)).astype(int)[:-1]
            for client, chunk in enumerate(np.split(members, cuts)):
                parts[client].extend(chunk.tolist())
        if min(len(p) for p in parts) >= min_size:
            return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]
    raise ConfigError(
        f"could not give every client {min_size} examples with beta={beta}; raise beta or use fewer clients"
    )


def pathological(
    labels: Sequence[int], num_clients: int, *, classes_per_client: int = 2, seed: int = 0
) -> list[np.ndarray]:
    """Each client sees only `classes_per_client` classes (shards of label-sorted data)."""
    labels = np.asarray(labels)
    _check(labels, num_clients)
    rng = np.random.default_rng(seed)
    shards_total = num_clients * classes_per_client
    order = np.argsort(labels, kind="stable")
    shards = np.array_split(order, shards_total)
    shard_ids = rng.permutation(shards_total)
    return [
        np.sort(np.concatenate([shards[s] for s in shard_ids[c * classes_per_client : (c + 1) * classes_per_client]]))
        for c in range(num_clients)
    ]


def few_shot(labels: Sequence[int], num_clients: int, *, shots: int = 16, seed: int = 0) -> list[np.ndarray]:
    """IID few-shot: each client gets `shots` examples per class (disjoint across clients)."""
    labels = np.asarray(labels)
    _check(labels, num_clients)
    rng = np.random.default_rng(seed)
    parts: list[list[int]] = [[] for _ in range(num_clients)]
    for cls in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == cls))
        if len(members) < shots * num_clients:
            raise ConfigError(
                f"class {cls} has {len(members)} examples, fewer than {shots} shots x {num_clients} clients"
            )
        for client in range(num_clients):
            parts[client].extend(members[client * shots : (client + 1) * shots].tolist())
    return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]


def partition(labels: Sequence[int], num_clients: int, method: str, *, seed: int = 0, **kwargs) -> list[np.ndarray]:
    funcs = {"iid": iid, "dirichlet": dirichlet, "pathological": pathological, "few-shot": few_shot}
    if method not in funcs:
        raise ConfigError(f"unknown partitioner {method!r}; choose one of: {', '.join(PARTITIONERS)}")
    return funcs[method](labels, num_clients, seed=seed, **kwargs)


def train_test_split(labels: Sequence[int], test_fraction: float, *, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Stratified held-out split: the test set keeps the label distribution of the whole."""
    if not 0 < test_fraction < 1:
        raise ConfigError(f"test_fraction must be in (0, 1), got {test_fraction}")
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    test: list[int] = []
    for cls in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == cls))
        test.extend(members[: max(1, round(len(members) * test_fraction))].tolist())
    test_idx = np.sort(np.asarray(test, dtype=np.int64))
    train_idx = np.setdiff1d(np.arange(len(labels)), test_idx)
    return train_idx, test_idx
