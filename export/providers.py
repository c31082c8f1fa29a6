"""Pick an ONNX Runtime execution provider with fallback, and say which one actually ran.

A Jetson runs TensorRT or CUDA; a laptop or CI runs CPU. Asking for a provider this onnxruntime
build lacks (the `onnxruntime` wheel has CPU only; `onnxruntime-gpu` or JetPack's wheel add CUDA
and TensorRT) falls back along the chain rather than failing, and the log line names the
provider ONNX Runtime really bound, since it may also drop CUDA at session creation (missing
libraries) without raising.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from flora.errors import ConfigError
from flora.onnx_build import session_options

log = logging.getLogger(__name__)
_warned: set[str] = set()  # one fallback warning per provider and process, not one per session

PROVIDER_NAMES = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
}
# Each choice falls back to the ones after it.
FALLBACK_CHAINS = {
    "tensorrt": ("tensorrt", "cuda", "cpu"),
    "cuda": ("cuda", "cpu"),
    "cpu": ("cpu",),
}


def provider_chain(requested: str, available: list[str] | None = None) -> list[str]:
    """ONNX Runtime provider names to try, in order, keeping only those this build offers."""
    import onnxruntime as ort

    if requested not in FALLBACK_CHAINS:
        raise ConfigError(f"unknown execution provider {requested!r}; choose from: {', '.join(FALLBACK_CHAINS)}")
    available = ort.get_available_providers() if available is None else available
    chain = [PROVIDER_NAMES[name] for name in FALLBACK_CHAINS[requested]]
    usable = [name for name in chain if name in available]
    missing = [name for name in chain if name not in available]
    usable = usable or ["CPUExecutionProvider"]
    if chain[0] in missing and chain[0] not in _warned:
        _warned.add(chain[0])
        log.warning(
            "%s is not available in this onnxruntime build (available: %s); falling back to %s. "
            "Install onnxruntime-gpu (or JetPack's onnxruntime wheel on a Jetson) for CUDA and TensorRT.",
            chain[0],
            ", ".join(available),
            usable[0],
        )
    return usable


def make_session(
    path: str | Path, provider: str = "cpu", *, threads: int | None = None, quiet: bool = True
) -> tuple[Any, str]:
    """An InferenceSession on the first usable provider of `provider`'s chain, and that provider's name."""
    import onnxruntime as ort

    options = session_options(threads, quiet)
    session = ort.InferenceSession(str(path), sess_options=options, providers=provider_chain(provider))
    ran = session.get_providers()[0]
    return session, ran
