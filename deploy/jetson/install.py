#!/usr/bin/env python3
"""Install the FLoRA Edge client on an NVIDIA Jetson as a systemd service.

    python3 deploy/jetson/install.py --dry-run              # print the plan; changes nothing, needs no root
    python3 deploy/jetson/install.py --dry-run --json       # the same plan as JSON
    sudo python3 deploy/jetson/install.py --source .        # install from this checkout

What it does: reads the L4T release (/etc/nv_tegra_release, cross-checked with the nvidia-jetpack package), picks
PyTorch, bitsandbytes and onnxruntime-gpu from the Jetson AI Lab index (refusing, before installing anything, a
PyTorch below what transformers accepts), installs them and FLoRA Edge (from this checkout, or --source: a checkout
or a wheel built from one) into /opt/flora/venv, pins those builds in /opt/flora/constraints.txt, checks that
PyTorch sees CUDA, then runs one LoRA training step on a tiny CLIP on the GPU (and one on a 4-bit base: its result
decides the quantization), creates the `flora` user, writes /etc/flora/client.toml from deploy/client.toml.example
if absent (never over an existing one) and installs and enables deploy/systemd/flora-client.service. See
docs/EDGE.md.

Python, not bash: the plan is data (printed for people, JSON for tests), release detection and version rules are
tables and functions that tests/test_deploy.py runs against sample release files, and TOML is rendered safely.
Standard library only and Python 3.6 syntax, on purpose: it runs on the system Python of any JetPack before anything
is installed (3.10 on JetPack 6, 3.8 on JetPack 5, 3.6 on JetPack 4), so even a device it refuses gets a clear
reason instead of a SyntaxError. The release tables live in jetson_releases.py next to this file.

Exit status: 0 done (or plan printed), 1 an installation step failed, 2 bad arguments,
3 this device cannot be supported as it is (release, Python); the message says what to do.
"""

import argparse
import grp
import json
import os
import platform
import pwd
import re
import shlex
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from jetson_releases import (  # noqa: E402 - the sibling module is found through HERE
    CUDSS_DEB,
    CUDSS_VERSION,
    CUSPARSELT_DEB,
    CUSPARSELT_VERSION,
    EXIT_FAILED,
    EXIT_USAGE,
    JETPACK_BY_L4T,
    MIN_TORCH,
    PYPI,
    InstallError,
    capture,
    check_python,
    check_torch_version,
    describe_release,
    dotted,
    jetpack_from_dpkg,
    parse_release,
    parse_version,
    python_version,
    systemd_version,
    torch_source,
)

DEPLOY_DIR = os.path.dirname(HERE)
CHECKOUT = os.path.dirname(DEPLOY_DIR)  # the flora-edge checkout this installer belongs to, if it is in one
CHECK_SCRIPT = os.path.join(HERE, "check_training.py")
CLIENT_TEMPLATE = os.path.join(DEPLOY_DIR, "client.toml.example")
UNIT_SOURCE = os.path.join(DEPLOY_DIR, "systemd", "flora-client.service")
BACKOFF_SOURCE = os.path.join(DEPLOY_DIR, "systemd", "flora-client.service.d", "restart-backoff.conf")

DEFAULT_RELEASE_FILE = "/etc/nv_tegra_release"
DEFAULT_VENV = "/opt/flora/venv"
DEFAULT_CONFIG = "/etc/flora/client.toml"
CONSTRAINTS = "/opt/flora/constraints.txt"
STATE_DIR = "/var/lib/flora"
DATA_DIR = STATE_DIR + "/data"
SERVICE_USER = "flora"
UNIT_NAME = "flora-client.service"
UNIT_PATH = "/etc/systemd/system/" + UNIT_NAME
BACKOFF_PATH = "/etc/systemd/system/flora-client.service.d/restart-backoff.conf"
SYSTEMD_BACKOFF_MIN = 254  # first systemd with RestartSteps= / RestartMaxDelaySec=

# Run inside the venv after installation (printed, never run, in a dry run).
TORCH_CHECK = """\
import importlib.metadata, json, torch
info = {"version": importlib.metadata.version("torch"), "cuda": torch.version.cuda}
info["available"] = torch.cuda.is_available()
if info["available"]:
    info["device"] = torch.cuda.get_device_name(0)
    info["capability"] = "%d.%d" % torch.cuda.get_device_capability(0)
    info["sum"] = float((torch.ones(4, device="cuda") * 2).sum())
print(json.dumps(info))
"""
# The builds that constraints.txt pins once installed: every later `pip install -c` keeps them (a plain PyPI
# resolution would replace them with a CPU torch, a server-ARM bitsandbytes, a CPU onnxruntime).
PINNED = ("torch", "bitsandbytes", "onnxruntime-gpu")
VERSIONS_QUERY = """\
import importlib.metadata as m, json, sys
found = {}
for name in sys.argv[1:]:
    try:
        found[name] = m.version(name)
    except m.PackageNotFoundError:
        pass
print(json.dumps(found))
"""
ORT_CHECK = "import onnxruntime as ort; print(' '.join(ort.get_available_providers()))"


def node_id_from_hostname(hostname):
    """A valid node id (letters, digits, '_', '.', '-'; 1-128 characters) from this machine's hostname."""
    name = re.sub(r"[^A-Za-z0-9_.\-]+", "-", hostname or "").lstrip("_.-")[:128]
    return name or "jetson"


# ---------------------------------------------------------------------------------------------------------------
# The plan: steps of commands (argv lists) and in-process actions
# ---------------------------------------------------------------------------------------------------------------
class Command:
    def __init__(self, argv, unless=None):
        self.argv = [str(a) for a in argv]
        self.unless = unless  # (description, predicate): skipped when the predicate holds at run time

    def to_json(self):
        return {"argv": self.argv, "unless": self.unless[0] if self.unless else None}

    def render(self):
        text = " ".join(shlex.quote(a) for a in self.argv)
        return f"$ {text}" + (f"    # unless {self.unless[0]}" if self.unless else "")


class Step:
    def __init__(
        self, sid, title, commands=(), optional=False, fallback=(), action=None, note=None, unless=None, probe=None
    ):
        self.sid = sid
        self.title = title
        self.commands = list(commands)
        self.optional = optional  # failure warns and continues (its fallback commands run, if any)
        self.fallback = list(fallback)
        self.action = action  # callable(context) run after the commands
        self.note = note
        self.unless = unless  # (description, predicate): the whole step is skipped when the predicate holds
        self.probe = probe  # a Command the action runs and reads (shown in the plan, run by the action)

    def to_json(self):
        return {
            "id": self.sid,
            "unless": self.unless[0] if self.unless else None,
            "title": self.title,
            "commands": [c.to_json() for c in self.commands],
            "optional": self.optional,
            "fallback": [c.to_json() for c in self.fallback],
            "probe": self.probe.argv if self.probe else None,
            "note": self.note,
        }


def _group_exists(name):
    try:
        grp.getgrnam(name)
        return True
    except KeyError:
        return False


def _user_exists(name):
    try:
        pwd.getpwnam(name)
        return True
    except KeyError:
        return False


def _has_library(name):
    return lambda: name in capture(["ldconfig", "-p"])[1]


def local_repo_step(sid, title, deb_url, keyring, package, library):
    """Install `package` from one of NVIDIA's local Tegra apt repositories (a .deb that unpacks the repository and
    its `keyring` under /var), unless `library` is already known to the dynamic linker."""
    deb = f"/tmp/{sid}-local-tegra-repo.deb"
    return Step(
        sid,
        title,
        [
            Command(["wget", "-q", "-O", deb, deb_url]),
            Command(["dpkg", "-i", deb]),
            Command(["sh", "-c", f"cp {keyring} /usr/share/keyrings/"]),
            Command(["apt-get", "update"]),
            Command(["apt-get", "install", "-y", package]),
        ],
        unless=(f"{library} is already installed", _has_library(library)),
    )


def build_plan(args, plan):
    family, torch, use_bnb = plan["_family"], plan["_torch"], plan["_use_bnb"]
    index, package = family["index"], plan["sources"]["flora"]
    venv_python = os.path.join(args.venv, "bin", "python")
    pip = [venv_python, "-m", "pip", "install", "--no-input"]
    pip_constrained = [*pip, "-c", CONSTRAINTS]
    steps = []

    apt = ["python3-venv", "python3-pip", "libopenblas-dev", "wget"]  # libopenblas: NVIDIA's torch wheels link it
    commands = [Command(["apt-get", "update"]), Command(["apt-get", "install", "-y", "--no-install-recommends", *apt])]
    if plan["dpkg_jetpack"] is None:
        # SD-card images and BSP-only flashes lack CUDA, cuDNN and TensorRT; the meta-package brings them.
        commands.append(Command(["apt-get", "install", "-y", "nvidia-jetpack"]))
    steps.append(Step("system-packages", "Install system packages (apt)", commands))

    if family["cusparselt"]:
        steps.append(
            local_repo_step(
                "cusparselt",
                f"Install cuSPARSELt {CUSPARSELT_VERSION} (libcusparseLt.so.0, needed by JetPack 6.1+ PyTorch builds)",
                CUSPARSELT_DEB,
                f"/var/cusparselt-local-tegra-repo-ubuntu2204-{CUSPARSELT_VERSION}/cusparselt-*-keyring.gpg",
                "libcusparselt0",
                "libcusparseLt.so.0",
            )
        )
    if family["cudss"]:
        steps.append(
            local_repo_step(
                "cudss",
                f"Install cuDSS {CUDSS_VERSION} (libcudss.so.0, needed by the Jetson AI Lab's PyTorch 2.8)",
                CUDSS_DEB,
                f"/var/cudss-local-tegra-repo-ubuntu2204-{CUDSS_VERSION}/cudss-*-keyring.gpg",
                "cudss",
                "libcudss.so.0",
            )
        )

    venv_exists = (f"{venv_python} exists", lambda: os.path.exists(venv_python))
    steps.append(
        Step(
            "venv",
            f"Create the virtual environment {args.venv} with {args.python} (Python {plan['python']['version']})",
            [
                Command([args.python, "-m", "venv", args.venv], unless=venv_exists),
                Command([*pip, "--upgrade", "pip"]),
            ],
        )
    )

    numpy = ["numpy<2"] if torch.get("numpy_below_2") else []
    if torch["kind"] == "wheel":
        torch_cmd = [*pip, *numpy, torch["url"]]
    else:
        # Only that index, and an exact version: newer torch versions there are not built for this CUDA.
        torch_cmd = [*pip, "--index-url", torch["index"], *numpy, f"torch=={torch['version']}"]
    steps.append(
        Step(
            "torch",
            f"Install PyTorch {torch.get('version') or ''} ({torch['origin']}; CUDA {family['cuda']})".replace(
                "  ", " "
            ),
            [Command(torch_cmd)],
            action=action_check_torch,
            note="then: PyTorch must see the GPU, or the installation stops",
        )
    )
    steps.append(
        Step(
            "pin-torch",
            f"Pin the installed PyTorch in {CONSTRAINTS}, so no later pip install replaces it with a CPU wheel",
            action=action_write_constraints,
            note="torch==<the installed version>" + (", numpy<2" if numpy else ""),
        )
    )
    if use_bnb:
        steps.append(
            Step(
                "bitsandbytes",
                f"Install bitsandbytes built for Jetson (sm_87) from {index}",
                [Command([*pip, "--no-deps", "--index-url", index, "bitsandbytes"])],
                optional=True,
                note="if this fails, 4-bit stays off: PyPI's aarch64 wheel is built for server ARM and the 4-bit "
                "training check rejects it",
            )
        )
    if index:
        ort = Step(
            "onnxruntime",
            f"Install onnxruntime-gpu from {index}",
            [Command([*pip_constrained, "--index-url", index, "--extra-index-url", PYPI, "onnxruntime-gpu"])],
            optional=True,
            fallback=[Command([*pip_constrained, "onnxruntime>=1.18"])],
            note="on failure: CPU onnxruntime from PyPI",
        )
    else:
        ort = Step(
            "onnxruntime", "Install onnxruntime (CPU) from PyPI", [Command([*pip_constrained, "onnxruntime>=1.18"])]
        )
    steps.append(ort)
    steps.append(
        Step(
            "pin-builds",
            f"Pin the installed {', '.join(PINNED)} in {CONSTRAINTS} (those present), so that installing FLoRA "
            "Edge keeps the Jetson builds",
            action=action_write_constraints,
            note=" ".join(f"{name}==<installed>" for name in PINNED) + (", numpy<2" if numpy else ""),
        )
    )
    steps.append(
        Step(
            "flora",
            f"Install FLoRA Edge ({package}) and onnx",
            # Not the [export] extra: it names `onnxruntime`, which would install the CPU package over onnxruntime-gpu.
            [Command([*pip_constrained, package, "onnx>=1.16"])],
        )
    )
    probe = [venv_python, CHECK_SCRIPT, "--device", "cuda"] + (["--4bit"] if use_bnb else [])
    steps.append(
        Step(
            "check-training",
            "Check training: a tiny CLIP written and loaded with transformers, LoRA (peft) on its text tower, one "
            "optimizer step on the GPU" + (", then one on a 4-bit (bitsandbytes NF4) base" if use_bnb else ""),
            action=action_check_training,
            probe=Command(probe),
            note="a failed full-precision step stops the installation before the service is set up; "
            + ('the 4-bit step decides quantization = "4bit" or "none"' if use_bnb else 'quantization = "none": ')
            + (
                ""
                if use_bnb
                else "bitsandbytes skipped (--no-bitsandbytes)"
                if args.no_bitsandbytes
                else f"no bitsandbytes build known for {family['line']}"
            ),
        )
    )
    steps.append(Step("check-onnxruntime", "Report ONNX Runtime's execution providers", action=action_check_ort))
    steps.append(
        Step(
            "user",
            f"Create the system user {SERVICE_USER} with access to the GPU (groups video, render)",
            [
                Command(
                    ["groupadd", "--system", "render"], unless=("group render exists", lambda: _group_exists("render"))
                ),
                Command(
                    [
                        "useradd",
                        "--system",
                        "--user-group",
                        "--home-dir",
                        STATE_DIR,
                        "--no-create-home",
                        "--shell",
                        "/usr/sbin/nologin",
                        SERVICE_USER,
                    ],
                    unless=(f"user {SERVICE_USER} exists", lambda: _user_exists(SERVICE_USER)),
                ),
                Command(["usermod", "-a", "-G", "video,render", SERVICE_USER]),
            ],
        )
    )
    config_dir = os.path.dirname(args.config_path)
    steps.append(
        Step(
            "directories",
            f"Create {config_dir} and {STATE_DIR} (owned by {SERVICE_USER}, mode 0750) with {DATA_DIR}",
            [
                Command(["install", "-d", "-m", "0755", config_dir]),
                Command(["install", "-d", "-o", SERVICE_USER, "-g", SERVICE_USER, "-m", "0750", STATE_DIR, DATA_DIR]),
            ],
        )
    )
    if plan["config"]["exists"]:
        title = f"Keep the existing {args.config_path} (never overwritten)"
    else:
        title = f"Write {args.config_path} from deploy/client.toml.example (root:{SERVICE_USER}, mode 0640)"
    steps.append(Step("config", title, action=action_write_config))

    unit_commands = [Command(["install", "-m", "0644", UNIT_SOURCE, UNIT_PATH])]
    if plan["restart_backoff"]:
        unit_commands.append(Command(["install", "-D", "-m", "0644", BACKOFF_SOURCE, BACKOFF_PATH]))
    unit_commands += [Command(["systemctl", "daemon-reload"]), Command(["systemctl", "enable", UNIT_NAME])]
    if args.start:
        unit_commands.append(Command(["systemctl", "restart", UNIT_NAME]))
    steps.append(Step("service", f"Install and enable the systemd unit {UNIT_NAME}", unit_commands))
    return steps


# ---------------------------------------------------------------------------------------------------------------
# In-process actions (real installation only)
# ---------------------------------------------------------------------------------------------------------------
def _venv_python(context):
    return os.path.join(context["args"].venv, "bin", "python")


def action_check_torch(context):
    status, out = capture([_venv_python(context), "-c", TORCH_CHECK], merge_stderr=True)
    info = {}
    if status == 0:
        try:
            info = json.loads(out.splitlines()[-1])
        except (ValueError, IndexError):
            info = {}
    if not info.get("available"):
        hints = [f"PyTorch in {context['args'].venv} does not see the GPU ({out or 'no output'})."]
        if status != 0 and "libcusparseLt" in out:
            hints.append("libcusparseLt.so.0 is missing: install cuSPARSELt (see docs/EDGE.md, troubleshooting).")
        elif status != 0 and "libcudss" in out:
            hints.append(f"libcudss.so.0 is missing: install cuDSS {CUDSS_VERSION} (the `cudss` step of --dry-run).")
        elif info.get("cuda") is None and status == 0:
            hints.append(
                "torch.version.cuda is None: a CPU wheel from PyPI got installed. Reinstall the Jetson build: "
                f"{context['args'].venv}/bin/pip install --force-reinstall --no-deps <the torch command of --dry-run>."
            )
        hints.append("Is the user in group video, and does `nvidia-smi` or `tegrastats` show the GPU?")
        raise InstallError(" ".join(hints))
    context["torch_version"] = info["version"]
    say(f"    PyTorch {info['version']}, CUDA {info['cuda']}, {info.get('device')} (sm_{info['capability']})")


def _constraints(context):
    return context.get("constraints") or CONSTRAINTS


def _last_json(out):
    """The last line of a probe's output that is a JSON object (warnings may come before it), or {}."""
    for line in reversed(out.splitlines()):
        try:
            value = json.loads(line)
        except ValueError:
            continue
        if isinstance(value, dict):
            return value
    return {}


def action_write_constraints(context):
    """Pin what the venv has of PINNED (and, once the training check passed, the transformers it verified)."""
    status, out = capture([_venv_python(context), "-c", VERSIONS_QUERY, *PINNED], merge_stderr=True)
    found = _last_json(out) if status == 0 else {}
    if "torch" not in found:
        raise InstallError(
            f"cannot read the installed PyTorch version in {context['args'].venv} ({out or 'no output'})"
        )
    lines = [f"{name}=={found[name]}" for name in PINNED if name in found]
    if context["torch"].get("numpy_below_2"):
        lines.append("numpy<2")
    if context.get("transformers_version"):
        # The transformers that the training check ran with: a later upgrade cannot bring one that refuses this torch.
        lines.append(f"transformers=={context['transformers_version']}")
    path = _constraints(context)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as handle:
        handle.write(
            "# Written by deploy/jetson/install.py: keep the Jetson builds (and the transformers verified with them).\n"
            "# Use with every pip install in this venv: pip install -c " + path + " ...\n" + "\n".join(lines) + "\n"
        )
    say(f"    {path}: " + ", ".join(lines))


def training_check_argv(context):
    argv = [_venv_python(context), CHECK_SCRIPT, "--device", "cuda"]
    return argv + (["--4bit"] if context.get("use_bnb") else [])


def training_failure(context, result, out):
    """InstallError for a failed full-precision training check, with the fix for the causes we know."""
    venv = context["args"].venv
    error = (result.get("float") or {}).get("error") or (out.strip().splitlines() or ["no output"])[-1]
    versions = result.get("versions") or {}
    hints = [f"the training check failed in {venv}: {error}"]
    needed = re.search(r"PyTorch >= ?([0-9][0-9.]*)", out)
    if needed:
        transformers = versions.get("transformers", "?")
        hints.append(
            f"transformers {transformers} refuses PyTorch {versions.get('torch', '?')}: it needs >= "
            f"{needed.group(1)}, newer than this installer's minimum {dotted(MIN_TORCH)} (jetson_releases.MIN_TORCH, "
            "pyproject.toml's `train` extra and docs/EDGE.md name it together). Install a PyTorch it accepts "
            "(--torch-wheel), or keep this one with an older transformers: "
            f'`{venv}/bin/pip install -c {_constraints(context)} "transformers<{transformers}"`, then run the '
            "installer again."
        )
    elif "libcudss" in out:
        hints.append(f"libcudss.so.0 is missing: install cuDSS {CUDSS_VERSION} (the `cudss` step of --dry-run).")
    elif "libcusparseLt" in out:
        hints.append("libcusparseLt.so.0 is missing: install cuSPARSELt (the `cusparselt` step of --dry-run).")
    elif "out of memory" in out.lower():
        hints.append("The GPU ran out of memory on a tiny model: stop other GPU processes and run the installer again.")
    hints.append(
        "Nothing was set up as a service. To repeat the check: "
        + " ".join(shlex.quote(a) for a in training_check_argv(context))
    )
    return InstallError(" ".join(hints), exit_code=EXIT_FAILED)


def action_check_training(context):
    status, out = capture(training_check_argv(context), merge_stderr=True)
    result = _last_json(out)
    if status != 0 or not result.get("ok"):
        raise training_failure(context, result, out)
    versions, step = result.get("versions") or {}, result["float"]
    say(
        f"    one LoRA step on {step.get('device')}: loss {step.get('loss')} (torch {versions.get('torch')}, "
        f"transformers {versions.get('transformers')}, peft {versions.get('peft')})"
    )
    context["transformers_version"] = versions.get("transformers")
    action_write_constraints(context)
    if not context.get("use_bnb"):
        context["quantization"] = "none"
        return
    four = result.get("4bit") or {"ok": False, "error": "no 4-bit result"}
    if four.get("ok"):
        context["quantization"] = "4bit"
        say(f"    bitsandbytes {versions.get('bitsandbytes')} trains on a 4-bit base: quantization 4bit")
        return
    context["quantization"] = "none"
    warn(
        f"4-bit training does not run on this GPU ({four.get('error')}). The generated config uses quantization = "
        '"none" (the model stays in float32, about 0.6 GB for CLIP ViT-B/32). To enable 4-bit later, build '
        'bitsandbytes for sm_87 (docs/EDGE.md, troubleshooting) and set quantization = "4bit".'
    )


def action_check_ort(context):
    status, out = capture([_venv_python(context), "-c", ORT_CHECK], merge_stderr=True)
    if status != 0:
        warn(f"onnxruntime does not import ({out}); `flora export` validation needs it")
    elif "CUDAExecutionProvider" not in out:
        warn(f"onnxruntime has no CUDA provider ({out}): ONNX inference runs on the CPU")
    else:
        say(f"    onnxruntime providers: {out}")


def toml_value(value):
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    return json.dumps(str(value))  # a JSON string is a valid TOML basic string


def render_config(template, values):
    """Set `key = value` lines of the template: the active line for a key, else its commented example line."""
    lines = template.splitlines()
    for key, value in values.items():
        new = f"{key} = {toml_value(value)}"
        for pattern in (r"^" + re.escape(key) + r"\s*=", r"^#\s*" + re.escape(key) + r"\s*="):
            found = [i for i, line in enumerate(lines) if re.match(pattern, line)]
            if found:
                lines[found[0]] = new
                break
        else:
            lines.append(new)
    return "\n".join(lines) + "\n"


def config_values(args, quantization):
    values = {"node_id": args.node_id, "quantization": quantization}
    for key in ("run_id", "broker_url", "model"):
        if getattr(args, key):
            values[key] = getattr(args, key)
    return values


def action_write_config(context):
    args = context["args"]
    quantization = context.get("quantization", "none")
    if os.path.exists(args.config_path):
        with open(args.config_path) as handle:
            existing = handle.read()
        if quantization != "4bit" and re.search(r'^quantization\s*=\s*"4bit"', existing, re.M):
            warn(f'{args.config_path} sets quantization = "4bit", which fails on this device: set it to "none"')
        say(f"    kept {args.config_path}")
        return
    with open(CLIENT_TEMPLATE) as handle:
        text = render_config(handle.read(), config_values(args, quantization))
    os.makedirs(os.path.dirname(args.config_path), exist_ok=True)
    # O_EXCL: never replace a file that appeared meanwhile; 0640 from the start, the file may get a password.
    fd = os.open(args.config_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
    os.chown(args.config_path, 0, grp.getgrnam(SERVICE_USER).gr_gid)
    os.chmod(args.config_path, 0o640)  # the umask may have taken bits away
    say(f"    wrote {args.config_path} (node_id {args.node_id}, quantization {quantization})")


# ---------------------------------------------------------------------------------------------------------------
# Output and execution
# ---------------------------------------------------------------------------------------------------------------
def say(text):
    print(text, flush=True)


def warn(text):
    print(f"warning: {text}", file=sys.stderr, flush=True)


def print_plan(plan, steps, dry_run):
    release = plan["release"]
    say("FLoRA Edge installer: " + ("plan only (--dry-run), nothing is changed" if dry_run else "installing"))
    say(f"  release       {plan['release_file']}: L4T R{release['l4t']} = JetPack {release['jetpack']}")
    say(f"                Ubuntu {release['ubuntu']}, CUDA {release['cuda']}, system Python {release['system_python']}")
    say(f"  nvidia-jetpack {plan['dpkg_jetpack'] or 'not installed (the plan installs it)'}")
    py = plan["python"]
    say(f"  python        {py['path']} {py['version']} (needs {py['required']}): ok")
    sources = plan["sources"]
    torch = sources["torch"]
    where = torch.get("url") or f"torch=={torch['version']} from {torch['index']}"
    say(f"  torch         {torch['origin']}: {where} (needs >= {plan['min_torch']}: ok)")
    say(f"  bitsandbytes  {sources['bitsandbytes'] or 'skipped: 4-bit quantization disabled'}")
    say(f"  onnxruntime   {sources['onnxruntime']}")
    say(f"  flora-edge    {sources['flora']}")
    quant = plan["quantization"]
    say(
        "  quantization  "
        + ('"4bit" if the 4-bit training step passes, else "none"' if "otherwise" in quant else '"none"')
    )
    say(f"  config        {plan['config']['path']} ({'exists: kept' if plan['config']['exists'] else 'written'})")
    say(f"  systemd       {plan['systemd'] or 'unknown'}; restart backoff drop-in: {plan['restart_backoff']}")
    for number, step in enumerate(steps, 1):
        say(f"{number:2d}. {step.title}" + (" [optional]" if step.optional else ""))
        if step.unless:
            say(f"      (skipped if {step.unless[0]})")
        for command in step.commands:
            say(f"      {command.render()}")
        for command in step.fallback:
            say(f"      if that fails: {command.render()}")
        if step.probe:
            say(f"      {step.probe.render()}    # output read by the installer")
        if step.note:
            say(f"      ({step.note})")
    for text in plan["warnings"]:
        warn(text)


def run_command(command):
    if command.unless and command.unless[1]():
        say(f"      skipped: {command.unless[0]}")
        return True
    say(f"      {command.render()}")
    return subprocess.call(command.argv) == 0


def execute(steps, context):
    for number, step in enumerate(steps, 1):
        say(f"[{number}/{len(steps)}] {step.title}")
        if step.unless and step.unless[1]():
            say(f"      skipped: {step.unless[0]}")
            continue
        ok = all(run_command(command) for command in step.commands)
        if not ok and step.fallback:
            warn(f"{step.title}: failed; trying the fallback")
            ok = all(run_command(command) for command in step.fallback)
        if not ok:
            if step.optional:
                warn(f"{step.title}: failed; continuing ({step.note or 'optional step'})")
                continue
            raise InstallError(f"step {number} ({step.title}) failed; see the output above", exit_code=EXIT_FAILED)
        if step.action is not None:
            step.action(context)


def gather(args):
    """Everything the plan depends on, read from this machine or from the options that stand in for it."""
    warnings = []
    try:
        with open(args.release_file) as handle:
            release_text = handle.read()
    except OSError as exc:
        raise InstallError(
            f"cannot read {args.release_file} ({exc.strerror}): this does not look like a Jetson with L4T. "
            "To preview the plan for a release, pass --dry-run --release-file FILE."
        ) from None
    l4t = parse_release(release_text)
    if l4t is None:
        raise InstallError(f"{args.release_file} has no '# R<major> (release), REVISION: <x.y>' line")
    family, release = describe_release(l4t, warnings)
    dpkg = jetpack_from_dpkg()
    if dpkg is not None:
        expected = parse_version(JETPACK_BY_L4T.get(tuple(l4t), ""))
        if expected and parse_version(dpkg)[: len(expected)] != expected:
            warnings.append(
                f"nvidia-jetpack {dpkg} does not match L4T R{release['l4t']} (JetPack {release['jetpack']}); "
                "the L4T release decides the wheels. A half-finished upgrade? `sudo apt update && sudo apt "
                "dist-upgrade`, then reboot."
            )
    try:
        torch = torch_source(family, args.torch_source, args.torch_wheel)
        python = check_python(family, args.python, python_version(args.python), torch)
        check_torch_version(family, torch, warnings)
    except InstallError as exc:
        exc.release = release
        raise
    systemd = systemd_version()
    index = family["index"]
    use_bnb = bool(index) and not args.no_bitsandbytes
    extras = "edge" if use_bnb else "train"  # [edge] = [train] + bitsandbytes
    package = f"{args.source}[{extras}]"  # a checkout or a wheel: pip takes extras on both
    config_exists = os.path.exists(args.config_path)
    return {
        "release_file": args.release_file,
        "release": release,
        "dpkg_jetpack": dpkg,
        "python": python,
        "sources": {
            "torch": {k: v for k, v in torch.items() if k != "numpy_below_2"},
            "jetson_index": index,
            "bitsandbytes": f"{index} (--no-deps), then a 4-bit training step on the GPU" if use_bnb else None,
            "onnxruntime": f"onnxruntime-gpu from {index}, else onnxruntime (CPU) from PyPI"
            if index
            else "onnxruntime (CPU) from PyPI",
            "flora": package,
        },
        "quantization": {"if_4bit_check_passes": "4bit", "otherwise": "none"} if use_bnb else {"always": "none"},
        "min_torch": dotted(MIN_TORCH),
        "config": {"path": args.config_path, "exists": config_exists},
        "node_id": args.node_id,
        "systemd": systemd,
        "restart_backoff": bool(systemd and systemd >= SYSTEMD_BACKOFF_MIN),
        "venv": args.venv,
        "warnings": warnings,
        # for build_plan only (not in the JSON)
        "_family": family,
        "_torch": torch,
        "_use_bnb": use_bnb,
    }


def is_flora_checkout(path):
    try:
        with open(os.path.join(path, "pyproject.toml")) as handle:
            return re.search(r'^name\s*=\s*"flora-edge"', handle.read(), re.M) is not None
    except OSError:
        return False


def resolve_source(parser, source):
    """The absolute path pip installs FLoRA Edge from: a checkout or a flora_edge wheel; usage error otherwise."""
    how = (
        "pass --source with a flora-edge checkout, or a wheel built from one (`python3 -m pip wheel --no-deps "
        "-w dist .` in the checkout, then --source dist/flora_edge-<version>-py3-none-any.whl); flora-edge is "
        "not on PyPI"
    )
    if source is None:
        if is_flora_checkout(CHECKOUT):
            return CHECKOUT
        parser.error(f"this installer is not inside a flora-edge checkout ({CHECKOUT}): {how}")
    path = os.path.abspath(source)
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "pyproject.toml")):
            parser.error(f"--source {source}: no pyproject.toml there; {how}")
        return path
    if not re.match(r"flora_edge-[^-]+-.*\.whl$", os.path.basename(path)):
        parser.error(f"--source {source}: neither a directory nor a flora_edge-*.whl file; {how}")
    if not os.path.isfile(path):
        parser.error(f"--source {source}: no such file; {how}")
    return path


def parse_args(argv):
    parser = argparse.ArgumentParser(
        prog="install.py",
        description="Install the FLoRA Edge client on an NVIDIA Jetson (JetPack 6) as a systemd service.",
        epilog="Exit status: 0 ok, 1 a step failed, 2 bad arguments, 3 unsupported device. Guide: docs/EDGE.md",
    )
    parser.add_argument("--dry-run", action="store_true", help="print the plan and change nothing")
    parser.add_argument("--json", action="store_true", help="with --dry-run: print the plan as JSON")
    parser.add_argument(
        "--release-file", default=None, help="read this file instead of /etc/nv_tegra_release (with --dry-run only)"
    )
    parser.add_argument("--python", default=None, help="interpreter for the venv (default: /usr/bin/python3)")
    parser.add_argument(
        "--source",
        default=None,
        help="FLoRA Edge to install: a checkout (a directory with pyproject.toml) or a wheel built from one "
        "(flora_edge-*.whl); default: the checkout this installer is in. flora-edge is not on PyPI.",
    )
    parser.add_argument(
        "--torch-source",
        choices=("jetson-ai-lab", "nvidia"),
        default="jetson-ai-lab",
        help="the Jetson AI Lab index (default) or NVIDIA's JetPack wheel "
        f"(below PyTorch {dotted(MIN_TORCH)}: refused)",
    )
    parser.add_argument("--torch-wheel", default=None, help="install this PyTorch wheel (URL or file) instead")
    parser.add_argument("--no-bitsandbytes", action="store_true", help="skip bitsandbytes; 4-bit stays disabled")
    parser.add_argument("--venv", default=DEFAULT_VENV, help=f"virtual environment (default: {DEFAULT_VENV})")
    parser.add_argument("--config-path", default=DEFAULT_CONFIG, help=f"client settings (default: {DEFAULT_CONFIG})")
    parser.add_argument("--node-id", default=None, help="node_id for a new config (default: the hostname)")
    parser.add_argument("--broker-url", default=None, help="broker_url for a new config, e.g. mqtts://broker:8883")
    parser.add_argument("--run-id", default=None, help="run_id for a new config")
    parser.add_argument("--model", default=None, help="model for a new config (hub id or local directory)")
    parser.add_argument("--start", action="store_true", help="also start the service now (default: enable only)")
    args = parser.parse_args(argv)
    if args.json and not args.dry_run:
        parser.error("--json needs --dry-run")
    if args.release_file and not args.dry_run:
        parser.error("--release-file is for previewing with --dry-run; a real installation reads the device's own")
    args.source = resolve_source(parser, args.source)
    if args.python is None:
        args.python = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else "python3"
    args.release_file = args.release_file or DEFAULT_RELEASE_FILE
    args.node_id = args.node_id or node_id_from_hostname(platform.node())
    if node_id_from_hostname(args.node_id) != args.node_id:
        parser.error(f"--node-id {args.node_id!r}: use 1-128 letters, digits, '_', '.', '-'")
    return args


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        if not args.dry_run:
            if platform.machine() != "aarch64":
                raise InstallError(f"this is a {platform.machine()} machine, not a Jetson; use --dry-run to preview")
            if os.geteuid() != 0:
                raise InstallError("run as root (sudo), or with --dry-run to see the plan", exit_code=EXIT_USAGE)
        plan = gather(args)
        steps = build_plan(args, plan)
    except InstallError as exc:
        if args.json:
            print(json.dumps({"ok": False, "error": str(exc), "release": exc.release}, indent=2))
        print(f"install.py: error: {exc}", file=sys.stderr)
        return exc.exit_code
    if args.json:
        public = {"ok": True, "dry_run": True}
        public.update((k, v) for k, v in plan.items() if not k.startswith("_"))
        public["steps"] = [step.to_json() for step in steps]
        print(json.dumps(public, indent=2))
        return 0
    print_plan(plan, steps, args.dry_run)
    if args.dry_run:
        return 0
    context = {"args": args, "torch": plan["_torch"], "quantization": "none", "use_bnb": plan["_use_bnb"]}
    os.environ.setdefault("DEBIAN_FRONTEND", "noninteractive")  # apt-get must never stop to ask
    os.environ.setdefault("PIP_DISABLE_PIP_VERSION_CHECK", "1")
    try:
        execute(steps, context)
    except InstallError as exc:
        print(f"install.py: error: {exc}", file=sys.stderr)
        return exc.exit_code
    say("Done. Next:")
    say(f"  1. edit {args.config_path}: broker_url, credentials or TLS files, data_dir (one subfolder per class)")
    say(f"  2. sudo systemctl start {UNIT_NAME}   (it is enabled: it also starts at boot)")
    say("  3. journalctl -u flora-client -f      and      flora status --broker URL   (from any machine)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
