"""Update encodings (fp32, fp16, bf16, int8 per tensor / per channel) and zstd, declared in the envelope."""

from __future__ import annotations

import struct
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from flora.errors import ConfigError, ProtocolError, RejectReason
from flora.protocol import Envelope, adapter_from_body, adapter_to_body, envelope_from_bytes, envelope_to_bytes
from flora.protocol.codec import safetensors_bytes
from flora.protocol.compression import decompress
from flora.protocol.encodings import ENCODINGS, scale_shape

zstandard = pytest.importorskip("zstandard")

GOLDEN_INT8_ZSTD = Path(__file__).parent / "data" / "golden_update_v1_int8_channel_zstd.bin"
A = "base_model.model.text_model.encoder.layers.0.self_attn.out_proj.lora_A.weight"
B = "base_model.model.text_model.encoder.layers.0.self_attn.out_proj.lora_B.weight"


def lora_tensors(seed: int = 0, width: int = 64) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    # Rows of very different magnitude, as trained LoRA weights have: per-channel scales should help.
    a = rng.normal(size=(4, width)) * np.array([[1.0], [0.01], [0.1], [3.0]])
    return {A: a.astype(np.float32), B: (rng.normal(size=(width, 4)) * 0.02).astype(np.float32)}


def golden_int8_envelope() -> Envelope:
    body, meta = adapter_to_body(
        {A: np.arange(8, dtype=np.float32).reshape(2, 4) / 8, B: np.array([[1, -1], [0.5, 0.25], [0, 2], [-3, 1.5]])},
        "int8-channel",
        "zstd",
    )
    return Envelope(
        kind="update",
        run="golden",
        sender="client-0",
        round=3,
        data={"num_examples": 42},
        body=body,
        body_meta=meta,
        msg_id="0" * 32,
        sent_at=1_700_000_000.0,
    )


@pytest.mark.parametrize("compression", ["none", "zstd"])
@pytest.mark.parametrize("encoding", list(ENCODINGS))
def test_every_encoding_round_trips_within_its_precision(encoding, compression):
    tensors = lora_tensors()
    body, meta = adapter_to_body(tensors, encoding, compression)
    env = envelope_from_bytes(
        envelope_to_bytes(Envelope(kind="update", run="r", sender="n", body=body, body_meta=meta))
    )
    back = adapter_from_body(env.body, env.body_meta)
    assert set(back) == set(tensors)
    for name, x in tensors.items():
        y = back[name]
        assert y.dtype == np.float32 and y.shape == x.shape
        err = np.abs(y - x)
        if encoding == "float32":
            assert (err == 0).all()
        elif encoding == "float16":
            assert (err <= np.abs(x) * 2**-11 + 6e-8).all()  # half an ulp, plus float16's subnormal step
        elif encoding == "bfloat16":
            assert (err <= np.abs(x) * 2**-8).all()  # half an ulp of an 8-bit mantissa
        else:  # int8: at most half a quantization step, max|x| / 127 over the tensor or one rank component
            spans = tuple(i for i, n in enumerate(scale_shape(x.shape, ENCODINGS[encoding].scales)) if n == 1)
            step = np.abs(x).max(axis=spans, keepdims=True) / 127
            assert (err <= step / 2 + 1e-7).all()
    assert meta["tensors"] == 2 and ("compression" in meta) == (compression == "zstd")


def test_encodings_shrink_the_update_and_per_channel_scales_beat_one_scale():
    tensors = lora_tensors(width=512)  # the paper's out_proj width: data, not the header, dominates
    sizes = {e: len(adapter_to_body(tensors, e)[0]) for e in ENCODINGS}
    assert sizes["float16"] < 0.55 * sizes["float32"] and sizes["bfloat16"] == sizes["float16"]
    assert sizes["int8-tensor"] < 0.3 * sizes["float32"]

    def worst(encoding):
        back = adapter_from_body(*adapter_to_body(tensors, encoding))
        return max(float(np.abs(back[k] - tensors[k]).max() / np.abs(tensors[k]).max()) for k in tensors)

    small_rows = adapter_from_body(*adapter_to_body(tensors, "int8-tensor"))[A][1]
    assert np.count_nonzero(small_rows) == 0  # one scale for all rows flattens the 0.01-magnitude row to zero
    assert np.count_nonzero(adapter_from_body(*adapter_to_body(tensors, "int8-channel"))[A][1]) > 50
    assert worst("int8-channel") <= worst("int8-tensor")


def test_the_default_encoding_adds_no_field_so_old_payloads_stay_byte_identical():
    body, meta = adapter_to_body(lora_tensors())
    assert meta == {"format": "safetensors", "dtype": "float32", "tensors": 2}
    from safetensors.numpy import save

    assert body == save(dict(sorted(lora_tensors().items())))


def test_bfloat16_bodies_are_standard_safetensors_that_torch_loads():
    torch = pytest.importorskip("torch")
    from safetensors.torch import load

    tensors = lora_tensors()
    loaded = load(adapter_to_body(tensors, "bfloat16")[0])
    assert loaded[A].dtype == torch.bfloat16
    expected = torch.from_numpy(tensors[A]).to(torch.bfloat16)  # torch rounds to nearest even, as we do
    assert torch.equal(loaded[A], expected)


def test_golden_int8_zstd_payload_decodes_and_its_uncompressed_bytes_are_stable():
    frozen = envelope_from_bytes(GOLDEN_INT8_ZSTD.read_bytes())
    assert frozen.body_meta == {
        "format": "safetensors",
        "dtype": "int8",
        "scales": "channel",
        "tensors": 2,
        "compression": "zstd",
        "raw_size": frozen.body_meta["raw_size"],
    }
    tensors = adapter_from_body(frozen.body, frozen.body_meta)
    np.testing.assert_allclose(tensors[B][:, 0], [1, 0.5, 0, -3], atol=3 / 254)
    # zstd output may change with the library version; the safetensors bytes inside must not.
    fresh = golden_int8_envelope()
    assert decompress(fresh.body, fresh.body_meta) == decompress(frozen.body, frozen.body_meta)


def test_non_finite_values_are_refused_by_the_receiver_whatever_the_encoding():
    bad = {A: np.array([[1.0, np.nan], [2.0, 3.0]], dtype=np.float32)}
    for encoding in ENCODINGS:
        with pytest.raises(ProtocolError) as info:
            adapter_from_body(*adapter_to_body(bad, encoding))
        assert info.value.reason is RejectReason.NON_FINITE, encoding
    with pytest.raises(ProtocolError) as info:  # overflows float16's range
        adapter_from_body(*adapter_to_body({A: np.array([1e6], dtype=np.float32)}, "float16"))
    assert info.value.reason is RejectReason.NON_FINITE


# -- hostile bodies ---------------------------------------------------------------------------------------
def i8(shape, value=1):
    return ("I8", shape, np.full(shape, value, dtype=np.int8).tobytes())


def f32(shape, value=0.5):
    return ("F32", shape, np.full(shape, value, dtype="<f4").tobytes())


INT8_CHANNEL = {"format": "safetensors", "dtype": "int8", "scales": "channel"}


@pytest.mark.parametrize(
    ("entries", "meta", "reason", "words"),
    [
        ({"w": i8((2, 3))}, INT8_CHANNEL, RejectReason.MALFORMED, "has no .__scale__"),
        ({"w": i8((2, 3)), "w.__scale__": f32((2,))}, INT8_CHANNEL, RejectReason.MALFORMED, "of shape [2, 1]"),
        ({"w": i8((3, 2)), "w.__scale__": f32((3, 1))}, INT8_CHANNEL, RejectReason.MALFORMED, "of shape [1, 2]"),
        ({"w": i8((2, 3)), "w.__scale__": f32((2, 1), np.nan)}, INT8_CHANNEL, RejectReason.NON_FINITE, "scale"),
        ({"w": i8((2, 3)), "w.__scale__": f32((2, 1), -1.0)}, INT8_CHANNEL, RejectReason.NON_FINITE, "non-negative"),
        (
            {"w": i8((2,)), "w.__scale__": f32((1,)), "x.__scale__": f32((1,))},
            INT8_CHANNEL,
            RejectReason.MALFORMED,
            "no int8",
        ),
        ({"w": f32((2,))}, INT8_CHANNEL, RejectReason.TENSOR_DTYPE, "declares int8"),
        ({"w": i8((2,))}, {"format": "safetensors", "dtype": "float32"}, RejectReason.TENSOR_DTYPE, "declares float32"),
        ({"w": f32((2,))}, {"format": "safetensors", "dtype": "int4"}, RejectReason.TENSOR_DTYPE, "unsupported"),
        (
            {"w": f32((2,))},
            {"format": "safetensors", "dtype": "float32", "scales": "tensor"},
            RejectReason.TENSOR_DTYPE,
            "",
        ),
        (
            {"w": f32((2,))},
            {"format": "safetensors", "dtype": "float32", "raw_size": 8},
            RejectReason.MALFORMED,
            "only",
        ),
        ({"w": f32((2,))}, {"format": "pickle", "dtype": "float32"}, RejectReason.MALFORMED, "safetensors"),
        (
            {"w": f32((2,))},
            {"format": "safetensors", "dtype": "float32", "compression": "gzip"},
            RejectReason.MALFORMED,
            "gzip",
        ),
    ],
)
def test_inconsistent_bodies_are_refused_with_a_reason(entries, meta, reason, words):
    with pytest.raises(ProtocolError) as info:
        adapter_from_body(safetensors_bytes(entries), meta)
    assert info.value.reason is reason and words in str(info.value)


def test_a_safetensors_dtype_numpy_cannot_hold_is_refused_not_crashed():
    body = safetensors_bytes({"w": ("BF16", (2,), b"\x80\x3f\x00\x40")})
    with pytest.raises(ProtocolError) as info:
        adapter_from_body(body, {"format": "safetensors", "dtype": "float32"})
    assert info.value.reason is RejectReason.TENSOR_DTYPE


def zstd_meta(raw_size: int) -> dict:
    return {"format": "safetensors", "dtype": "float32", "compression": "zstd", "raw_size": raw_size}


def test_zstd_bodies_must_declare_their_exact_size_and_nothing_after_the_frame():
    raw = safetensors_bytes({"w": f32((16,))})
    frame = zstandard.ZstdCompressor().compress(raw)
    assert adapter_from_body(frame, zstd_meta(len(raw)))["w"].shape == (16,)
    for meta, words in [
        (zstd_meta(len(raw) - 1), "raw_size"),
        ({**zstd_meta(0), "raw_size": "12"}, "integer raw_size"),
        ({**zstd_meta(0), "raw_size": True}, "integer raw_size"),
    ]:
        with pytest.raises(ProtocolError, match=words):
            adapter_from_body(frame, meta)
    skippable_frame = struct.pack("<II", 0x184D2A50, 4) + b"abcd"  # decompresses to nothing
    for tail, words in [(frame, "raw_size"), (b"junk", "does not decompress"), (skippable_frame, "after its frame")]:
        with pytest.raises(ProtocolError, match=words):
            adapter_from_body(frame + tail, zstd_meta(len(raw)))
    unsized = zstandard.ZstdCompressor(write_content_size=False).compress(raw)
    with pytest.raises(ProtocolError, match="does not declare"):
        adapter_from_body(unsized, zstd_meta(len(raw)))
    with pytest.raises(ProtocolError, match="does not decompress"):
        adapter_from_body(frame[: len(frame) // 2], zstd_meta(len(raw)))  # truncated


def test_a_zip_bomb_is_refused_without_expanding_it():
    bomb = zstandard.ZstdCompressor(level=19).compress(bytes(200 * 1024 * 1024))  # 200 MiB of zeros in a few KB
    assert len(bomb) < 64 * 1024
    with pytest.raises(ProtocolError, match="cap"):  # declaring the truth is over the absolute cap
        adapter_from_body(bomb, zstd_meta(200 * 1024 * 1024))
    with pytest.raises(ProtocolError, match="decompression bomb"):  # under the cap, but over the ratio
        adapter_from_body(bomb, zstd_meta(32 * 1024 * 1024))
    tracemalloc.start()
    try:
        with pytest.raises(ProtocolError):  # lying about the size: reading stops one byte past the claim
            adapter_from_body(bomb, zstd_meta(1000))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 * 1024 * 1024


def test_wire_settings_are_validated_with_the_fix_in_the_message(tmp_path):
    from coordinator.config import CoordinatorConfig
    from edge_client.config import ClientConfig, load_client_config

    base = {"node_id": "n", "model": "m", "data_dir": tmp_path}
    with pytest.raises(ConfigError, match="wire_encoding must be one of float32, float16, bfloat16, int8-tensor"):
        ClientConfig(**base, wire_encoding="int4")
    with pytest.raises(ConfigError, match="wire_compression must be one of none, zstd"):
        ClientConfig(**base, wire_compression="gzip")
    with pytest.raises(ConfigError, match="at least 4096"):
        CoordinatorConfig(model="m", max_message_bytes=1000)
    assert ClientConfig(**base).max_message_bytes == 120_000  # under AWS IoT Core's 128 KB
    path = tmp_path / "client.toml"
    path.write_text(
        f'node_id = "n"\nmodel = "m"\ndata_dir = "{tmp_path}"\nmax_message_bytes = "none"\n'
        'wire_encoding = "int8-channel"\nwire_compression = "zstd"\n'
    )
    config = load_client_config(path)
    assert (config.max_message_bytes, config.wire_encoding, config.wire_compression) == (None, "int8-channel", "zstd")


def test_a_huge_safetensors_header_is_refused_before_it_is_parsed():
    body = struct.pack("<Q", 50 * 1024 * 1024) + b"{" + b" " * 100
    with pytest.raises(ProtocolError, match="safetensors header of 52428800 bytes"):
        adapter_from_body(body, {"format": "safetensors", "dtype": "float32"})
