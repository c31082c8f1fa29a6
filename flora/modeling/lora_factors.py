"""Pure NumPy helpers on LoRA factors, shared by the coordinator (aggregation) and the clients
(starting a lower-rank client from the global adapter). A is [r, in], B is [out, r]."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

A_MARK, B_MARK = ".lora_A.", ".lora_B."


def lora_pairs(names: Sequence[str]) -> dict[str, tuple[str, str]]:
    """Module prefix -> (A tensor name, B tensor name), for every complete pair in `names`."""
    pairs = {}
    for name in names:
        if A_MARK in name:
            prefix = name.split(A_MARK)[0]
            b_name = name.replace(A_MARK, B_MARK)
            if b_name in names:
                pairs[prefix] = (name, b_name)
    return pairs


def truncate(B: np.ndarray, A: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """The global adapter cut to a client's smaller rank: the leading components carry most energy."""
    return B[:, :rank], A[:rank, :]


def fit_to_rank(tensors: dict[str, np.ndarray], rank: int) -> dict[str, np.ndarray]:
    """The global adapter as a rank-`rank` client starts from: its best rank-`rank` approximation.

    PEFT scales a rank-r adapter by alpha/r, so keeping the update (alpha/R) B A equal means the
    truncated factors carry sqrt(r/R) each. Leading components first: SVDLoRA orders them by
    singular value.
    """
    out = dict(tensors)
    for a_name, b_name in lora_pairs(list(tensors)).values():
        global_rank = tensors[a_name].shape[0]
        if rank > global_rank:
            raise ValueError(f"client rank {rank} exceeds the global rank {global_rank}")
        factor = np.sqrt(rank / global_rank)
        B, A = truncate(np.asarray(tensors[b_name]), np.asarray(tensors[a_name]), rank)
        out[a_name], out[b_name] = (A * factor).astype(np.float32), (B * factor).astype(np.float32)
    return out
