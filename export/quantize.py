"""Reduced-precision copies of a validated fp32 ONNX file: int8 for CPU targets, fp16 for GPU targets.

- int8: ONNX Runtime's dynamic quantization (weights 8-bit ahead of time, activations quantized
  per batch at run time) of MatMul and Gemm, which hold nearly all of CLIP's weights. No
  calibration data is needed, which suits an export run on a server that has no device data.
  Weights get one scale per output channel: with one scale per tensor a few large channels (the
  text tower has some) crush the resolution of the rest. On the tiny test model (random adapter)
  per-channel raised the whole model's top-1 agreement with fp32 from about 94% to 99%.
  Weights are QUInt8 (U8U8), not QInt8 (U8S8): on x86 CPUs without VNNI (AVX2 only, e.g. many AMD EPYC
  VMs) ONNX Runtime computes U8S8 MatMulInteger with VPMADDUBSW, which saturates pairs of products at
  int16, so full-range int8 weights give wrong sums there (tiny model: whole-model agreement 87%, vision
  min cosine 0.98). The file is built once and run on CPUs we cannot know, so it must be right on all of
  them. U8U8 has no such path; on a VNNI machine it scored the same as QInt8 (BENCHMARKS.md, quantizer
  variants), where `reduce_range` (7-bit weights, the other documented remedy) lost accuracy.
  Schemes (INT8_SCHEMES), fastest first, each keeping more in fp32: `full` quantizes every such MatMul;
  `first-attention-fp32` keeps the first encoder layer's attention projections (q, k, v, out) in fp32,
  the layer that sees the raw patch/token embeddings, whose wide activation ranges suffer most from one
  int8 scale per batch; `attention-fp32` keeps every layer's attention projections, which on ViT-B/32
  costs about 40% of int8's speed and doubles the file. On the tiny model both cut the disagreements
  with fp32 on the 1437-image train split from 16 to 3-5 (BENCHMARKS.md, Inference).
  `flora export` defaults to `auto`: it tries them in order and keeps the first whose top-1 agreement
  with fp32 meets the threshold, so a model pays for fp32 attention only when full int8 is not good enough.
- fp16: onnxruntime.transformers' float16 converter, keeping float32 inputs and outputs so the
  same preprocessing and post-processing serve every precision. It targets the CUDA and
  TensorRT execution providers (Jetson); ONNX Runtime's CPU provider runs it too, slowly, which
  is enough to validate it on the export machine.

Both start from the fp32 file, which stays the reference they are validated against.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from pathlib import Path

from export.metadata import stamp
from export.parts import check_precision
from flora.errors import ConfigError
from flora.files import atomic_path
from flora.onnx_build import quantize_dynamic_int8

log = logging.getLogger(__name__)

# Node-name substrings of CLIP's attention input/output projections, as torch.onnx names them.
ATTENTION_PROJECTIONS = ("/q_proj/", "/k_proj/", "/v_proj/", "/out_proj/")

# The first encoder layer's attention projections, in either tower ("/layers.0/" does not match layers.10).
FIRST_LAYER_ATTENTION = ("/encoder/layers.0/self_attn/",)

# int8 schemes by name -> the MatMuls they keep in fp32. Ordered: fastest first, the order `auto` tries.
INT8_SCHEMES: dict[str, tuple[str, ...]] = {
    "full": (),
    "first-attention-fp32": FIRST_LAYER_ATTENTION,
    "attention-fp32": ATTENTION_PROJECTIONS,
}
INT8_MODES = ("auto", *INT8_SCHEMES)


def check_int8_mode(mode: str) -> str:
    if mode not in INT8_MODES:
        raise ConfigError(
            f"unknown int8 scheme {mode!r}; choose from: {', '.join(INT8_MODES)} (auto tries "
            f"{', '.join(INT8_SCHEMES)} in turn and keeps the first that meets the agreement threshold)"
        )
    return mode


def quantize_int8(
    src: str | Path,
    dst: str | Path,
    metadata: dict[str, str] | None = None,
    *,
    keep_fp32: Sequence[str] = (),
    signed_weights: bool = False,
) -> Path:
    """Dynamic int8 of every MatMul/Gemm with a constant weight, except those whose name holds a `keep_fp32` entry.

    `signed_weights`: QInt8 weights (U8S8), for a file that only ever runs on the CPU that built it and that CPU
    has VNNI (`flora.onnx_build.cpu_has_vnni`); the default QUInt8 is right on every x86 CPU (module docstring)."""
    import onnx

    dst = Path(dst)
    keep_fp32 = tuple(keep_fp32)
    excluded = [
        node.name
        for node in onnx.load(str(src), load_external_data=False).graph.node
        if node.op_type in ("MatMul", "Gemm") and any(key in node.name for key in keep_fp32)
    ]
    if keep_fp32 and not excluded:
        raise ValueError(f"keep_fp32={keep_fp32!r} matches no MatMul/Gemm node of {src}")
    weights = "QInt8" if signed_weights else "QUInt8"
    info = f"dynamic int8: MatMul/Gemm weights {weights} per channel, activations per batch"
    if excluded:
        info += f"; {len(excluded)} MatMul/Gemm kept fp32 ({', '.join(keep_fp32)})"
    scheme = next((name for name, keep in INT8_SCHEMES.items() if keep == keep_fp32), "custom")
    with atomic_path(dst) as tmp:
        # QInt8 weights saturate on CPUs without VNNI (module docstring): opt-in only
        quantize_dynamic_int8(src, tmp, signed_weights=signed_weights, nodes_to_exclude=excluded)
        _restamp(tmp, {**(metadata or {}), "precision": "int8", "int8_scheme": scheme, "quantization": info})
    return dst


def convert_fp16(src: str | Path, dst: str | Path, metadata: dict[str, str] | None = None) -> Path:
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    dst = Path(dst)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # it warns for every constant it clamps to fp16's range
        proto = convert_float_to_float16(onnx.load(str(src)), keep_io_types=True)
    stamp(proto, {**(metadata or {}), "precision": "fp16"})
    with atomic_path(dst) as tmp:
        onnx.save(proto, str(tmp))
    return dst


def make_precision(
    precision: str,
    src: str | Path,
    dst: str | Path,
    metadata: dict[str, str] | None = None,
    *,
    int8_scheme: str = "full",
) -> Path:
    check_precision(precision)
    if precision == "int8":
        if int8_scheme not in INT8_SCHEMES:
            raise ConfigError(f"unknown int8 scheme {int8_scheme!r}; choose from: {', '.join(INT8_SCHEMES)}")
        return quantize_int8(src, dst, metadata, keep_fp32=INT8_SCHEMES[int8_scheme])
    if precision == "fp16":
        return convert_fp16(src, dst, metadata)
    raise ValueError("fp32 is exported directly, not converted")


def _restamp(path: Path, metadata: dict[str, str]) -> None:
    import onnx

    proto = onnx.load(str(path))
    onnx.save(stamp(proto, metadata), str(path))
