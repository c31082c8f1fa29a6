"""The `flora` command as a user runs it: help on every subcommand, clear errors, and the whole demo."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

SUBCOMMANDS = ["demo", "coordinator", "client", "export", "broker", "status", "dashboard"]


def flora(*args, timeout=120, **kwargs):
    return subprocess.run(
        [sys.executable, "-m", "flora.app", *args], capture_output=True, text=True, timeout=timeout, **kwargs
    )


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_every_subcommand_has_help(command):
    result = flora(command, "--help")
    assert result.returncode == 0 and "usage: flora " + command in result.stdout


def test_help_config_lists_settings_with_defaults():
    result = flora("client", "--help-config")
    assert result.returncode == 0
    assert "memory" not in result.stderr and "quantization" in result.stdout
    # Defaults read as they are written in the TOML file, not as Python reprs.
    assert '"none"' in result.stdout and '"flora-client-state"' in result.stdout
    assert "PosixPath" not in result.stdout


def test_bad_config_fails_with_the_fix_in_the_message(tmp_path):
    path = tmp_path / "client.toml"
    path.write_text('node_id = "a"\nmodel = "m"\ndata_dir = "/d"\nquantisation = "4bit"\n')
    result = flora("client", "--config", str(path))
    assert result.returncode == 2
    assert "did you mean 'quantization'" in result.stderr and "Traceback" not in result.stderr


def test_bad_cli_value_is_refused():
    result = flora("demo", "--clients", "many")
    assert result.returncode == 2 and "invalid int value" in result.stderr


def test_embedded_broker_refuses_a_public_bind():
    result = flora("broker", "--host", "0.0.0.0")
    assert result.returncode == 2 and "anonymous" in result.stderr


@pytest.mark.slow
def test_demo_end_to_end_writes_every_output(tmp_path):
    out = tmp_path / "demo"
    result = flora("demo", "--out", str(out), "--clients", "2", "--rounds", "3", timeout=400)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    report = json.loads((out / "report.json").read_text())
    assert len(report["rounds"]) == 3 and all(r["participants"] == 2 for r in report["rounds"])
    for record in report["rounds"]:
        assert {"accuracy", "loss", "participants", "bytes_up", "bytes_down", "seconds"} <= set(record)
        assert record["bytes_up"] > 0 and record["bytes_down"] > 0
    assert report["final_accuracy"] > report["initial_accuracy"] + 0.1
    assert report["onnx"]["max_abs_diff"] <= 1e-4
    assert report["onnx"]["onnxruntime_accuracy"] == report["onnx"]["pytorch_accuracy"]
    assert abs(report["onnx"]["pytorch_accuracy"] - report["final_accuracy"]) < 1e-6
    assert (out / "metrics.png").read_bytes()[:4] == b"\x89PNG"
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in (out / "global_adapter").iterdir()}
    assert (out / "onnx" / "model.onnx").is_file()
    logs = {p.name for p in (out / "logs").iterdir()}
    assert {"coordinator.log", "client-0.log", "client-1.log", "broker.log"} <= logs


def test_export_offers_every_int8_scheme():
    from export.quantize import INT8_MODES
    from flora.app.cli import build_parser

    export = build_parser()._subparsers._group_actions[0].choices["export"]
    (scheme,) = [a for a in export._actions if a.dest == "int8_scheme"]
    assert tuple(scheme.choices) == INT8_MODES and scheme.default == "auto"
