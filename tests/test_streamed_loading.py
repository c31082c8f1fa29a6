"""A quantized load reads the checkpoint a tensor at a time (flora/modeling/streamed.py): the same model as
transformers' own load from the directory, bit for bit, without the whole file resident at its peak."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from transformers import CLIPModel

from flora.modeling.loading import load_clip, quantization_config
from flora.modeling.streamed import checkpoint_files, load_streamed
from flora.modeling.tiny import write_tiny_clip


def plain_load(model_dir, quantization: str):
    """transformers' ordinary quantized load: the checkpoint through its memory map."""
    return CLIPModel.from_pretrained(
        str(model_dir), quantization_config=quantization_config(quantization), device_map="cpu"
    )


def assert_same_model(a, b, same_source: bool = True):
    """Every tensor of the state (4-bit: packed weights and their serialized quant state; 8-bit: int8 weights and
    scales; every float tensor), its dtype and the quantized parameters' own state, equal; and the config, but
    for the path it was loaded from unless `same_source`."""
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert sa[key].dtype == sb[key].dtype and torch.equal(sa[key], sb[key]), key
    params_a, params_b = dict(a.named_parameters()), dict(b.named_parameters())
    assert params_a.keys() == params_b.keys()
    quantized = 0
    for name, pa in params_a.items():
        pb = params_b[name]
        assert type(pa) is type(pb) and pa.dtype == pb.dtype and torch.equal(pa.data, pb.data), name
        if type(pa).__name__ == "Params4bit":
            qa, qb = pa.quant_state.as_dict(packed=True), pb.quant_state.as_dict(packed=True)
            assert qa.keys() == qb.keys()
            assert all(torch.equal(qa[k], qb[k]) for k in qa), name
            quantized += 1
        elif type(pa).__name__ == "Int8Params":
            assert torch.equal(pa.SCB, pb.SCB), name
            quantized += 1
    assert quantized > 0  # real bitsandbytes parameters were compared
    config_a, config_b = a.config.to_dict(), b.config.to_dict()
    if not same_source:
        config_a.pop("_name_or_path"), config_b.pop("_name_or_path")
    assert config_a == config_b
    assert (a.name_or_path == b.name_or_path) == same_source


@pytest.mark.parametrize("quantization", ["4bit", "8bit"])
def test_a_streamed_quantized_load_equals_transformers_load_bit_for_bit(tiny_model_dir, quantization):
    files = checkpoint_files(str(tiny_model_dir))
    assert files == [tiny_model_dir / "model.safetensors"]
    streamed = load_streamed(
        CLIPModel, str(tiny_model_dir), files, quantization_config=quantization_config(quantization), device_map="cpu"
    )
    assert streamed is not None  # it did stream
    reference = plain_load(tiny_model_dir, quantization)
    assert_same_model(streamed, reference)
    assert_same_model(load_clip(tiny_model_dir, quantization=quantization).model, reference)  # the toolkit's entry


def test_another_family_streams_the_same_way(tmp_path, caplog):
    """SigLIP: the family's own model class, through the same streamed path (not the fallback, which would
    give the same model: hence the check on the log)."""
    from transformers import SiglipModel

    from flora.modeling.tiny import write_tiny_siglip

    model_dir = write_tiny_siglip(tmp_path / "siglip")
    reference = SiglipModel.from_pretrained(str(model_dir), quantization_config=quantization_config("4bit"))
    with caplog.at_level("WARNING", logger="flora.modeling.loading"):
        loaded = load_clip(model_dir, quantization="4bit")
    assert "could not stream" not in caplog.text
    assert load_streamed(SiglipModel, str(model_dir), checkpoint_files(str(model_dir)), device_map="cpu",
                         quantization_config=quantization_config("4bit")) is not None  # fmt: skip
    assert loaded.family.name == "siglip"
    assert_same_model(loaded.model, reference)


def test_a_sharded_checkpoint_streams_every_shard(tiny_model_dir, tmp_path, caplog):
    sharded = tmp_path / "sharded"
    CLIPModel.from_pretrained(str(tiny_model_dir)).save_pretrained(sharded, max_shard_size="100KB")
    for name in ("tokenizer.json", "tokenizer_config.json", "processor_config.json"):
        (sharded / name).write_bytes((tiny_model_dir / name).read_bytes())
    files = checkpoint_files(str(sharded))
    assert files is not None and len(files) > 1
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    assert {f.name for f in files} == set(index["weight_map"].values())
    with caplog.at_level("WARNING", logger="flora.modeling.loading"):
        loaded = load_clip(sharded, quantization="4bit").model
    assert "could not stream" not in caplog.text  # streamed, not the fallback (which loads the same model)
    assert_same_model(loaded, plain_load(sharded, "4bit"))


def test_a_bin_checkpoint_loads_the_ordinary_way(tiny_model_dir, tmp_path):
    """No safetensors file: nothing to stream, transformers' own path (torch.load), the same weights."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "processor_config.json"):
        (bin_dir / name).write_bytes((tiny_model_dir / name).read_bytes())
    torch.save(CLIPModel.from_pretrained(str(tiny_model_dir)).state_dict(), bin_dir / "pytorch_model.bin")
    assert checkpoint_files(str(bin_dir)) is None
    assert_same_model(load_clip(bin_dir, quantization="4bit").model, plain_load(bin_dir, "4bit"))
    assert_same_model(
        plain_load(bin_dir, "4bit"), load_clip(tiny_model_dir, quantization="4bit").model, same_source=False
    )


def test_a_failing_stream_falls_back_to_transformers_load_with_a_warning(tiny_model_dir, monkeypatch, caplog):
    """A transformers release that stops taking lazy slices must cost memory, not the quantized base."""
    import flora.modeling.streamed as streamed

    def incompatible(*args, **kwargs):
        raise AttributeError("'builtins.PySafeSlice' object has no attribute 'is_floating_point'")

    monkeypatch.setattr(streamed, "load_streamed", incompatible)
    with caplog.at_level("WARNING", logger="flora.modeling.loading"):
        clip = load_clip(tiny_model_dir, quantization="4bit")
    assert "could not stream" in caplog.text and "is_floating_point" in caplog.text
    assert_same_model(clip.model, plain_load(tiny_model_dir, "4bit"))


# In a fresh process: the peak resident set of one 4-bit load, above what the loaded model keeps (the process's
# RSS after the load, its freed heap handed back), in MB. `streamed` picks the toolkit's load or transformers'.
PEAK_ABOVE_MODEL = textwrap.dedent(
    """
    import sys, torch
    torch.set_num_threads(1)
    from transformers import CLIPModel
    from flora.heap import release_freed_memory
    from flora.modeling.kbit import release_checkpoint_file
    from flora.modeling.loading import load_clip, quantization_config

    def status_mb(key):
        with open("/proc/self/status") as handle:
            return next(int(line.split()[1]) / 1024 for line in handle if line.startswith(key + ":"))

    model_dir, streamed = sys.argv[1], sys.argv[2] == "streamed"
    if streamed:
        model = load_clip(model_dir, quantization="4bit").model
    else:
        model = CLIPModel.from_pretrained(model_dir, quantization_config=quantization_config("4bit"), device_map="cpu")
        release_checkpoint_file(model)  # what the toolkit did after it: the file's map goes once the load ends
    release_freed_memory()
    print(status_mb("VmHWM") - status_mb("VmRSS"))
    """
)


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads the peak resident set from Linux's /proc")
def test_the_load_peak_holds_a_tensor_at_a_time_not_the_whole_file(tmp_path):
    """What streaming is for, measured: transformers' load peaks at about the whole float32 file above the model
    it keeps (every page it read stays resident until the load ends); the streamed load at a small fraction of it.
    A ~100 MB checkpoint, so the file stands out of the runtime's noise; each load in a fresh process."""
    model_dir = write_tiny_clip(tmp_path / "clip", hidden_size=512, layers=6, image_size=64, patch_size=16)
    file_mb = (model_dir / "model.safetensors").stat().st_size / 2**20

    def peak_above_model_mb(mode: str) -> float:
        result = subprocess.run(
            [sys.executable, "-c", PEAK_ABOVE_MODEL, str(model_dir), mode],
            capture_output=True,
            text=True,
            timeout=600,
            env={**__import__("os").environ, "OMP_NUM_THREADS": "1"},
        )
        assert result.returncode == 0, result.stderr[-3000:]
        return float(result.stdout.strip().splitlines()[-1])

    mapped, streamed = peak_above_model_mb("mapped"), peak_above_model_mb("streamed")
    assert file_mb > 90
    assert mapped > 0.8 * file_mb  # the measurement sees the file when it is there
    assert streamed < 0.25 * file_mb, (streamed, mapped, file_mb)
    print(f"file {file_mb:.0f} MB; peak above the loaded model: mapped {mapped:.0f} MB, streamed {streamed:.0f} MB")
