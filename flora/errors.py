"""Exception types shared by every role, and the reasons an update or message is rejected."""

from __future__ import annotations

import enum


class FloraError(Exception):
    """Base class of every error the toolkit raises on purpose."""


class ConfigError(FloraError):
    """A setting is missing, unknown or out of range. The message says what to change."""


class DataError(FloraError):
    """Local data is missing, empty or unreadable. The message says where and what to fix."""


class StateError(FloraError):
    """State saved on disk (a checkpoint, a client's progress) is unreadable. The message names the file and
    the fix; the CLI prints it as one line and exits 2, and nothing on disk is changed."""


class StorageError(FloraError):
    """A file or directory cannot be written (disk full, read-only, no permission). The message names the path and
    the fix; the CLI prints it as one line and exits 2. Writes are atomic, so what was on disk before is intact."""


class RejectReason(str, enum.Enum):
    """Why a message or an update was dropped. Counted per reason in the coordinator's metrics."""

    MALFORMED = "malformed"  # not an envelope at all: bad magic, bad header JSON, truncated
    VERSION = "incompatible_version"  # protocol major version differs
    WRONG_RUN = "wrong_run"
    WRONG_ROUND = "wrong_round"  # late update for a closed round, or one from the future
    NOT_SELECTED = "not_selected"
    DUPLICATE = "duplicate"
    CHECKSUM = "checksum_mismatch"
    TENSOR_NAMES = "tensor_names_mismatch"
    TENSOR_SHAPES = "tensor_shape_mismatch"
    TENSOR_DTYPE = "tensor_dtype_mismatch"
    NON_FINITE = "non_finite_values"
    NORM_BOUND = "norm_out_of_bound"
    BAD_METRICS = "bad_metrics"
    # End-to-end integrity (flora/protocol/signing.py), checked when keys are configured:
    UNSIGNED = "unsigned"  # no signature where one is required
    BAD_SIGNATURE = "bad_signature"  # forged, altered after signing, or signed with another key
    REPLAYED = "replayed"  # authentic, but signed in reply to an instruction this coordinator did not send


class ProtocolError(FloraError):
    """A message that cannot be accepted. `reason` says which rule it broke."""

    def __init__(self, reason: RejectReason, detail: str):
        super().__init__(f"{reason.value}: {detail}")
        self.reason = reason
        self.detail = detail
