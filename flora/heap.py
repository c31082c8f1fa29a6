"""Hand the C heap's freed pages back to the OS, where the C library can (glibc's `malloc_trim`).

glibc keeps freed blocks for reuse: large tensors freed in the middle of the heap stay resident, and past its
dynamic mmap threshold (it rises to the largest block freed, up to 32 MB) even big tensors come from the heap.
Whoever frees many large tensors and cares about the resident set (a memory meter, a streamed checkpoint load)
calls this. A no-op where there is no `malloc_trim` (macOS, musl).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import gc


@functools.cache
def _libc():
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name) if name else None
    except OSError:
        return None


def release_freed_memory(collect: bool = True) -> None:
    """Collect garbage and return the C heap's free pages to the OS (glibc `malloc_trim`), where possible."""
    if collect:
        gc.collect()  # a full collection takes ~0.1-0.3 s with torch and transformers loaded
    libc = _libc()
    trim = getattr(libc, "malloc_trim", None) if libc is not None else None
    if trim is not None:
        trim(0)
