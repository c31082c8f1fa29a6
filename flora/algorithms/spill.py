"""Client updates kept on disk, not in RAM, and read back one block of coordinates at a time.

Order statistics (median, trimmed mean) need every client's value of a coordinate at once, but not every
coordinate at once. So each update is flattened to one float64 row and appended to a file as it arrives;
the reduction then reads the file back one column block at a time (`blocks`), sized so that block x clients fits
in `block_bytes`. The coordinator's memory is then O(block_bytes), whatever the number of clients; the disk
holds clients x coordinates x 8 bytes (1,000 paper-recipe updates: 197 MB).

The file is anonymous: created and unlinked at once in `directory` (the system's temporary directory by
default), so the operating system reclaims it when it is closed, when the round ends, or when the process
dies, crash included; nothing is left to prune.

float64, because that is what the in-memory computation converts every update to: widening float32 (or
float16) to float64 is exact, so reading a row back gives exactly the array the old code stacked.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from typing import IO

import numpy as np

from flora.algorithms.tensor_math import Tensors

DEFAULT_BLOCK_BYTES = 8 * 1024 * 1024  # one block of all clients' values; the reduction copies it ~2x
ROW_DTYPE = np.dtype(np.float64)


class SpilledRows:
    """Rows of `layout`'s coordinates (tensor name -> shape, in order) appended to an unlinked temporary file."""

    def __init__(
        self,
        layout: dict[str, tuple[int, ...]],
        *,
        directory: str | None = None,
        block_bytes: int = DEFAULT_BLOCK_BYTES,
    ):
        self.layout = dict(layout)
        self.sizes = {name: int(np.prod(shape, dtype=np.int64)) for name, shape in self.layout.items()}
        self.width = sum(self.sizes.values())
        self.block_bytes = max(ROW_DTYPE.itemsize, int(block_bytes))
        self.rows = 0
        # TemporaryFile: unlinked as soon as it is created (on POSIX), so even a crash leaves nothing behind.
        self._file: IO[bytes] | None = tempfile.TemporaryFile(prefix="flora-spill-", dir=directory)  # noqa: SIM115 -- lives as long as the round

    def append(self, tensors: Tensors) -> None:
        """Write one update (name -> array of the layout's shape) as one row; nothing of it stays in memory."""
        if self._file is None:
            raise ValueError("the spill file is closed")
        for name, shape in self.layout.items():
            value = np.asarray(tensors[name], dtype=ROW_DTYPE)
            if value.shape != shape:
                raise ValueError(f"{name}: shape {value.shape}, expected {shape}")
            self._file.write(np.ascontiguousarray(value).tobytes())
        self.rows += 1

    def block_width(self) -> int:
        """Coordinates per block: all rows of a block fit in `block_bytes`."""
        return max(1, self.block_bytes // (ROW_DTYPE.itemsize * max(1, self.rows)))

    def blocks(self) -> Iterator[tuple[int, np.ndarray]]:
        """(first coordinate, [rows, width] array) for consecutive column blocks, each read into RAM.

        Read with one pread per row segment, not through a memory map: the kernel maps pages around each
        fault of a map (fault-around, 64 KB and more), so a column block of a 1,000-row map made 140 MB
        resident where the block itself is 8 MB. Reads go through the page cache, which is not ours.
        """
        if self._file is None or self.rows == 0:
            return
        self._file.flush()
        fd = self._file.fileno()
        item = ROW_DTYPE.itemsize
        width = self.block_width()
        for start in range(0, self.width, width):
            stop = min(self.width, start + width)
            block = np.empty((self.rows, stop - start), dtype=ROW_DTYPE)
            for row in range(self.rows):
                target = memoryview(block[row]).cast("B")
                offset = (row * self.width + start) * item
                while len(target):  # pread may return less than asked (it does not on regular files, but may)
                    got = os.preadv(fd, [target], offset)
                    if got <= 0:
                        raise OSError(f"spill file ended early at byte {offset}")
                    target, offset = target[got:], offset + got
            yield start, block

    def reduce(self, combine) -> Tensors:
        """Apply `combine` ([rows, k] -> [k]) block by block; returns name -> float32 array of the layout's shape.

        `combine` must act on each column independently (median, trimmed mean): then the result is, element
        for element, what it gives on the whole [rows, coordinates] stack.
        """
        flat = np.empty(self.width, dtype=np.float32)
        for start, block in self.blocks():
            flat[start : start + block.shape[1]] = np.asarray(combine(block)).astype(np.float32)
        out: Tensors = {}
        offset = 0
        for name, shape in self.layout.items():
            out[name] = flat[offset : offset + self.sizes[name]].reshape(shape).copy()
            offset += self.sizes[name]
        return out

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __del__(self):  # the file is unlinked already; this only returns its space sooner
        self.close()
