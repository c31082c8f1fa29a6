"""deploy/: the Jetson installer's dry run against sample L4T releases, the systemd units, the client config template.

The installer runs in a subprocess with --dry-run. Every program it may probe or call (python, dpkg-query, systemctl,
apt-get, ...) is a fake placed first on PATH that records its arguments, so these tests see exactly what the dry run
executed (only read-only probes) and never touch the real system or the network.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from edge_client.config import ClientConfig, load_client_config

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
INSTALLER = DEPLOY / "jetson" / "install.py"
RELEASES = Path(__file__).parent / "data" / "nv_tegra_release"
CLIENT_UNIT = DEPLOY / "systemd" / "flora-client.service"
COORDINATOR_UNIT = DEPLOY / "systemd" / "flora-coordinator.service"
TEMPLATE = DEPLOY / "client.toml.example"

# Programs the plan names; in a dry run none of them may be called except the read-only probes.
RECORDED = ["apt-get", "dpkg", "wget", "sh", "install", "groupadd", "useradd", "usermod", "ldconfig", "pip", "curl"]


def load_module(name: str, path: Path):
    sys.path.insert(0, str(path.parent))
    try:
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(path.parent))


@pytest.fixture(scope="module")
def installer():
    return load_module("flora_jetson_install", INSTALLER)


@pytest.fixture(scope="module")
def releases():
    return load_module("jetson_releases", INSTALLER.parent / "jetson_releases.py")


class FakeHost:
    """A PATH of recording fakes standing in for the Jetson's programs."""

    def __init__(self, root: Path, python: str = "3.10.12", jetpack: str | None = "6.2+b77", systemd: int = 249):
        self.bin = root / "bin"
        self.bin.mkdir(parents=True)
        self.log = root / "calls.log"
        self.config_path = root / "etc" / "client.toml"
        self.python = self._fake("python3", f"echo {python}")
        dpkg = f'echo "installed {jetpack}"' if jetpack else 'echo "dpkg-query: no packages found" >&2; exit 1'
        self._fake("dpkg-query", dpkg)
        self._fake("systemctl", f'echo "systemd {systemd} ({systemd}.11-0ubuntu3)"; echo "+PAM +AUDIT"')
        for name in RECORDED:
            self._fake(name, "exit 0")

    def _fake(self, name: str, body: str) -> Path:
        path = self.bin / name
        path.write_text(f'#!/bin/sh\necho "{name} $*" >> "{self.log}"\n{body}\n')
        path.chmod(0o755)
        return path

    def calls(self) -> list[str]:
        return self.log.read_text().splitlines() if self.log.exists() else []

    def run(self, *args: str, release: str | Path | None = "r36.4.3", dry_run: bool = True, python: Path | None = None):
        argv = [sys.executable, str(INSTALLER)]
        if dry_run:
            argv.append("--dry-run")
        if release is not None:
            argv += ["--release-file", str(release if isinstance(release, Path) else RELEASES / release)]
        argv += ["--python", str(python or self.python), "--node-id", "test-node"]
        argv += ["--config-path", str(self.config_path), *args]
        env = dict(os.environ, PATH=f"{self.bin}{os.pathsep}{os.environ['PATH']}")
        return subprocess.run(argv, capture_output=True, text=True, env=env, timeout=60)

    def plan(self, *args: str, release: str | Path = "r36.4.3", expect_ok: bool = True, python: Path | None = None):
        proc = self.run("--json", *args, release=release, python=python)
        plan = json.loads(proc.stdout)
        assert plan["ok"] is expect_ok, proc.stderr
        assert proc.returncode == (0 if expect_ok else 3), proc.stderr
        return plan


@pytest.fixture
def host(tmp_path):
    return FakeHost(tmp_path)


def step(plan: dict, sid: str) -> dict:
    (found,) = [s for s in plan["steps"] if s["id"] == sid]
    return found


def argvs(plan: dict, sid: str) -> list[list[str]]:
    return [c["argv"] for c in step(plan, sid)["commands"]]


# ---------------------------------------------------------------------------------------------------------------
# Release detection and wheel sources
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("release", "l4t", "jetpack"), [("r36.4.0", "36.4.0", "6.1"), ("r36.4.3", "36.4.3", "6.2")])
def test_jetpack6_gets_a_torch_that_transformers_accepts_from_the_jetson_index(host, release, l4t, jetpack):
    plan = host.plan(release=release)
    assert plan["release"]["l4t"] == l4t and plan["release"]["jetpack"] == jetpack
    assert plan["release"]["cuda"] == "12.6" and plan["release"]["system_python"] == "3.10"
    index = "https://pypi.jetson-ai-lab.io/jp6/cu126"
    torch = plan["sources"]["torch"]
    assert torch == {"kind": "index", "index": index, "version": "2.8.0", "python": "3.10", "origin": torch["origin"]}
    assert torch["origin"] == "Jetson AI Lab index" and plan["min_torch"] == "2.6"
    assert plan["sources"]["jetson_index"] == index
    assert plan["python"] == {"path": str(host.python), "version": "3.10.12", "required": "3.10", "ok": True}
    assert plan["quantization"] == {"if_4bit_check_passes": "4bit", "otherwise": "none"}
    ids = [s["id"] for s in plan["steps"]]
    assert "cusparselt" in ids and "cudss" in ids  # libcusparseLt.so.0 and libcudss.so.0, which L4T lacks

    (torch_cmd,) = argvs(plan, "torch")
    # Only the Jetson index and an exact version (newer ones there are not CUDA 12.6 builds), built against NumPy 1.x.
    assert torch_cmd[-4:] == ["--index-url", index, "numpy<2", "torch==2.8.0"] and "--extra-index-url" not in torch_cmd
    (bnb_cmd,) = argvs(plan, "bitsandbytes")
    assert bnb_cmd[-4:] == ["--no-deps", "--index-url", index, "bitsandbytes"]
    assert step(plan, "bitsandbytes")["optional"] is True
    (ort_cmd,) = argvs(plan, "onnxruntime")
    assert ort_cmd[-1] == "onnxruntime-gpu" and index in ort_cmd
    (flora_cmd,) = argvs(plan, "flora")
    assert flora_cmd[-2:] == [f"{ROOT}[edge]", "onnx>=1.16"]  # never [export]: it pulls CPU onnxruntime
    assert "-c" in flora_cmd and "-c" in ort_cmd  # the pins constrain every later pip install


def test_cudss_comes_from_nvidias_local_tegra_repository(host):
    commands = argvs(host.plan(), "cudss")
    assert commands[0][-1] == (
        "https://developer.download.nvidia.com/compute/cudss/0.6.0/local_installers/"
        "cudss-local-tegra-repo-ubuntu2204-0.6.0_0.6.0-1_arm64.deb"
    )
    assert commands[-1] == ["apt-get", "install", "-y", "cudss"]
    assert step(host.plan(), "cudss")["unless"] == "libcudss.so.0 is already installed"


def test_jetpack60_has_no_torch_transformers_accepts_and_is_refused_with_the_upgrade(host):
    plan = host.plan(release="r36.3.0", expect_ok=False)
    assert plan["release"]["jetpack"] == "6.0" and "steps" not in plan
    error = plan["error"]
    assert "PyTorch 2.4.0" in error and "jp6/cu122" in error and "below 2.6" in error
    assert "CLIPModel requires PyTorch >= 2.6" in error and "Nothing was installed" in error
    assert "Upgrade to JetPack 6.1 or 6.2" in error and "--torch-wheel" in error
    assert {line.split()[0] for line in host.calls()} <= {"python3", "dpkg-query", "systemctl"}


@pytest.mark.parametrize(
    ("args", "shown"),
    [
        (["--torch-source", "nvidia"], "NVIDIA JetPack wheel: PyTorch 2.5.0a0+872d972e41.nv24.08"),
        (
            ["--torch-wheel", "/srv/torch-2.5.0a0+872d972e41.nv24.08.17622132-cp310-cp310-linux_aarch64.whl"],
            "--torch-wheel: PyTorch 2.5.0a0+872d972e41.nv24.08",
        ),
        (["--torch-wheel", "https://example.org/w/torch-2.4.1-cp310-cp310-linux_aarch64.whl"], "PyTorch 2.4.1"),
    ],
)
def test_a_torch_below_what_transformers_accepts_is_refused_before_installing_anything(host, args, shown):
    plan = host.plan(*args, expect_ok=False)
    error = plan["error"]
    assert shown in error and "is below 2.6" in error and "transformers>=5,<6" in error
    assert "--torch-source jetson-ai-lab (PyTorch 2.8.0 for CUDA 12.6)" in error  # the fix
    assert {line.split()[0] for line in host.calls()} <= {"python3", "dpkg-query", "systemctl"}


def test_a_torch_wheel_transformers_accepts_is_planned(host):
    wheel = "/srv/torch-2.7.0-cp310-cp310-linux_aarch64.whl"
    plan = host.plan("--torch-wheel", wheel)
    assert plan["sources"]["torch"]["version"] == "2.7.0" and argvs(plan, "torch")[0][-1] == wheel
    odd = host.plan("--torch-wheel", "/srv/pytorch-build.whl")  # no version in the name: the training check decides
    assert any("cannot tell the PyTorch version" in w for w in odd["warnings"])


def test_steps_come_in_an_order_that_works(host):
    ids = [s["id"] for s in host.plan()["steps"]]
    assert ids == [
        "system-packages",
        "cusparselt",
        "cudss",
        "venv",
        "torch",
        "pin-torch",
        "bitsandbytes",
        "onnxruntime",
        "pin-builds",
        "flora",
        "check-training",
        "check-onnxruntime",
        "user",
        "directories",
        "config",
        "service",
    ]


def test_human_readable_plan_names_release_sources_and_every_step(host):
    proc = host.run()
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "nothing is changed" in out
    assert "L4T R36.4.3 = JetPack 6.2" in out
    assert "torch==2.8.0 from https://pypi.jetson-ai-lab.io/jp6/cu126 (needs >= 2.6: ok)" in out
    assert len(re.findall(r"^\s*\d+\. ", out, re.M)) == 16
    # The final check's command, which a real run executes and reads.
    assert f"$ /opt/flora/venv/bin/python {INSTALLER.parent / 'check_training.py'} --device cuda --4bit" in out
    assert "$ systemctl enable flora-client.service" in out


def test_dry_run_only_probes_and_installs_nothing(host):
    assert host.run().returncode == 0
    assert host.run("--json").returncode == 0
    programs = {line.split()[0] for line in host.calls()}
    assert programs == {"python3", "dpkg-query", "systemctl"}
    assert all(line == "systemctl --version" for line in host.calls() if line.startswith("systemctl"))


def test_the_training_check_is_planned_with_4bit_only_where_bitsandbytes_is_installed(host):
    check = INSTALLER.parent / "check_training.py"
    venv_python = "/opt/flora/venv/bin/python"
    assert step(host.plan(), "check-training")["probe"] == [venv_python, str(check), "--device", "cuda", "--4bit"]
    plan = host.plan("--no-bitsandbytes")
    assert step(plan, "check-training")["probe"] == [venv_python, str(check), "--device", "cuda"]


def test_source_checkout_and_no_bitsandbytes(host):
    plan = host.plan("--source", str(ROOT), "--no-bitsandbytes")
    assert plan["sources"]["flora"] == f"{ROOT}[train]"  # [edge] would pull PyPI's bitsandbytes back in
    assert plan["sources"]["bitsandbytes"] is None and plan["quantization"] == {"always": "none"}
    assert "bitsandbytes" not in [s["id"] for s in plan["steps"]]
    assert argvs(plan, "flora")[0][-2] == f"{ROOT}[train]"


def test_source_defaults_to_this_checkout_and_takes_a_wheel_built_from_it(host, tmp_path):
    assert host.plan()["sources"]["flora"] == f"{ROOT}[edge]"  # flora-edge is not on PyPI
    wheel = tmp_path / "dist" / "flora_edge-0.1.0-py3-none-any.whl"
    wheel.parent.mkdir()
    wheel.write_bytes(b"PK")
    plan = host.plan("--source", str(wheel))
    assert plan["sources"]["flora"] == f"{wheel}[edge]" and argvs(plan, "flora")[0][-2] == f"{wheel}[edge]"


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("missing/flora_edge-0.1.0-py3-none-any.whl", "no such file"),
        ("other-1.0-py3-none-any.whl", "neither a directory nor a flora_edge-*.whl"),
    ],
)
def test_a_source_that_is_no_checkout_or_flora_wheel_is_a_usage_error_saying_how_to_build_one(host, source, message):
    proc = host.run("--source", source)
    assert proc.returncode == 2 and message in proc.stderr
    assert "pip wheel --no-deps" in proc.stderr and "not on PyPI" in proc.stderr


def test_an_installer_outside_a_checkout_needs_source(installer, monkeypatch, tmp_path):
    monkeypatch.setattr(installer, "CHECKOUT", str(tmp_path))
    with pytest.raises(SystemExit) as raised:
        installer.parse_args(["--dry-run"])
    assert raised.value.code == 2
    assert installer.parse_args(["--dry-run", "--source", str(ROOT)]).source == str(ROOT)


# ---------------------------------------------------------------------------------------------------------------
# Python requirement and unsupported releases
# ---------------------------------------------------------------------------------------------------------------
def test_jetpack5_system_python_is_refused_with_the_options(tmp_path):
    old = FakeHost(tmp_path / "jp5", python="3.8.10", jetpack="5.1.2-b104")
    plan = old.plan(release="r35.4.1", expect_ok=False)
    assert plan["release"]["jetpack"] == "5.1.2" and plan["release"]["system_python"] == "3.8"
    error = plan["error"]
    assert "Python 3.8.10" in error and ">= 3.10" in error
    assert "JetPack 6" in error and "container" in error and "--torch-wheel" in error


@pytest.fixture
def python310(tmp_path):
    path = tmp_path / "python3.10"
    path.write_text("#!/bin/sh\necho 3.10.14\n")
    path.chmod(0o755)
    return path


def test_jetpack5_with_a_newer_python_still_needs_a_torch_wheel(host, python310):
    plan = host.plan(release="r35.5.0", python=python310, expect_ok=False)
    assert plan["release"]["jetpack"] == "5.1.3"
    assert "no PyTorch >= 2.6 wheel from NVIDIA or the Jetson AI Lab" in plan["error"]
    assert "--torch-wheel" in plan["error"] and "upgrade to JetPack 6.1 or 6.2" in plan["error"]


def test_jetpack5_with_python310_and_a_torch_wheel_is_planned_without_4bit(host, python310):
    refused = host.plan(
        "--torch-wheel",
        "/srv/torch-2.4.0-cp310-cp310-linux_aarch64.whl",
        release="r35.5.0",
        python=python310,
        expect_ok=False,
    )
    assert "PyTorch 2.4.0" in refused["error"] and "below 2.6" in refused["error"]
    wheel = "/srv/wheels/torch-2.6.0-cp310-cp310-linux_aarch64.whl"
    plan = host.plan("--torch-wheel", wheel, release="r35.5.0", python=python310)
    assert plan["sources"]["torch"]["origin"] == "--torch-wheel" and plan["sources"]["torch"]["python"] == "3.10"
    assert plan["sources"]["bitsandbytes"] is None and plan["quantization"] == {"always": "none"}
    assert plan["sources"]["onnxruntime"] == "onnxruntime (CPU) from PyPI"
    assert argvs(plan, "torch")[0][-1] == wheel
    assert "cusparselt" not in [s["id"] for s in plan["steps"]] and "cudss" not in [s["id"] for s in plan["steps"]]
    assert "--4bit" not in step(plan, "check-training")["probe"]


@pytest.mark.parametrize(
    ("release", "python", "message"),
    [
        ("r36.4.3", "3.12.3", "is for CPython 3.10, but"),  # the JetPack 6 builds are cp310 only
        ("r36.4.3", "3.9.5", "needs Python >= 3.10"),
    ],
)
def test_a_python_the_torch_wheel_does_not_fit_is_refused(tmp_path, release, python, message):
    host = FakeHost(tmp_path, python=python)
    plan = host.plan(release=release, expect_ok=False)
    assert message in plan["error"] and plan["release"]["jetpack"] == "6.2"


def test_a_wheel_for_another_python_is_refused(host):
    plan = host.plan("--torch-wheel", "torch-2.6.0-cp311-cp311-linux_aarch64.whl", expect_ok=False)
    assert "CPython 3.11" in plan["error"] and "3.10.12" in plan["error"]


def test_jetpack4_is_refused_clearly(host):
    plan = host.plan(release="r32.7.1", expect_ok=False)
    assert plan["release"]["jetpack"] == "4.6.1" and plan["release"]["system_python"] == "3.6"
    assert "Python 3.6" in plan["error"] and "Python >= 3.10" in plan["error"]
    proc = host.run(release="r32.7.1")
    assert proc.returncode == 3 and proc.stdout == ""
    assert proc.stderr.startswith("install.py: error: JetPack 4 (L4T R32)")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("# R38 (release), REVISION: 2.0, GCID: 0, BOARD: generic, EABI: aarch64, DATE: synthetic\n", "JetPack 7"),
        ("# R36 (release), REVISION: 2.0, GCID: 0, BOARD: generic, EABI: aarch64, DATE: synthetic\n", "Preview"),
        ("# R40 (release), REVISION: 1.0, GCID: 0, BOARD: generic, EABI: aarch64, DATE: synthetic\n", "unknown L4T"),
        ("Ubuntu 22.04.4 LTS\n", "no '# R<major> (release)"),
    ],
)
def test_unknown_or_unsupported_releases_exit_3_with_a_reason(host, tmp_path, text, message):
    release = tmp_path / "nv_tegra_release"
    release.write_text(text)
    plan = host.plan(release=release, expect_ok=False)
    assert message in plan["error"]


def test_missing_release_file_says_this_is_not_a_jetson(host, tmp_path):
    plan = host.plan(release=tmp_path / "absent", expect_ok=False)
    assert "does not look like a Jetson" in plan["error"]


def test_newer_r36_release_uses_the_newest_sources_with_a_warning(host, tmp_path):
    release = tmp_path / "nv_tegra_release"
    release.write_text("# R36 (release), REVISION: 5.2, GCID: 0, BOARD: generic, EABI: aarch64, DATE: synthetic\n")
    plan = host.plan(release=release)
    assert plan["sources"]["torch"]["index"].endswith("/jp6/cu126")
    assert any("newer than this installer's table" in w for w in plan["warnings"])


# ---------------------------------------------------------------------------------------------------------------
# nvidia-jetpack, systemd version, the config file, real-mode guards
# ---------------------------------------------------------------------------------------------------------------
def test_dpkg_jetpack_version_is_cross_checked(tmp_path):
    plan = FakeHost(tmp_path / "a", jetpack="6.2+b77").plan(release="r36.4.3")
    assert plan["dpkg_jetpack"] == "6.2+b77" and plan["warnings"] == []
    assert ["apt-get", "install", "-y", "nvidia-jetpack"] not in argvs(plan, "system-packages")

    plan = FakeHost(tmp_path / "b", jetpack="6.0+b106").plan(release="r36.4.3")
    assert any("does not match L4T R36.4.3" in w for w in plan["warnings"])

    plan = FakeHost(tmp_path / "c", jetpack=None).plan(release="r36.4.3")
    assert plan["dpkg_jetpack"] is None
    assert ["apt-get", "install", "-y", "nvidia-jetpack"] in argvs(plan, "system-packages")


@pytest.mark.parametrize(("systemd", "backoff"), [(249, False), (255, True)])
def test_restart_backoff_drop_in_only_where_systemd_understands_it(tmp_path, systemd, backoff):
    plan = FakeHost(tmp_path, systemd=systemd).plan()
    assert plan["systemd"] == systemd and plan["restart_backoff"] is backoff
    installs_drop_in = any(
        a[-1].endswith("flora-client.service.d/restart-backoff.conf") for a in argvs(plan, "service")
    )
    assert installs_drop_in is backoff


def test_an_existing_config_is_never_overwritten(host):
    assert host.plan()["config"] == {"path": str(host.config_path), "exists": False}
    assert step(host.plan(), "config")["title"].startswith("Write ")
    host.config_path.parent.mkdir(parents=True)
    host.config_path.write_text('node_id = "mine"\n')
    plan = host.plan()
    assert plan["config"]["exists"] is True and step(plan, "config")["title"].startswith("Keep the existing")
    assert host.config_path.read_text() == 'node_id = "mine"\n'


def test_a_real_run_refuses_a_simulated_release_before_doing_anything(host):
    proc = host.run(dry_run=False)
    assert proc.returncode == 2 and "--release-file is for previewing with --dry-run" in proc.stderr
    assert proc.stdout == "" and host.calls() == []
    proc = host.run("--json", dry_run=False, release=None)
    assert proc.returncode == 2 and "--json needs --dry-run" in proc.stderr


def test_bad_node_id_and_source_are_usage_errors(host, tmp_path):
    proc = host.run("--node-id", "a/b")
    assert proc.returncode == 2 and "--node-id" in proc.stderr
    proc = host.run("--source", str(tmp_path))
    assert proc.returncode == 2 and "no pyproject.toml" in proc.stderr


def test_a_real_run_on_a_machine_that_is_not_a_jetson_stops_at_once(host):
    if platform.machine() == "aarch64":
        pytest.skip("on an aarch64 machine a real run would go on to install")
    proc = host.run(dry_run=False, release=None)
    assert proc.returncode == 3 and "not a Jetson" in proc.stderr
    assert proc.stdout == "" and host.calls() == []


def test_execution_skips_falls_back_and_stops(installer, capsys):
    ok, fail = [sys.executable, "-c", "pass"], [sys.executable, "-c", "raise SystemExit(1)"]
    done = []
    steps = [
        installer.Step("skipped", "skipped", [installer.Command(fail)], unless=("already done", lambda: True)),
        installer.Step("fallback", "fallback", [installer.Command(fail)], fallback=[installer.Command(ok)]),
        installer.Step("optional", "optional", [installer.Command(fail)], optional=True),
        installer.Step("action", "action", [installer.Command(ok)], action=lambda context: done.append(context)),
        installer.Step("required", "required", [installer.Command(fail)], action=lambda context: done.append(0)),
        installer.Step("never", "never reached", [installer.Command(ok)], action=lambda context: done.append(0)),
    ]
    with pytest.raises(installer.InstallError, match=r"step 5 \(required\) failed") as raised:
        installer.execute(steps, {"run": 1})
    assert raised.value.exit_code == 1 and done == [{"run": 1}]
    err = capsys.readouterr().err
    assert "fallback: failed; trying the fallback" in err and "optional: failed; continuing" in err


def test_an_existing_config_is_kept_and_a_failed_4bit_check_is_pointed_out(installer, tmp_path, capsys):
    path = tmp_path / "client.toml"
    path.write_text('node_id = "mine"\nquantization = "4bit"\n')
    args = installer.parse_args(["--dry-run", "--config-path", str(path)])
    installer.action_write_config({"args": args, "quantization": "none"})
    assert path.read_text() == 'node_id = "mine"\nquantization = "4bit"\n'
    assert 'sets quantization = "4bit", which fails on this device' in capsys.readouterr().err


class FakeVenv:
    """/opt/flora/venv stand-in: bin/python answers the installer's version query and plays the training check."""

    def __init__(self, root: Path, versions: dict, training: dict | None = None, status: int = 0, noise: str = ""):
        self.root = root
        self.constraints = root / "constraints.txt"
        python = root / "bin" / "python"
        python.parent.mkdir(parents=True)
        (root / "versions.json").write_text(json.dumps(versions))
        (root / "training.out").write_text(noise + json.dumps(training or {}) + "\n")
        python.write_text(
            "#!/bin/sh\n"
            f'echo "$*" >> "{root}/calls.log"\n'
            'case "$*" in\n'
            f'  *check_training.py*) cat "{root}/training.out"; exit {status};;\n'
            f'  *) cat "{root}/versions.json";;\n'
            "esac\n"
        )
        python.chmod(0o755)

    def context(self, installer, *args: str, use_bnb: bool = True) -> dict:
        parsed = installer.parse_args(["--dry-run", "--venv", str(self.root), *args])
        torch = {"numpy_below_2": True}
        return {"args": parsed, "torch": torch, "use_bnb": use_bnb, "constraints": str(self.constraints)}


JETSON_BUILDS = {"torch": "2.8.0", "bitsandbytes": "0.48.0.dev0", "onnxruntime-gpu": "1.23.0"}
VERSIONS = {"torch": "2.8.0", "transformers": "5.24.0", "peft": "0.21.2", "bitsandbytes": "0.48.0.dev0"}


def test_constraints_pin_torch_bitsandbytes_and_onnxruntime_gpu_as_installed(installer, tmp_path, capsys):
    venv = FakeVenv(tmp_path / "venv", JETSON_BUILDS)
    installer.action_write_constraints(venv.context(installer))
    pins = [line for line in venv.constraints.read_text().splitlines() if not line.startswith("#")]
    assert pins == ["torch==2.8.0", "bitsandbytes==0.48.0.dev0", "onnxruntime-gpu==1.23.0", "numpy<2"]

    only_torch = FakeVenv(tmp_path / "early", {"torch": "2.8.0"})  # right after the torch step
    installer.action_write_constraints(only_torch.context(installer))
    assert "torch==2.8.0\nnumpy<2\n" in only_torch.constraints.read_text()


def test_a_passing_training_check_decides_4bit_and_pins_the_verified_transformers(installer, tmp_path, capsys):
    result = {"ok": True, "versions": VERSIONS, "float": {"ok": True, "loss": 1.2, "device": "cuda:0"}}
    result["4bit"] = {"ok": True, "loss": 1.1}
    venv = FakeVenv(tmp_path / "venv", JETSON_BUILDS, result, noise="a warning first\n")
    context = venv.context(installer)
    installer.action_check_training(context)
    assert context["quantization"] == "4bit"
    assert "transformers==5.24.0" in venv.constraints.read_text().splitlines()
    assert "bitsandbytes==0.48.0.dev0" in venv.constraints.read_text().splitlines()
    assert "check_training.py --device cuda --4bit" in (venv.root / "calls.log").read_text()

    result["4bit"] = {"ok": False, "error": "RuntimeError: Error named symbol not found at line 90 in file ops.cu"}
    failing = FakeVenv(tmp_path / "sbsa", JETSON_BUILDS, result)
    context = failing.context(installer)
    installer.action_check_training(context)
    assert context["quantization"] == "none"
    assert "4-bit training does not run on this GPU (RuntimeError: Error named symbol" in capsys.readouterr().err


def test_a_transformers_that_refuses_the_installed_torch_stops_the_installation_with_the_fix(installer, tmp_path):
    error = (
        "ImportError: CLIPModel requires PyTorch >= 2.6, but PyTorch was not found or an older version is installed."
    )
    result = {"ok": False, "versions": dict(VERSIONS, torch="2.5.0a0+872d972e41.nv24.08"), "float": {"ok": False}}
    result["float"]["error"] = error
    venv = FakeVenv(tmp_path / "venv", JETSON_BUILDS, result, status=1)
    context = venv.context(installer)
    with pytest.raises(installer.InstallError) as raised:
        installer.action_check_training(context)
    message = str(raised.value)
    assert raised.value.exit_code == 1 and error in message
    assert "transformers 5.24.0 refuses PyTorch 2.5.0a0+872d972e41.nv24.08: it needs >= 2.6" in message
    assert f'pip install -c {venv.constraints} "transformers<5.24.0"' in message
    assert "Nothing was set up as a service" in message and not venv.constraints.exists()


def test_a_training_check_that_prints_nothing_useful_still_fails_clearly(installer, tmp_path):
    venv = FakeVenv(tmp_path / "venv", JETSON_BUILDS, status=1, noise="ImportError: libcudss.so.0: cannot open\n")
    with pytest.raises(installer.InstallError, match=r"libcudss\.so\.0 is missing: install cuDSS 0\.6\.0"):
        installer.action_check_training(venv.context(installer, use_bnb=False))


def test_the_training_check_trains_a_tiny_clip_with_lora_here(tmp_path):
    pytest.importorskip("peft")
    pytest.importorskip("transformers")
    script = INSTALLER.parent / "check_training.py"
    env = dict(os.environ, HF_HOME=str(tmp_path / "hf"))
    proc = subprocess.run(
        [sys.executable, str(script), "--device", "cpu"], capture_output=True, text=True, env=env, timeout=240
    )
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert proc.returncode == 0 and result["ok"] is True, proc.stdout + proc.stderr
    assert result["float"]["lora_tensors"] == 12 and result["float"]["updated"] >= 1  # q, v, out_proj x 2 layers x A, B
    assert result["versions"]["transformers"] and "4bit" not in result


def test_node_id_from_hostname(installer):
    assert installer.node_id_from_hostname("jetson-orin-07") == "jetson-orin-07"
    assert installer.node_id_from_hostname("my jetson/07") == "my-jetson-07"
    assert installer.node_id_from_hostname("") == "jetson"
    assert len(installer.node_id_from_hostname("x" * 300)) == 128


# ---------------------------------------------------------------------------------------------------------------
# The tables themselves, and Python 3.6 syntax
# ---------------------------------------------------------------------------------------------------------------
def test_sample_files_parse_to_their_names(releases):
    for path in sorted(RELEASES.iterdir()):
        assert releases.dotted(releases.parse_release(path.read_text())) == path.name[1:]


def test_every_torch_source_names_its_line_and_version(releases):
    for family in releases.FAMILIES:
        for choice, torch in (family.get("torch") or {}).items():
            if not torch:
                continue
            assert torch["python"] == family["python"] and releases.parse_version(torch["version"])
            if choice == "nvidia":
                assert torch["url"].startswith(releases.NVIDIA_REDIST + "/v") and torch["url"].endswith(".whl")
                assert releases.wheel_python_tag(torch["url"]) == torch["python"]
                assert releases.wheel_torch_version(torch["url"]).startswith(torch["version"])
            else:
                assert torch["index"].startswith(releases.JETSON_AI_LAB + "/jp6/cu")
                assert torch["index"].endswith(family["cuda"].replace(".", ""))
    for l4t in releases.JETPACK_BY_L4T:
        assert releases.find_family(l4t) is not None, l4t
    # The line the installer is for has a default PyTorch that transformers accepts.
    default = releases.find_family((36, 4, 3))["torch"]["jetson-ai-lab"]
    assert releases.parse_version(default["version"])[:2] >= releases.MIN_TORCH


def test_min_torch_is_one_number_in_pyproject_the_installer_and_edge_md(releases):
    import tomllib

    train = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["train"]
    (torch,) = [r for r in train if re.match(r"torch\b", r)]
    minimum = releases.dotted(releases.MIN_TORCH)
    assert torch == f"torch>={minimum}"
    edge = (ROOT / "docs" / "EDGE.md").read_text()
    stated = set(re.findall(r"PyTorch (?:≥|>=) ?(\d+\.\d+)", edge))
    assert stated == {minimum}, f"docs/EDGE.md states PyTorch >= {sorted(stated)}; the installer needs {minimum}"


def test_min_torch_is_what_the_installed_transformers_accepts(releases):
    # transformers raises its floor within 5.x (2.2 in 5.0, 2.4 in 5.1, 2.6 by 5.20): a newer floor than MIN_TORCH
    # means the installer would plan a PyTorch that `flora client` cannot use.
    spec = importlib.util.find_spec("transformers.utils.import_utils")
    source = Path(spec.origin).read_text()
    found = re.search(r"Disabling PyTorch because PyTorch >= ([0-9.]+) is required", source)
    assert found, "transformers' PyTorch floor message moved: find the new one in transformers/utils/import_utils.py"
    floor = releases.parse_version(found.group(1))
    assert floor <= releases.MIN_TORCH, f"transformers now needs PyTorch >= {found.group(1)}: raise MIN_TORCH"


def test_scripts_keep_python36_syntax_so_old_jetpacks_get_a_clear_refusal():
    for path in (INSTALLER, INSTALLER.parent / "jetson_releases.py"):
        ast.parse(path.read_text(), filename=str(path), feature_version=(3, 6))


def _old_python() -> str | None:
    candidates = [shutil.which(f"python3.{minor}") for minor in (6, 7, 8)]
    candidates += sorted(str(p) for p in Path.home().glob(".pyenv/versions/3.[678].*/bin/python3"))
    for candidate in filter(None, candidates):
        probe = subprocess.run([candidate, "--version"], capture_output=True, text=True)
        if probe.returncode == 0:
            return candidate
    return None


def test_the_installer_runs_on_an_old_system_python(host):
    python = _old_python()
    if python is None:
        pytest.skip("no Python 3.6-3.8 interpreter on this machine")
    env = dict(os.environ, PATH=f"{host.bin}{os.pathsep}{os.environ['PATH']}")
    argv = [python, str(INSTALLER), "--dry-run", "--release-file", str(RELEASES / "r32.7.1")]
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 3 and "JetPack 4" in proc.stderr and "Traceback" not in proc.stderr
    argv = [python, str(INSTALLER), "--dry-run", "--json", "--release-file", str(RELEASES / "r36.4.3")]
    argv += ["--python", str(host.python), "--node-id", "n", "--config-path", str(host.config_path)]
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 0 and json.loads(proc.stdout)["release"]["jetpack"] == "6.2"


# ---------------------------------------------------------------------------------------------------------------
# Client config template
# ---------------------------------------------------------------------------------------------------------------
def template_keys(text: str) -> tuple[list[str], list[str]]:
    active = re.findall(r"^([a-z_]+)\s*=", text, re.M)
    optional = re.findall(r"^#\s*([a-z_]+)\s*=", text, re.M)
    return active, optional


def test_template_documents_exactly_the_client_settings():
    active, optional = template_keys(TEMPLATE.read_text())
    fields = [f.name for f in ClientConfig.__dataclass_fields__.values()]
    assert sorted(active + optional) == sorted(fields)  # each setting once, nothing unknown


def test_template_loads_as_is_and_with_every_optional_setting(tmp_path):
    data = tmp_path / "data"
    text = TEMPLATE.read_text().replace('"/var/lib/flora/data"', json.dumps(str(data)))
    path = tmp_path / "client.toml"
    path.write_text(text)
    config = load_client_config(path)
    assert config.data_dir == data and config.state_dir == Path("/var/lib/flora")
    assert config.quantization == "none" and config.exit_when_finished is False

    path.write_text(re.sub(r"^# ([a-z_]+ =)", r"\1", text, flags=re.M))
    config = load_client_config(path)
    assert config.username == "jetson-01" and config.ca_file == "/etc/flora/tls/ca.crt"
    assert config.compute_dtype == "bfloat16" and config.wire_encoding == "float16"


def test_installer_renders_the_template_into_a_valid_config(installer, tmp_path):
    args = installer.parse_args(
        ["--dry-run", "--node-id", "orin-nano-3", "--broker-url", "mqtts://broker.example:8883", "--run-id", "cifar"]
    )
    text = installer.render_config(TEMPLATE.read_text(), installer.config_values(args, "4bit"))
    assert len(text.splitlines()) == len(TEMPLATE.read_text().splitlines())  # comments kept, lines replaced
    path = tmp_path / "client.toml"
    path.write_text(text)
    config = load_client_config(path)
    assert (config.node_id, config.run_id, config.quantization) == ("orin-nano-3", "cifar", "4bit")
    assert config.broker_url == "mqtts://broker.example:8883" and config.model == "openai/clip-vit-base-patch32"
    assert config.data_dir == Path(installer.DATA_DIR) and config.state_dir == Path(installer.STATE_DIR)


# ---------------------------------------------------------------------------------------------------------------
# systemd units
# ---------------------------------------------------------------------------------------------------------------
def parse_unit(path: Path) -> dict[str, dict[str, list[str]]]:
    """Sections of a unit file; every key keeps all its values (Environment= repeats, which configparser drops)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] = {}
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        key, _, value = line.partition("=")
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def one(section: dict[str, list[str]], key: str) -> str:
    (value,) = section[key]
    return value


def test_client_unit_runs_the_agent_with_restart_state_logs_and_hardening(installer):
    unit = parse_unit(CLIENT_UNIT)
    service = unit["Service"]
    assert one(service, "Type") == "simple" and one(service, "User") == "flora"
    exec_start = shlex.split(one(service, "ExecStart"))
    assert exec_start == [f"{installer.DEFAULT_VENV}/bin/flora", "client", "--config", installer.DEFAULT_CONFIG]
    assert one(unit["Unit"], "AssertPathExists") == installer.DEFAULT_CONFIG
    assert one(service, "Restart") == "on-failure" and one(service, "RestartSec") == "15s"
    assert one(unit["Unit"], "StartLimitIntervalSec") == "0"  # keeps retrying while the broker is down
    assert one(service, "StateDirectory") == "flora" and one(service, "ConfigurationDirectory") == "flora"
    assert (
        "PYTHONUNBUFFERED=1" in service["Environment"]
        and "HF_HOME=/var/lib/flora/huggingface" in service["Environment"]
    )
    assert one(service, "StandardOutput") == "journal" and one(service, "StandardError") == "journal"
    assert one(service, "NoNewPrivileges") == "yes" and one(service, "PrivateTmp") == "yes"
    assert one(service, "ProtectSystem") == "strict" and one(service, "ReadWritePaths") == installer.STATE_DIR
    assert set(one(service, "SupplementaryGroups").split()) == {"video", "render"}
    # The GPU's device nodes must stay reachable: no device allow-list in any form.
    for key in ("PrivateDevices", "DevicePolicy", "DeviceAllow", "ProtectClock", "MemoryDenyWriteExecute"):
        assert key not in service, key
    assert one(unit["Install"], "WantedBy") == "multi-user.target"


def test_client_unit_command_line_is_one_flora_accepts():
    from flora.app.cli import build_parser

    args = build_parser().parse_args(shlex.split(one(parse_unit(CLIENT_UNIT)["Service"], "ExecStart"))[1:])
    assert args.command == "client" and args.config == "/etc/flora/client.toml"


def test_coordinator_unit():
    unit = parse_unit(COORDINATOR_UNIT)
    service = unit["Service"]
    exec_start = shlex.split(one(service, "ExecStart"))
    assert exec_start == ["/opt/flora/venv/bin/flora", "coordinator", "--config", "/etc/flora/coordinator.toml"]
    assert one(service, "StateDirectory") == "flora/coordinator"
    assert one(service, "ReadWritePaths") == "/var/lib/flora/coordinator"
    assert one(service, "Restart") == "on-failure" and one(service, "User") == "flora"
    assert one(unit["Install"], "WantedBy") == "multi-user.target"


def test_restart_backoff_drop_in():
    service = parse_unit(DEPLOY / "systemd" / "flora-client.service.d" / "restart-backoff.conf")["Service"]
    assert one(service, "RestartSteps") == "6" and one(service, "RestartMaxDelaySec") == "10min"


@pytest.mark.parametrize("unit", [CLIENT_UNIT, COORDINATOR_UNIT], ids=lambda p: p.name)
def test_units_pass_systemd_analyze_verify_when_available(tmp_path, unit):
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    # verify insists that ExecStart's program exists; /opt/flora/venv is not installed here.
    copy = tmp_path / unit.name
    copy.write_text(unit.read_text().replace("/opt/flora/venv/bin/flora", shutil.which("true") or "/bin/true"))
    proc = subprocess.run([analyze, "verify", "--man=no", str(copy)], capture_output=True, text=True, timeout=60)
    complaints = [line for line in (proc.stdout + proc.stderr).splitlines() if unit.name in line]
    assert proc.returncode == 0 and complaints == [], proc.stdout + proc.stderr


def test_no_extra_pins_a_dependency_exactly():
    # An exact pin in an extra fights every other tool installed beside flora-edge (issue: amqtt 0.11's typer pin).
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"].values()
    requirements = [*project["dependencies"], *(r for extra in extras for r in extra)]
    assert [r for r in requirements if "==" in r] == []
    assert "amqtt>=0.12" in project["optional-dependencies"]["broker"]
