"""Quantize a checkpoint while reading it a tensor at a time, so loading holds one float tensor, not the file.

transformers quantizes on load (`from_pretrained(..., quantization_config=...)`) one tensor at a time already,
but it reads a safetensors checkpoint through a memory map: every page the quantizer reads stays mapped and
resident until the load ends, and the weights it leaves unquantized (embeddings, LayerNorms) stay views of the
map after it. A load therefore peaks at the runtime plus the whole file plus the quantized model, or more: 2.5-3.8
GB for CLIP ViT-L/14 stored in float32 (1.7 GB file), against ~0.8 GB for everything the 4-bit model keeps.

`streamed_checkpoint` gives transformers the same lazy tensor slices it builds itself, from safetensors'
`safe_open`, but opened with `backend="pread"`: each slice is read from the file into memory of its own only
when transformers materializes it, which it does one tensor at a time, and quantizes (sync, no thread pool, for
on-the-fly quantization), so a float tensor is freed before the next is read. The slices are handed over through
`from_pretrained(None, config=..., state_dict=...)`, the public way to load from tensors one already has
(documented for tensors: lazy slices work because transformers materializes every value with `value[...]`, as
it does its own; should a release stop accepting them, `flora.modeling.loading` falls back to the mapped load
with a warning, and tests/test_streamed_loading.py fails). It is
the same loader, quantizer and key handling as a load from the directory, only the bytes arrive by `pread`
instead of page faults, so the result is bit for bit the same (tests/test_streamed_loading.py). transformers
itself opens checkpoints with `backend="pread"` where mmap is a bad fit (Windows, MPS), so the pair is exercised
upstream.

One more thing bounds the peak: the C heap. Freed float tensors go back to glibc's heap, not to the OS (its
mmap threshold rises to the largest block freed, so after the first big tensor the others come from the heap,
where quantized weights allocated in between pin them). Measured on ViT-L/14: 1.67 GB peak with pread alone,
0.9 GB when each large read first trims the heap (`flora.heap.release_freed_memory`, without a garbage collection:
what is freed here is freed by reference count), which is what `_TrimmingSlice` does.

Why not the alternatives: dropping pages of the map with madvise as transformers goes needs a hook inside its
loading loop (there is no public one); re-sharding a single-file checkpoint into many small shards does not help
either, as transformers opens every shard's map before loading the first tensor and closes them all at the end.
Building the bitsandbytes skeleton and assigning quantized tensors ourselves would duplicate transformers'
quantizer integration and break with it.

Only safetensors checkpoints stream: `None` from `checkpoint_files` (a pytorch_model.bin) or from
`load_streamed` (a checkpoint that is already quantized, a safetensors without the `pread` backend) means: load
the ordinary way.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

SAFE_WEIGHTS = "model.safetensors"
SAFE_WEIGHTS_INDEX = "model.safetensors.index.json"


def _resolve(name: str, filename: str) -> Path | None:
    """`filename` of checkpoint `name` (a local directory, or a hub id resolved like from_pretrained does)."""
    local = Path(name)
    if local.is_dir():
        path = local / filename
        return path if path.is_file() else None
    from transformers.utils import cached_file

    try:
        found = cached_file(name, filename, _raise_exceptions_for_missing_entries=False)
    except Exception:  # offline, gated, unknown repo: the ordinary load will say so in its own words
        return None
    return Path(found) if found else None


def checkpoint_files(name: str) -> list[Path] | None:
    """The safetensors files holding `name`'s weights (one, or every shard of an index), or None."""
    single = _resolve(name, SAFE_WEIGHTS)
    if single is not None:
        return [single]
    index = _resolve(name, SAFE_WEIGHTS_INDEX)
    if index is None:
        return None  # a .bin checkpoint (or none): torch.load's path
    shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    paths = [_resolve(name, shard) for shard in shards]
    return None if any(p is None for p in paths) else paths


TRIM_BEFORE_ELEMENTS = 1 << 18  # a tensor this large (1 MB in float32) first trims the heap; smaller ones reuse it


class _TrimmingSlice:
    """A safetensors slice that, before it reads a large tensor, hands the heap's free pages (the last large
    tensor's, quantized and dropped by now) back to the OS. Small tensors (biases, norms) skip the trim: they fit
    in what the heap keeps, and a trim costs a few ms (ViT-L/14: ~590 tensors, ~220 of them large)."""

    __slots__ = ("_slice",)

    def __init__(self, slice_: Any):
        self._slice = slice_

    def __getitem__(self, index: Any) -> Any:
        if math.prod(self._slice.get_shape()) >= TRIM_BEFORE_ELEMENTS:
            from flora.heap import release_freed_memory

            release_freed_memory(collect=False)
        return self._slice[index]

    def __getattr__(self, name: str) -> Any:  # get_shape, get_dtype, ...: the slice's own
        return getattr(self._slice, name)


@contextlib.contextmanager
def streamed_checkpoint(files: list[Path]) -> Iterator[dict[str, Any] | None]:
    """name -> lazy slice of every tensor in `files`, read with pread when indexed; None without that backend.

    The files stay open (file descriptors only, no memory) until the block ends.
    """
    from safetensors import safe_open

    with contextlib.ExitStack() as stack:
        try:
            handles = [
                stack.enter_context(safe_open(str(p), framework="pt", device="cpu", backend="pread")) for p in files
            ]
        except TypeError:  # safetensors < 0.8 has no `backend`
            log.info("this safetensors cannot read a checkpoint with pread; loading it through a memory map")
            yield None
            return
        # safe_open is not a mapping: keys() is its API, not a dict's
        yield {key: _TrimmingSlice(h.get_slice(key)) for h in handles for key in h.keys()}  # noqa: SIM118


def load_streamed(model_class: Any, name: str, files: list[Path], **kwargs: Any) -> Any | None:
    """`model_class.from_pretrained(name, **kwargs)` with the weights read from `files` a tensor at a time.

    None when it cannot stream (the checkpoint is already quantized, or safetensors has no pread backend):
    the caller loads the ordinary way.
    """
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(name)
    if getattr(config, "quantization_config", None) is not None:
        return None  # pre-quantized weights: nothing full-precision to bound, and their own loader path
    if getattr(config, "dtype", None) is None:
        # from_pretrained's dtype="auto" would read it off the state dict's first float tensor; these are slices
        from transformers.modeling_utils import get_state_dict_dtype, load_state_dict

        kwargs.setdefault("dtype", get_state_dict_dtype(load_state_dict(str(files[0]), map_location="meta")))
    with streamed_checkpoint(files) as state_dict:
        if state_dict is None:
            return None
        model = model_class.from_pretrained(None, config=config, state_dict=state_dict, **kwargs)
    # What from_pretrained(name) records, and peft reads as the base's name: a state_dict load has none ("None",
    # which peft would look up on the hub when saving an adapter).
    model.config.name_or_path = model.name_or_path = name
    return model
