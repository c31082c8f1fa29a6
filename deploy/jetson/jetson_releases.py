"""What an L4T release is and where its Python packages come from: the data tables of deploy/jetson/install.py.

Facts, each with its source: /etc/nv_tegra_release's format, the L4T -> JetPack mapping, each JetPack line's Ubuntu,
Python and CUDA, NVIDIA's PyTorch wheel for it, and the Jetson AI Lab pip index for bitsandbytes and onnxruntime-gpu.
When NVIDIA publishes a release, add it here (and a sample file under tests/data/nv_tegra_release/).

Standard library only, Python 3.6 syntax (see install.py for why).
"""

import os
import re
import subprocess

MIN_PYTHON = (3, 10)  # pyproject.toml: requires-python >= 3.10 (transformers 5)
MIN_TORCH = (2, 3)  # pyproject.toml: torch >= 2.3
EXIT_FAILED, EXIT_USAGE, EXIT_UNSUPPORTED = 1, 2, 3

# NVIDIA's JetPack PyTorch wheels ("Installing PyTorch for Jetson Platform"), one folder per JetPack: v512, v60, v61.
NVIDIA_REDIST = "https://developer.download.nvidia.com/compute/redist/jp"
# Jetson AI Lab pip index (jetson-containers builds: torch, bitsandbytes for sm_87, onnxruntime-gpu), one index per
# JetPack line and CUDA version. It moved from pypi.jetson-ai-lab.dev to pypi.jetson-ai-lab.io in 2025, and its
# contents change (packages are rebuilt and replaced), hence NVIDIA's fixed URLs for torch by default.
JETSON_AI_LAB = "https://pypi.jetson-ai-lab.io"
PYPI = "https://pypi.org/simple"
# cuSPARSELt: NVIDIA's torch wheels from 24.06 on link libcusparseLt.so.0, which L4T does not ship. Local apt repo
# for Jetson (aarch64-jetson, Ubuntu 22.04) from https://developer.nvidia.com/cusparselt-downloads.
CUSPARSELT_VERSION = "0.7.1"
CUSPARSELT_DEB = (
    f"https://developer.download.nvidia.com/compute/cusparselt/{CUSPARSELT_VERSION}/local_installers/"
    f"cusparselt-local-tegra-repo-ubuntu2204-{CUSPARSELT_VERSION}_1.0-1_arm64.deb"
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
# release's leading numbers (the most specific entry wins). torch wheels record their version and CPython tag;
# numpy_below_2: NVIDIA's wheels are compiled against NumPy 1.x.
FAMILIES = [
    {
        "prefix": (32,),
        "line": "JetPack 4",
        "ubuntu": "18.04",
        "python": "3.6",
        "cuda": "10.2",
        "unsupported": "JetPack 4 (L4T R32) ships Python 3.6 and CUDA 10.2; NVIDIA's newest PyTorch for it is 1.10 "
        "(Python 3.6). FLoRA Edge needs Python >= 3.10 and PyTorch >= 2.3. Jetson Nano and TX2 stop at JetPack 4: "
        "use them for inference with the exported ONNX model, or train on an Orin (JetPack 6).",
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
        "torch": None,
        "index": None,
        "cusparselt": False,
    },
    {
        "prefix": (36, 2),
        "line": "JetPack 6.0 Developer Preview",
        "ubuntu": "22.04",
        "python": "3.10",
        "cuda": "12.2",
        "unsupported": "JetPack 6.0 Developer Preview (L4T R36.2) is not supported: upgrade to JetPack 6.0 "
        "or later (Orin: `sudo apt update && sudo apt dist-upgrade` onto the r36.3+ repository, or reflash).",
    },
    {
        "prefix": (36, 3),
        "line": "JetPack 6.0",
        "ubuntu": "22.04",
        "python": "3.10",
        "cuda": "12.2",
        "torch": {
            "version": "2.4.0a0+07cecf4168.nv24.05",
            "python": "3.10",
            "url": NVIDIA_REDIST
            + "/v60/pytorch/torch-2.4.0a0+07cecf4168.nv24.05.14710581-cp310-cp310-linux_aarch64.whl",
            "numpy_below_2": True,
        },
        "index": JETSON_AI_LAB + "/jp6/cu122",
        "cusparselt": False,  # the 24.05 build predates the cuSPARSELt dependency
    },
    {
        "prefix": (36, 4),
        "line": "JetPack 6.1 / 6.2",
        "ubuntu": "22.04",
        "python": "3.10",
        "cuda": "12.6",
        "torch": {
            "version": "2.5.0a0+872d972e41.nv24.08",
            "python": "3.10",
            "url": NVIDIA_REDIST
            + "/v61/pytorch/torch-2.5.0a0+872d972e41.nv24.08.17622132-cp310-cp310-linux_aarch64.whl",
            "numpy_below_2": True,
        },
        "index": JETSON_AI_LAB + "/jp6/cu126",
        "cusparselt": True,
    },
    {
        "prefix": (38,),
        "line": "JetPack 7 (Jetson Thor)",
        "ubuntu": "24.04",
        "python": "3.12",
        "cuda": "13.0",
        "unsupported": "JetPack 7 (L4T R38, Jetson Thor) is not supported by this installer yet: install PyTorch "
        "for CUDA 13 yourself, then `pip install flora-edge[edge]` into a venv and use deploy/systemd by hand.",
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


def dotted(numbers):
    return ".".join(str(n) for n in numbers)


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


def torch_source(family, choice="nvidia", wheel=None):
    """Where PyTorch comes from: an explicit wheel (--torch-wheel), the Jetson AI Lab index (choice "jetson-ai-lab")
    or NVIDIA's JetPack wheel (choice "nvidia"). None when the line has no usable default."""
    if wheel:
        return {
            "kind": "wheel",
            "url": wheel,
            "python": wheel_python_tag(wheel),
            "origin": "--torch-wheel",
            "numpy_below_2": False,
        }
    if choice == "jetson-ai-lab" and family["index"]:
        return {"kind": "index", "index": family["index"], "python": family["python"], "origin": "Jetson AI Lab"}
    if family["torch"] is None:
        return None
    return dict(family["torch"], kind="wheel", origin="NVIDIA JetPack wheel")


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
                "PyTorch >= 2.3 wheel built for that Python and CUDA 11.4.",
            ]
        else:
            advice.append(f"Pass --python with a Python {dotted(MIN_PYTHON)}+ interpreter.")
        raise InstallError("\n".join(advice))
    if torch is None:
        short = dotted(py_version[:2])
        raise InstallError(
            f"there is no PyTorch >= {dotted(MIN_TORCH)} wheel from NVIDIA for {family['line']} and Python {short} "
            f"(NVIDIA's last JetPack 5 wheel is torch 2.1 for Python 3.8). Pass --torch-wheel URL_OR_FILE with a "
            f"PyTorch >= {dotted(MIN_TORCH)} wheel built for CUDA {family['cuda']} and Python {short}."
        )
    needed = torch.get("python")
    if needed and needed != dotted(py_version[:2]):
        raise InstallError(
            f"the PyTorch wheel ({torch.get('url') or torch.get('index')}) is built for CPython {needed}, but "
            f"{python} is Python {found}. Use the system Python {family['python']} (/usr/bin/python3) or pass "
            "--torch-wheel with a wheel built for your Python."
        )
    return {"path": python, "version": found, "required": needed or f">={dotted(MIN_PYTHON)}", "ok": True}
