"""Making ONNX files and running them on a CPU: the mechanics two roles share.

`export/` writes validated ONNX models for deployment; the edge client builds an int8 file of its own vision
tower to compute its image cache (edge_client/onnx_vision.py). Both trace with the same exporter settings,
quantize with the same recipe and open sessions with the same options; what each adds (metadata, validation,
provider fallback; a file keyed by the cache) stays in its role. Nothing here imports torch or onnxruntime at
module level: `flora infer` runs without PyTorch.
"""

from __future__ import annotations

import contextlib
import logging
import platform
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

# TorchScript exporter (dynamo=False): it traces CLIP without onnxscript, into a graph ONNX Runtime runs on
# CPU, CUDA and TensorRT.
OPSET = 17
CPUINFO = Path("/proc/cpuinfo")


def trace_to_onnx(
    module: Any,
    args: tuple[Any, ...],
    path: str | Path,
    *,
    input_names: Sequence[str],
    output_names: Sequence[str],
    dynamic_axes: dict[str, dict[int, str]],
) -> Path:
    """`module` traced on `args` and written to `path` (not atomically: callers write to a temporary path)."""
    import torch

    # The tracer warns about Python-side shape checks in transformers' CLIP; validation on other batch sizes
    # and sequence lengths is what proves the graph generalises, so they are noise.
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            args,
            str(path),
            dynamo=False,
            input_names=list(input_names),
            output_names=list(output_names),
            dynamic_axes=dynamic_axes,
            opset_version=OPSET,
        )
    return Path(path)


def part_module(model: Any, name: str, inputs: Sequence[str]) -> Any:
    """Part `name` ("model", "vision" or "text", the family's `onnx_parts`) of `model` as an eval-mode module
    taking `inputs` positionally and returning plain tensors (ONNX wants no output objects); embeddings as the
    family computes them. `model` is put in eval mode too: a caller that goes on training restores it."""
    import torch

    from flora.modeling.families import family_for

    family = family_for(model)

    class Part(torch.nn.Module):
        def __init__(self, wrapped):
            super().__init__()
            self.wrapped = wrapped

        def forward(self, *args):
            named = dict(zip(inputs, args))
            if name == "vision":
                return family.image_embeddings(self.wrapped, named["pixel_values"])
            if name == "text":
                return family.text_embeddings(self.wrapped, named)
            out = self.wrapped(**named)
            return out.logits_per_image, out.logits_per_text, out.text_embeds, out.image_embeds

    return Part(model).eval()


def quantize_dynamic_int8(
    src: str | Path, dst: str | Path, *, signed_weights: bool = False, nodes_to_exclude: Sequence[str] = ()
) -> Path:
    """Dynamic int8 of `src`'s MatMul/Gemm nodes (weights per output channel, activations per batch) to `dst`.

    `signed_weights`: QInt8 weights (U8S8), only for a file that runs on the CPU that built it and where that
    CPU has VNNI (`cpu_has_vnni`); the default QUInt8 is exact on every x86 CPU (export/quantize.py says why).
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with warnings.catch_warnings(), quiet_root_logger():
        warnings.simplefilter("ignore")
        quantize_dynamic(
            str(src),
            str(dst),
            weight_type=QuantType.QInt8 if signed_weights else QuantType.QUInt8,
            op_types_to_quantize=["MatMul", "Gemm"],
            per_channel=True,
            nodes_to_exclude=list(nodes_to_exclude),
        )
    return Path(dst)


def cpu_has_vnni() -> bool:
    """Whether this CPU computes ONNX Runtime's U8S8 int8 products exactly and fast: x86 with VNNI (AVX512-VNNI,
    AVX-VNNI or AMX-INT8). Read from Linux's /proc/cpuinfo; anything else (no such file, another architecture)
    counts as "no", which keeps the QUInt8 weights that are right everywhere."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    try:
        flags = CPUINFO.read_text().split()
    except OSError:
        return False
    return any(flag in flags for flag in ("avx512_vnni", "avx_vnni", "amx_int8"))


def session_options(threads: int | None = None, quiet: bool = True) -> Any:
    """ONNX Runtime session options: all graph optimizations, `threads` intra-op threads (None: its default)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    # ONNX Runtime's default, stated: constant folding, layout and operator fusions (MatMul+Add, GELU, ...).
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    if quiet:
        # ORT warns (to stderr, not through logging) about fp16 nodes it runs with casts on CPU; those
        # are expected for an fp16 model validated on CPU, and the numbers are checked anyway.
        options.log_severity_level = 3
    return options


@contextlib.contextmanager
def quiet_root_logger():
    """onnxruntime.quantization logs one INFO line per tensor, and a WARNING suggesting a
    "pre-processing" pass (it only helps static quantization), through the root logger."""
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(previous)
