"""What an L4T release is and where its Python packages come from: the data tables of deploy/jetson/install.py.

Facts, each with its source: /etc/nv_tegra_release's format, the L4T -> JetPack mapping, each JetPack line's Ubuntu,
Python and CUDA, NVIDIA's PyTorch wheel for it, and the Jetson AI Lab pip index for bitsandbytes and onnxruntime-gpu.
When NVIDIA publishes a release, add it here (and a sample file under tests/data/nv_tegra_release/).

Standard library only, Python 3.6 syntax (see install.py for why).
"""

import os
import re
import subprocess


def dotted(numbers):
    return ".".join(str(n) for n in numbers)


MIN_PYTHON = (3, 10)  # pyproject.toml: requires-python >= 3.10 (transformers 5)
# The oldest PyTorch that the transformers FLoRA Edge installs accepts: transformers' is_torch_available() disables
# PyTorch below a floor that rises within 5.x (transformers/utils/import_utils.py, "Disabling PyTorch because PyTorch
# >= X is required": 5.0 -> 2.2, 5.1 to 5.12 -> 2.4, 5.16 -> 2.5, 5.20 and 5.24 -> 2.6), and CLIPModel then fails
# with "CLIPModel requires PyTorch >= X". The same number is pyproject.toml's `torch>=` in the `train` extra and
# docs/EDGE.md's "PyTorch >= X"; tests/test_deploy.py checks that the three and the installed transformers agree.
MIN_TORCH = (2, 6)
EXIT_FAILED, EXIT_USAGE, EXIT_UNSUPPORTED = 1, 2, 3

# NVIDIA's JetPack PyTorch wheels ("Installing PyTorch for Jetson Platform"), one folder per JetPack: v512, v60, v61.
# All are below MIN_TORCH (JetPack 6.0: 2.4, 6.1/6.2: 2.5): kept for --torch-source nvidia, which is refused with
# the reason.
NVIDIA_REDIST = "https://developer.download.nvidia.com/compute/redist/jp"
# Jetson AI Lab pip index (jetson-containers builds: torch, bitsandbytes for sm_87, onnxruntime-gpu), one index per
# JetPack line and CUDA version. It moved from pypi.jetson-ai-lab.dev to pypi.jetson-ai-lab.io in 2025, and its
# files change (packages are rebuilt and replaced under new hashes), hence a version pin, never a file URL.
JETSON_AI_LAB = "https://pypi.jetson-ai-lab.io"
PYPI = "https://pypi.org/simple"
# cuSPARSELt: PyTorch builds for JetPack 6.1+ link libcusparseLt.so.0, which L4T does not ship. Local apt repo
# for Jetson (aarch64-jetson, Ubuntu 22.04) from https://developer.nvidia.com/cusparselt-downloads.
CUSPARSELT_VERSION = "0.7.1"
CUSPARSELT_DEB = (
    f"https://developer.download.nvidia.com/compute/cusparselt/{CUSPARSELT_VERSION}/local_installers/"
    f"cusparselt-local-tegra-repo-ubuntu2204-{CUSPARSELT_VERSION}_1.0-1_arm64.deb"
)
# cuDSS: the Jetson AI Lab's torch 2.8.0 for jp6/cu126 links libcudss.so.0 ("ImportError: libcudss.so.0" on a stock
# JetPack 6.2, NVIDIA/Isaac-GR00T issue 343); jetson-containers added cuDSS 0.6.0 for it in August 2025
# (packages/cuda/cudss: the local Tegra repo below, package `cudss`).
CUDSS_VERSION = "0.6.0"
CUDSS_DEB = (
    f"https://developer.download.nvidia.com/compute/cudss/{CUDSS_VERSION}/local_installers/"
    f"cudss-local-tegra-repo-ubuntu2204-{CUDSS_VERSION}_{CUDSS_VERSION}-1_arm64.deb"
)

# L4T release (from /etc/nv_tegra_release) -> JetPack release (NVIDIA's JetPack archive).
JETPACK_BY_L4T = {
    (32, 6, 1): "4.6",
    (32, 7, 1): "4.6.1",
    (32, 7, 2): "4.6.2",
    (32, 7, 3): "4.6.3",
    (32, 7, 4): "4.6.4",
    (32, 7, 5): "4.6.5",
    (32, 7, 6): "4.6.6",
    (34, 1, 0): "5.0 DP",
    (34, 1, 1): "5.0.1 DP",
    (35, 1, 0): "5.0.2",
    (35, 2, 1): "5.1",
    (35, 3, 1): "5.1.1",
    (35, 4, 1): "5.1.2",
    (35, 5, 0): "5.1.3",
    (35, 6, 0): "5.1.4",
    (35, 6, 1): "5.1.5",
    (36, 2, 0): "6.0 DP",
    (36, 3, 0): "6.0",
    (36, 4, 0): "6.1",
    (36, 4, 3): "6.2",
    (36, 4, 4): "6.2.1",
}

# One entry per L4T line: what the line ships and where its packages come from. `prefix` matches the
# release's leading numbers (the most specific entry wins). `torch` maps each --torch-source to its newest build for
# the line (version and CPython tag; numpy_below_2: built against NumPy 1.x), None where there is none; `upgrade`
# says what to do when no source reaches MIN_TORCH.
FAMILIES = [
    {
        "prefix": (32,),
        "line": "JetPack 4",
        "ubuntu": "18.04",
        "python": "3.6",
        "cuda": "10.2",
        "unsupported": "JetPack 4 (L4T R32) ships Python 3.6 and CUDA 10.2; NVIDIA's newest PyTorch for it is 1.10 "
        f"(Python 3.6). FLoRA Edge needs Python >= {dotted(MIN_PYTHON)} and PyTorch >= {dotted(MIN_TORCH)}. Jetson "
        "Nano and TX2 stop at JetPack 4: use them for inference with the exported ONNX model, or train on an Orin "
        "(JetPack 6).",
    },
    {
        "prefix": (34,),
        "line": "JetPack 5.0 Developer Preview",
        "ubuntu": "20.04",
        "python": "3.8",
        "cuda": "11.4",
        "unsupported": "JetPack 5.0 developer previews (L4T R34) are not supported: reflash with JetPack 6 "
        "(Orin) or JetPack 5.1.x (Xavier).",
    },
    {
        "prefix": (35,),
        "line": "JetPack 5",
        "ubuntu": "20.04",
        "python": "3.8",
        "cuda": "11.4",
        # NVIDIA's last JetPack 5 wheel: cp38 and torch 2.1, too old on both counts; shown in messages only.
        "nvidia_wheel_note": NVIDIA_REDIST + "/v512/pytorch/torch-2.1.0a0+41361538.nv23.06-cp38-cp38-linux_aarch64.whl",
        "torch": {"jetson-ai-lab": None, "nvidia": None},
        "upgrade": "Orin: upgrade to JetPack 6.1 or 6.2, which this installer supports fully.",
        "index": None,
        "cusparselt": False,
        "cudss": False,
    },
    {
        "prefix": (36, 2),
        "line": "JetPack 6.0 Developer Preview",
        "ubuntu": "22.04",
        "python": "3.10",
        "cuda": "12.2",
        "unsupported": "JetPack 6.0 Developer Preview (L4T R36.2) is not supported: upgrade to JetPack 6.1 "
        "or later (Orin: `sudo apt update && sudo apt dist-upgrade` onto the r36.4 repository, or reflash).",
    },
    {
        "prefix": (36, 3),
        "line": "JetPack 6.0",
        "ubuntu": "22.04",
        "python": "3.10",
        "cuda": "12.2",
        "torch": {
            # jp6/cu122's newest torch is 2.4.0 (jetson-containers' default for CUDA 12.2 stayed at 2.2:
            # packages/ml/pytorch/version.py); no build reaches MIN_TORCH for CUDA 12.2.
            "jetson-ai-lab": {
                "kind": "index",
                "index": JETSON_AI_LAB + "/jp6/cu122",
                "version": "2.4.0",
                "python": "3.10",
                "numpy_below_2": True,
                "origin": "Jetson AI Lab index",
            },
            "nvidia": {
                "kind": "wheel",
                "version": "2.4.0a0+07cecf4168.nv24.05",
                "python": "3.10",
                "url": NVIDIA_REDIST
                + "/v60/pytorch/torch-2.4.0a0+07cecf4168.nv24.05.14710581-cp310-cp310-linux_aarch64.whl",
                "numpy_below_2": True,
                "origin": "NVIDIA JetPack wheel",
            },
        },
        "upgrade": f"JetPack 6.0 (CUDA 12.2) has no PyTorch >= {dotted(MIN_TORCH)} build from NVIDIA or the Jetson "
        "AI Lab. Upgrade to JetPack 6.1 or 6.2 (L4T R36.4, CUDA 12.6): point "
        "/etc/apt/sources.list.d/nvidia-l4t-apt-source.list at r36.4, then `sudo apt update && sudo apt "
        "dist-upgrade` and reboot (or reflash with SDK Manager); then run this installer again.",
        "index": JETSON_AI_LAB + "/jp6/cu122",
        "cusparselt": False,
        "cudss": False,
    },
    {
        "prefix": (36, 4),
        "line": "JetPack 6.1 / 6.2",
        "ubuntu": "22.04",
        "python": "3.10",
        "cuda": "12.6",
        "torch": {
            # jp6/cu126 publishes torch 2.8.0 for cp310 (the wheel NVIDIA's forum, jetson-containers users and
            # NVIDIA/Isaac-GR00T install on JetPack 6.2); newer versions there are not CUDA 12.6 builds: pin it.
            "jetson-ai-lab": {
                "kind": "index",
                "index": JETSON_AI_LAB + "/jp6/cu126",
                "version": "2.8.0",
                "python": "3.10",
                "numpy_below_2": True,
                "origin": "Jetson AI Lab index",
            },
            "nvidia": {
                "kind": "wheel",
                "version": "2.5.0a0+872d972e41.nv24.08",
                "python": "3.10",
                "url": NVIDIA_REDIST
                + "/v61/pytorch/torch-2.5.0a0+872d972e41.nv24.08.17622132-cp310-cp310-linux_aarch64.whl",
                "numpy_below_2": True,
                "origin": "NVIDIA JetPack wheel",
            },
        },
        "upgrade": "Use the default, --torch-source jetson-ai-lab (PyTorch 2.8.0 for CUDA 12.6).",
        "index": JETSON_AI_LAB + "/jp6/cu126",
        "cusparselt": True,
        "cudss": True,
    },
    {
        "prefix": (38,),
        "line": "JetPack 7 (Jetson Thor)",
        "ubuntu": "24.04",
        "python": "3.12",
        "cuda": "13.0",
        "unsupported": "JetPack 7 (L4T R38, Jetson Thor) is not supported by this installer yet: install PyTorch "
        f'>= {dotted(MIN_TORCH)} for CUDA 13 into a venv yourself, then `pip install "/path/to/flora-edge[edge]"` '
        "(a checkout, or a wheel built from it) and use deploy/systemd by hand.",
    },
]


class InstallError(Exception):
    """The environment cannot be installed as it is; the message says why and what to do."""

    def __init__(self, message, release=None, exit_code=EXIT_UNSUPPORTED):
        super().__init__(message)
        self.release = release  # the release record, when the release was recognised
        self.exit_code = exit_code


# ---------------------------------------------------------------------------------------------------------------
# Facts about the host (read-only probes)
# ---------------------------------------------------------------------------------------------------------------
def capture(argv, merge_stderr=False):
    """Run a program; (exit status, its output) or (None, '') if it does not exist. merge_stderr keeps tracebacks."""
    try:
        proc = subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT if merge_stderr else subprocess.DEVNULL
        )
    except OSError:
        return None, ""
    out, _ = proc.communicate()
    return proc.returncode, out.decode("utf-8", "replace").strip()


def parse_release(text):
    """(major, minor, patch) from /etc/nv_tegra_release, whose first line reads
    `# R36 (release), REVISION: 4.3, GCID: 38968081, BOARD: generic, EABI: aarch64, DATE: ...` (L4T 36.4.3)."""
    for line in text.splitlines():
        match = re.match(r"^#\s*R(\d+)\s*\(([^)]*)\),\s*REVISION:\s*(\d+)(?:\.(\d+))?", line)
        if match:
            return int(match.group(1)), int(match.group(3)), int(match.group(4) or 0)
    return None


def parse_version(text):
    """Leading numbers of a version string: '6.2+b77' -> (6, 2), '5.1.2-b104' -> (5, 1, 2)."""
    match = re.match(r"\s*(\d+(?:\.\d+)*)", text or "")
    return tuple(int(part) for part in match.group(1).split(".")) if match else None


def jetpack_from_dpkg():
    """Version of the installed nvidia-jetpack meta-package (e.g. '6.2+b77'), or None when it is not installed."""
    status, out = capture(["dpkg-query", "-W", "--showformat=${db:Status-Status} ${Version}", "nvidia-jetpack"])
    if status != 0 or not out.startswith("installed "):
        return None
    return out.split(" ", 1)[1].strip() or None


def systemd_version():
    status, out = capture(["systemctl", "--version"])
    match = re.match(r"systemd (\d+)", out) if status == 0 else None
    return int(match.group(1)) if match else None


def python_version(python):
    status, out = capture([python, "-c", "import sys; print('.'.join(map(str, sys.version_info[:3])))"])
    if status is None:
        raise InstallError(f"Python interpreter {python!r} not found; pass --python /path/to/python3.10")
    version = parse_version(out)
    if status != 0 or not version or len(version) < 2:
        raise InstallError(f"cannot run {python!r} to read its version (got {out!r})")
    return version


def wheel_python_tag(wheel):
    """'3.10' from '...-cp310-cp310-linux_aarch64.whl', or None when the name has no CPython tag."""
    match = re.search(r"-cp(\d)(\d+)-", os.path.basename(wheel))
    return f"{match.group(1)}.{match.group(2)}" if match else None


# ---------------------------------------------------------------------------------------------------------------
# Which release, which sources
# ---------------------------------------------------------------------------------------------------------------
def find_family(l4t):
    best = None
    for family in FAMILIES:
        prefix = family["prefix"]
        if tuple(l4t[: len(prefix)]) == prefix and (best is None or len(prefix) > len(best["prefix"])):
            best = family
    return best


def describe_release(l4t, warnings):
    """The release record of the plan; raises InstallError for releases this installer refuses."""
    family = find_family(l4t)
    if family is None and l4t[0] == 36 and l4t[1] > 4:
        # Newer R36 releases keep JetPack 6's CUDA 12.6 userspace so far; the post-install checks catch a mismatch.
        family = find_family((36, 4, 0))
        warnings.append(
            f"L4T R{dotted(l4t)} is newer than this installer's table; using the JetPack 6.1/6.2 sources "
            "(CUDA 12.6). The PyTorch CUDA check after installation will tell if they do not fit."
        )
    jetpack = JETPACK_BY_L4T.get(tuple(l4t))
    if jetpack is None and family is not None:
        jetpack = family["line"].replace("JetPack ", "") + " (L4T release not in the table)"
    record = {
        "l4t": dotted(l4t),
        "jetpack": jetpack,
        "line": family["line"] if family else None,
        "ubuntu": family["ubuntu"] if family else None,
        "cuda": family["cuda"] if family else None,
        "system_python": family["python"] if family else None,
    }
    if family is None:
        known = ", ".join(sorted({f"R{dotted(f['prefix'])}" for f in FAMILIES}))
        raise InstallError(f"unknown L4T release R{dotted(l4t)}; this installer knows {known}", record)
    if "unsupported" in family:
        raise InstallError(family["unsupported"], record)
    return family, record


def torch_source(family, choice="jetson-ai-lab", wheel=None):
    """Where PyTorch comes from: an explicit wheel (--torch-wheel), the Jetson AI Lab index (choice "jetson-ai-lab",
    the default) or NVIDIA's JetPack wheel (choice "nvidia"). None when the line has no build from that source."""
    if wheel:
        return {
            "kind": "wheel",
            "url": wheel,
            "version": wheel_torch_version(wheel),
            "python": wheel_python_tag(wheel),
            "origin": "--torch-wheel",
            "numpy_below_2": False,
        }
    found = family["torch"].get(choice)
    return dict(found) if found else None


def wheel_torch_version(wheel):
    """'2.5.0a0+872d972e41.nv24.08' from '.../torch-2.5.0a0+872d972e41.nv24.08-cp310-cp310-linux_aarch64.whl' (the
    wheel file name's version field), or None when the name is not a torch wheel's."""
    match = re.match(r"torch-([0-9][^-]*)-", os.path.basename(wheel.split("#")[0].split("?")[0]))
    return match.group(1) if match else None


def check_torch_version(family, torch, warnings):
    """Refuse, before anything is installed, a PyTorch that transformers would disable (below MIN_TORCH)."""
    version = parse_version(torch.get("version"))
    where = torch.get("url") or f"torch=={torch.get('version')} from {torch.get('index')}"
    if version is None:
        warnings.append(
            f"cannot tell the PyTorch version of {where} from its name; it must be >= {dotted(MIN_TORCH)}, which the "
            "training check after installation verifies."
        )
        return
    if version[:2] >= MIN_TORCH:
        return
    wheel_hint = (
        f"pass --torch-wheel URL_OR_FILE with a PyTorch >= {dotted(MIN_TORCH)} wheel built for CUDA {family['cuda']} "
        f"and Python {family['python']}."
    )
    fix = f"{family.get('upgrade', '')} Or {wheel_hint}".strip()
    raise InstallError(
        f"{torch['origin']}: PyTorch {torch['version']} ({where}) is below {dotted(MIN_TORCH)}. The transformers "
        f"that FLoRA Edge installs (pyproject.toml: transformers>=5,<6) disables PyTorch below {dotted(MIN_TORCH)}, "
        f'and `flora client` would stop with "CLIPModel requires PyTorch >= {dotted(MIN_TORCH)}". Nothing was '
        f"installed. {fix}"
    )


def check_python(family, python, py_version, torch):
    """The venv's interpreter `python` (version `py_version`) must be >= 3.10 and the CPython the torch wheel needs."""
    found = dotted(py_version[:3])
    if tuple(py_version[:2]) < MIN_PYTHON:
        advice = [
            f"{python} is Python {found}; FLoRA Edge needs Python >= {dotted(MIN_PYTHON)}.",
        ]
        if family["prefix"] == (35,):
            advice += [
                "JetPack 5 ships Python 3.8, and NVIDIA's JetPack 5 PyTorch wheels are built for it only "
                f"(the last one is torch 2.1: {family['nvidia_wheel_note']}). Options:",
                "  1. Orin: upgrade to JetPack 6 (Python 3.10, CUDA 12), which this installer supports fully;",
                "  2. run the client in a container with a PyTorch built for Python >= 3.10 on L4T R35 "
                "(jetson-containers can build one from source);",
                "  3. pass --python /path/to/python3.10 (e.g. from the deadsnakes PPA) and --torch-wheel with a "
                f"PyTorch >= {dotted(MIN_TORCH)} wheel built for that Python and CUDA 11.4.",
            ]
        else:
            advice.append(f"Pass --python with a Python {dotted(MIN_PYTHON)}+ interpreter.")
        raise InstallError("\n".join(advice))
    if torch is None:
        short = dotted(py_version[:2])
        raise InstallError(
            f"there is no PyTorch >= {dotted(MIN_TORCH)} wheel from NVIDIA or the Jetson AI Lab for {family['line']} "
            f"and Python {short} (NVIDIA's last JetPack 5 wheel is torch 2.1 for Python 3.8). Pass --torch-wheel "
            f"URL_OR_FILE with a PyTorch >= {dotted(MIN_TORCH)} wheel built for CUDA {family['cuda']} and Python "
            f"{short}. {family.get('upgrade', '')}".strip()
        )
    needed = torch.get("python")
    if needed and needed != dotted(py_version[:2]):
        raise InstallError(
            f"the PyTorch build ({torch.get('url') or torch.get('index')}) is for CPython {needed}, but "
            f"{python} is Python {found}. Use the system Python {family['python']} (/usr/bin/python3) or pass "
            "--torch-wheel with a wheel built for your Python."
        )
    return {"path": python, "version": found, "required": needed or f">={dotted(MIN_PYTHON)}", "ok": True}
