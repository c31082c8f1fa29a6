"""The frozen vision tower as an int8 ONNX Runtime session, for building the image cache on a CPU
(`cache_precision = "onnx-int8"`).

Why: on a CPU the first round is the cache build, a forward pass of the vision tower over every image, and
PyTorch's fastest CPU paths (bfloat16 autocast, eager int8) only halve it. ONNX Runtime's dynamic int8 MatMuls
run on VNNI dot products (U8S8) and fuse what PyTorch's eager int8 leaves as separate passes: on the ViT-B/32
benchmark without AMX, 3.6x less CPU time than PyTorch float32 for the same images (BENCHMARKS.md).

The file is a property of the base model, like a Jetson's TensorRT engine: it is built once (the tower traced
to ONNX and quantized per output channel as `flora export` does, through flora/onnx_build.py), kept in the cache
directory under the cache's own model key, and reused by every later build for that base. Its weights are QInt8
only where this CPU has VNNI (`flora.onnx_build.cpu_has_vnni`): the file is built for this CPU (and named by its
weight scheme, so a copy on a CPU of another kind is never used), so it may use the CPU's fast path; elsewhere
QUInt8, which is exact on every x86 CPU. What it changes in the embeddings (cosine,
error, trained accuracy) is measured in BENCHMARKS.md; the precision is opt-in, like "int8" and "bfloat16".
"""

from __future__ import annotations

import hashlib
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

from flora.files import atomic_path, prune_partial
from flora.onnx_build import cpu_has_vnni, part_module, quantize_dynamic_int8, session_options, trace_to_onnx

log = logging.getLogger(__name__)

FILE_PREFIX = "vision_int8-"


def weight_scheme() -> str:
    """ "u8s8" where this CPU has VNNI, else "u8u8": part of the cache key, since the two give different rows."""
    return "u8s8" if cpu_has_vnni() else "u8u8"


def runtime_tag() -> str:
    """What the rows depend on beyond the base model: the weight scheme and ONNX Runtime's version."""
    import onnxruntime

    return f"{weight_scheme()}/onnxruntime={onnxruntime.__version__}"


def vision_file(directory: Path, model_key: str) -> Path:
    return directory / f"{FILE_PREFIX}{hashlib.sha256(model_key.encode()).hexdigest()[:20]}.onnx"


def build_vision_file(clip: Any, model: Any, path: Path) -> Path:
    """Trace `model`'s vision tower to ONNX (the family's "vision" part: pixels in, normalised embeddings out, as
    `flora export` writes it) and quantize it to `path`, atomically; the float32 file is temporary."""
    import torch

    base = getattr(model, "get_base_model", lambda: model)()
    spec = next(part for part in clip.family.onnx_parts() if part["name"] == "vision")
    size = base.config.vision_config.image_size
    sample = torch.zeros(2, 3, size, size)  # the trace needs shapes, not an image; the batch axis stays dynamic
    started = time.perf_counter()
    was_training = base.training  # traced in eval mode; the trainer's model goes back as it was
    # The float32 file beside the result (on the cache's disk, not a /tmp that may be memory), hidden and named
    # as flora.files.prune_partial recognises, so a build killed half-way leaves nothing the next one keeps.
    scratch = tempfile.TemporaryDirectory(prefix=f".{path.name}.", dir=path.parent)
    with scratch as tmp, atomic_path(path) as out:
        fp32 = Path(tmp) / "vision.onnx"
        try:
            trace_to_onnx(
                part_module(base, "vision", spec["inputs"]),
                (sample,),
                fp32,
                input_names=spec["inputs"],
                output_names=spec["outputs"],
                dynamic_axes=spec["dynamic_axes"],
            )
        finally:
            base.train(was_training)
        quantize_dynamic_int8(fp32, out, signed_weights=weight_scheme() == "u8s8")
    log.info("image embeddings: built the int8 ONNX vision tower in %.1f s (%s)", time.perf_counter() - started, path)
    return path


class OnnxVisionTower:
    """An ONNX Runtime session over the int8 vision file for `model_key`, built first if it is not there.

    `directory` None (no cache directory): the file is built in a temporary directory and gone afterwards.
    Files of other model keys in `directory` are removed when a new one is built: one base, one file.
    """

    def __init__(self, clip: Any, model: Any, directory: str | Path | None, model_key: str):
        self._tmp = None
        if directory is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="flora-vision-")
            directory = self._tmp.name
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.path = vision_file(directory, model_key)
        self.build_seconds = self.build_cpu_seconds = 0.0  # the one-off per base model, for reports
        prune_partial(directory)  # what a build or a cache write killed half-way left
        self.built = not self.path.exists()
        if self.built:
            self._build(clip, model)
        try:
            self.session = self._open()
        except Exception as exc:  # a foreign or damaged file: build it again once, rather than fail every round
            if self.built:
                raise
            log.warning(
                "image embeddings: the ONNX vision file %s does not load (%s); building it again", self.path, exc
            )
            self._build(clip, model)
            self.built = True
            self.session = self._open()

    def _open(self) -> Any:
        import onnxruntime as ort
        import torch

        options = session_options(torch.get_num_threads())  # the trainer's threads
        # Idle threads wait instead of spinning between chunks: the build's CPU time is the build's work.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        return ort.InferenceSession(str(self.path), options, providers=["CPUExecutionProvider"])

    def _build(self, clip: Any, model: Any) -> None:
        started, started_cpu = time.perf_counter(), time.process_time()
        build_vision_file(clip, model, self.path)
        self.build_seconds = time.perf_counter() - started
        self.build_cpu_seconds = time.process_time() - started_cpu
        for stale in self.path.parent.glob(f"{FILE_PREFIX}*.onnx"):
            if stale != self.path:
                stale.unlink(missing_ok=True)

    def __call__(self, pixels: Any) -> Any:
        """[B, D] float32 normalised embeddings of `pixels` ([B, 3, H, W] float32)."""
        import torch

        (rows,) = self.session.run(None, {"pixel_values": pixels.numpy()})
        return torch.from_numpy(rows)

    def close(self) -> None:
        self.session = None
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None
