"""Which examples a round trains on, and in what order: the round's batches as index arrays.

A whole number of local epochs (the protocol's `local_epochs`): each epoch is a fresh permutation of the local data,
drawn from a generator seeded by (device seed, round), so a round is reproducible on its own.

A fraction of an epoch (protocol 1.3's `round_epochs`, e.g. 0.25): under label skew a client drifts towards its own
classes the longer it trains between aggregations, so the same total epochs spread over more, shorter rounds keeps
the clients' models closer together (FedAvg with one step a round is plain large-batch SGD on the pooled data). The
rounds then walk one stream of batches: epoch e of the stream is a permutation seeded by (device seed, e), and round
r takes the stream's batches from floor((r-1) x f x S) to floor(r x f x S), S being the batches per epoch. Every
example is seen once per 1/f rounds the device takes part in, and the total over the run is exactly
rounds x f epochs, whatever the local data size; only the round number is needed, so a restarted device continues
where the stream was. A round always takes at least one batch (a device with less than one batch per round trains
a little more than asked rather than sending an update it did not train).
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np

_STREAM = 0x5EED  # keeps the stream's permutations apart from the whole-epoch ones of the same seed


def round_batches(num_examples: int, batch_size: int, epochs: float, seed: int, round_: int) -> list[np.ndarray]:
    """The index arrays of round `round_`'s batches (rounds count from 1)."""
    if num_examples < 1 or batch_size < 1 or not epochs > 0:
        raise ValueError(f"cannot plan a round of {epochs} epochs over {num_examples} examples at batch {batch_size}")
    if float(epochs).is_integer():
        rng = np.random.default_rng([seed, round_])
        return [
            order[start : start + batch_size]
            for order in (rng.permutation(num_examples) for _ in range(int(epochs)))
            for start in range(0, num_examples, batch_size)
        ]
    per_epoch = math.ceil(num_examples / batch_size)
    per_round = Fraction(repr(float(epochs))) * per_epoch  # exact: 0.1 x 30 batches is 3, not 3.0000000000000004
    position = max(round_ - 1, 0)
    first = math.floor(position * per_round)
    last = max(math.floor((position + 1) * per_round), first + 1)
    orders: dict[int, np.ndarray] = {}
    batches = []
    for index in range(first, last):
        epoch, within = divmod(index, per_epoch)
        if epoch not in orders:
            orders[epoch] = np.random.default_rng([seed, _STREAM, epoch]).permutation(num_examples)
        batches.append(orders[epoch][within * batch_size : (within + 1) * batch_size])
    return batches
