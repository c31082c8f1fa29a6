"""The `flora` command: demo, the roles, doctor, export, infer, status, dashboard, provision. The composition root."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from flora import __version__
from flora.app.provision.fleet import FLEET_DEFAULTS
from flora.errors import FloraError

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_log_handler: logging.Handler | None = None  # installed once; later calls only change the level
LIBRARY_LOG_LEVELS = {
    "transformers": logging.WARNING,
    "peft": logging.WARNING,
    "amqtt": logging.WARNING,
    "httpx": logging.WARNING,
    # bitsandbytes tries to fetch an optional CPU kernel from the hub and warns when it cannot, on every start,
    # quantized or not; its built-in fallback is what runs offline, so the warning is noise for users.
    "bitsandbytes": logging.ERROR,
}


def _setup_logging(level: int | str) -> None:
    """Log to stderr at `level`. Called again once a config is read: its log_level then takes effect
    (logging.basicConfig alone would ignore the second call, leaving the first level in force)."""
    global _log_handler
    root = logging.getLogger()
    if _log_handler is None:
        _log_handler = logging.StreamHandler(sys.stderr)
        _log_handler.setFormatter(logging.Formatter(LOG_FORMAT))
        root.addHandler(_log_handler)
    root.setLevel(level if isinstance(level, int) else level.upper())
    _set_library_log_levels()


def _set_library_log_levels() -> None:
    for library, library_level in LIBRARY_LOG_LEVELS.items():
        logging.getLogger(library).setLevel(library_level)


def _quiet_libraries() -> None:
    import os
    import warnings

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)


def cmd_demo(args: argparse.Namespace) -> int:
    from flora.app.demo import DemoSettings, run_demo

    settings = DemoSettings(
        out=Path(args.out),
        clients=args.clients,
        rounds=args.rounds,
        broker=args.broker,
        seed=args.seed,
        recipe=args.recipe,
        local_epochs=args.local_epochs,
    )
    if settings.clients < 1 or settings.rounds < 1:
        raise FloraError("--clients and --rounds must be at least 1")
    report = run_demo(settings)
    gain = report["final_accuracy"] - report["initial_accuracy"]
    return 0 if gain > 0 else 1


def cmd_simulate(args: argparse.Namespace) -> int:
    from flora.app.simulate import load_experiment, run_grid

    experiment = load_experiment(args.config, out=args.out)
    logging.getLogger().setLevel(logging.WARNING)  # the progress view, not every round's log lines
    rows = run_grid(experiment, processes=args.processes or args.broker is not None, broker=args.broker)
    print(f"{len(rows)} cells finished; results in {experiment.out}/ (table.md, results.csv, plots/)")
    return 0


def cmd_coordinator(args: argparse.Namespace) -> int:
    from coordinator.config import CoordinatorConfig, load_coordinator_config
    from flora.config import describe

    if args.help_config:
        print(describe(CoordinatorConfig))
        return 0
    config = load_coordinator_config(args.config, broker_url=args.broker, run_id=args.run_id)
    _setup_logging(config.logging_level)
    from coordinator.main import run_coordinator

    report = run_coordinator(config)
    final = report.get("final_accuracy")
    logging.getLogger("flora").info(
        "run %s finished: final accuracy %s", config.run_id, "n/a (no eval data)" if final is None else f"{final:.1%}"
    )
    if config.export_dir is not None:
        # Here, not in the coordinator: roles never import each other; the CLI composes them.
        from export.pipeline import export_and_validate
        from flora.data.datasets import load_image_folder

        result = export_and_validate(
            config.model,
            Path(config.output_dir) / "global_adapter",
            config.export_dir,
            eval_data=load_image_folder(config.eval_data_dir) if config.eval_data_dir else None,
            prompt_template=config.prompt_template,
        )
        logging.getLogger("flora").info("exported %s (max abs diff %.2e)", result.path, result.max_abs_diff)
    return 0


def cmd_client(args: argparse.Namespace) -> int:
    from edge_client.config import ClientConfig, load_client_config
    from flora.config import describe

    if args.help_config:
        print(describe(ClientConfig))
        return 0
    config = load_client_config(args.config, broker_url=args.broker, node_id=args.node_id)
    _setup_logging(config.logging_level)
    from edge_client.main import run_client

    run_client(config)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    import json

    from export.pipeline import export_and_validate
    from export.zero_shot import read_labels
    from flora.data.datasets import load_image_folder

    eval_data = load_image_folder(args.eval_data) if args.eval_data else None
    result = export_and_validate(
        args.base,
        args.adapter,
        args.out,
        eval_data=eval_data,
        prompt_template=args.prompt_template,
        tolerance=args.tolerance,
        parts=args.parts,
        precisions=args.precision,
        merge_base=args.merge_base,
        labels=read_labels(args.labels) if args.labels else None,
        agreement_threshold=args.agreement_threshold,
        int8_scheme=args.int8_scheme,
    )
    print(json.dumps(result.to_dict(), indent=2))
    if not result.ok:
        # Files are written and marked in the manifest, but this is not a success to build on.
        for problem in result.problems:
            print(f"flora export: {problem}", file=sys.stderr)
        return 1
    return 0


def cmd_infer(args: argparse.Namespace) -> int:
    # Torch-free path: export.infer imports only numpy, onnxruntime, Pillow and tokenizers.
    import json

    from export.infer import run_infer

    result = run_infer(
        args.model,
        args.images,
        labels_file=args.labels,
        prompt_template=args.prompt_template,
        top_k=args.top_k,
        provider=args.provider,
        precision=args.precision,
        batch_size=args.batch_size,
        threads=args.threads,
    )
    print(json.dumps(result, indent=2))
    return 0 if result["results"] else 1


def cmd_broker(args: argparse.Namespace) -> int:
    from flora.transport.embedded import run_amqtt

    if args.host not in ("127.0.0.1", "localhost", "::1") and not args.allow_remote:
        raise FloraError(
            f"the embedded broker allows anonymous clients; binding {args.host} would expose it. "
            "Use Mosquitto with deploy/mosquitto for networked fleets, or pass --allow-remote on a trusted network."
        )
    run_amqtt(args.host, args.port)
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from flora.app.status import print_status

    return print_status(
        args.broker,
        run_id=args.run_id,
        wait=args.wait,
        ca_file=args.ca_file,
        max_age_h=args.max_age_hours,
        show_all=args.all,
    )


def cmd_dashboard(args: argparse.Namespace) -> int:
    from flora.app.dashboard import serve

    return serve(
        args.broker,
        host=args.host,
        port=args.port,
        ca_file=args.ca_file,
        run_id=args.run_id,
        allow_remote=args.allow_remote,
    )


def cmd_doctor(args: argparse.Namespace) -> int:
    from flora.app.doctor import print_report, run_checks

    return print_report(run_checks(Path(args.config), role=args.role, check_model=not args.skip_model))


def cmd_provision(args: argparse.Namespace) -> int:
    from coordinator.config import CoordinatorConfig
    from edge_client.config import ClientConfig
    from flora.app.provision import ProvisionSettings, check_device_id, provision_coordinator, provision_device
    from flora.app.provision.fleet import resolve_fleet, save_fleet
    from flora.config import from_mapping, to_toml

    out = Path(args.out)
    flags = {key: getattr(args, key) for key in FLEET_DEFAULTS if key not in ("certs", "install_dir")}
    flags["certs"] = str(Path(args.certs).resolve()) if args.certs else None
    flags["install_dir"] = "" if args.in_place else args.install_dir
    fleet = resolve_fleet(out, flags, update=args.update_fleet)
    settings = ProvisionSettings(
        out=out,
        broker_url=fleet["broker_url"],
        run_id=fleet["run_id"],
        coordinator_id=fleet["coordinator_id"],
        install_dir=Path(fleet["install_dir"]) if fleet["install_dir"] else None,
        certs_dir=Path(fleet["certs"]) if fleet["certs"] else None,
        force=args.force,
    )
    for node in args.node_ids:  # all of them, before anything is written
        check_device_id(settings, node)
    where = f"to {fleet['install_dir']}/" if fleet["install_dir"] else "in place"
    coordinator_values = {"model": fleet["model"], "checkpoint_dir": fleet["checkpoint_dir"]}
    coordinator = provision_coordinator(
        settings, lambda values: to_toml(from_mapping(CoordinatorConfig, {**values, **coordinator_values}))
    )
    if coordinator.created:
        print(f"coordinator {coordinator.node_id}: copy {coordinator.directory}/ {where} on the coordinator host")
    client_values = {"model": fleet["model"], "data_dir": fleet["data_dir"], "state_dir": fleet["state_dir"]}
    for node in args.node_ids:
        device = provision_device(
            settings, node, lambda values: to_toml(from_mapping(ClientConfig, {**values, **client_values}))
        )
        print(f"device {device.node_id}: copy {device.directory}/ {where} on the device")
    save_fleet(out, fleet)
    print(
        f"broker: copy {settings.mosquitto_dir}/passwd and acl to /etc/mosquitto/flora/ (deploy/mosquitto/README.md), "
        "then `sudo systemctl reload mosquitto`. Keep this directory private: it holds keys and passwords."
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flora", description=__doc__)
    parser.add_argument("--version", action="version", version=f"flora-edge {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="run a complete federated LoRA run offline on this machine")
    p.add_argument("--out", default="runs/demo", help="output directory (default: runs/demo)")
    p.add_argument("--clients", type=int, default=4, help="edge client processes (default: 4)")
    p.add_argument("--rounds", type=int, default=10, help="federated rounds (default: 10)")
    p.add_argument(
        "--local-epochs", type=float, default=2, help="local epochs per round, a fraction allowed (default: 2)"
    )
    p.add_argument("--recipe", default="both-towers", help="LoRA recipe (default: both-towers; paper: 'paper')")
    p.add_argument("--broker", default=None, help="use this broker (mqtt://HOST:PORT) instead of the embedded one")
    p.add_argument("--seed", type=int, default=0, help="seed for data split and training")
    p.set_defaults(func=cmd_demo)

    for name, func, what in (
        ("coordinator", cmd_coordinator, "run the coordinator"),
        ("client", cmd_client, "run an edge client agent"),
    ):
        p = sub.add_parser(name, help=what)
        p.add_argument("--config", help="TOML settings file (see --help-config)")
        p.add_argument("--broker", default=None, help="override broker_url")
        p.add_argument("--help-config", action="store_true", help="list every setting with its default")
        if name == "coordinator":
            p.add_argument("--run-id", default=None, help="override run_id")
        else:
            p.add_argument("--node-id", default=None, help="override node_id")
        p.set_defaults(func=func)

    p = sub.add_parser("simulate", help="run a grid of federated experiments on this machine (resumable)")
    p.add_argument("--config", required=True, help="experiment TOML (see experiments/*.toml)")
    p.add_argument("--out", default=None, help="override the experiment's output directory")
    p.add_argument(
        "--processes",
        action="store_true",
        help="run each cell's clients as separate `flora client` processes over the embedded broker (or --broker)",
    )
    p.add_argument(
        "--broker", default=None, help="with --processes: this broker (mqtt://HOST:PORT), not an embedded one"
    )
    p.set_defaults(func=cmd_simulate)

    p = sub.add_parser("export", help="merge an adapter into its base and export validated ONNX")
    p.add_argument("--base", required=True, help="base CLIP checkpoint: hub id or directory")
    p.add_argument("--adapter", required=True, help="PEFT adapter directory (e.g. runs/demo/global_adapter)")
    p.add_argument("--out", required=True, help="output directory for the ONNX files, processor files and manifest")
    p.add_argument(
        "--parts",
        default="model",
        help="comma-separated: model (whole CLIPModel), vision (image tower -> image_embeds), "
        "text (text tower -> text_embeds) (default: model)",
    )
    p.add_argument(
        "--precision",
        default="fp32",
        help="comma-separated: fp32, fp16 (GPU: CUDA/TensorRT), int8 (CPU, dynamic quantization); "
        "fp32 is always written as the reference (default: fp32)",
    )
    p.add_argument(
        "--merge-base",
        default="original",
        choices=["original", "dequantized-4bit", "auto"],
        help="fp32 base to merge into: the original weights, the dequantized 4-bit weights clients trained "
        "against, or auto (whichever matches the 4-bit training-time outputs better; both are reported)",
    )
    p.add_argument("--eval-data", default=None, help="image folder to score the export on (one subfolder per class)")
    p.add_argument("--labels", default=None, help="labels.txt (one per line) for the zero-shot head")
    p.add_argument(
        "--prompt-template",
        default=None,
        help="class prompt template (default: the one the adapter was trained with, from its flora_training.json)",
    )
    p.add_argument("--tolerance", type=float, default=1e-4, help="fp32: max abs difference ORT vs PyTorch")
    p.add_argument(
        "--agreement-threshold",
        type=float,
        default=0.99,
        help="fp16/int8: minimum top-1 agreement with fp32 on --eval-data (default: 0.99)",
    )
    p.add_argument(
        "--int8-scheme",
        default="auto",
        choices=["auto", "full", "first-attention-fp32", "attention-fp32"],  # export.quantize.INT8_MODES
        help="int8: full (every MatMul int8, fastest), first-attention-fp32 (the first layer's attention "
        "projections kept fp32), attention-fp32 (every layer's: about 40%% slower), or auto: the first of "
        "those, in that order, that meets --agreement-threshold (default: auto)",
    )
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("infer", help="classify images with an exported model (ONNX Runtime only, no PyTorch)")
    p.add_argument("images", nargs="+", metavar="IMAGE_OR_FOLDER", help="image files and/or folders of images")
    p.add_argument("--model", required=True, help="directory written by `flora export`")
    p.add_argument("--labels", default=None, help="labels.txt, one per line (default: the zero-shot head's labels)")
    p.add_argument("--prompt-template", default=None, help="class prompt template (default: the export's)")
    p.add_argument("--top-k", type=int, default=5, help="labels to print per image (default: 5)")
    p.add_argument(
        "--provider",
        default="cpu",
        choices=["cpu", "cuda", "tensorrt"],
        help="execution provider; falls back tensorrt -> cuda -> cpu when unavailable (default: cpu)",
    )
    p.add_argument(
        "--precision",
        default="auto",
        choices=["auto", "fp32", "fp16", "int8"],
        help="which exported file to run (default auto: fp32, else int8, else fp16)",
    )
    p.add_argument("--batch-size", type=int, default=32, help="images per ONNX Runtime call (default: 32)")
    p.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads (default: all cores)")
    p.set_defaults(func=cmd_infer)

    p = sub.add_parser("broker", help="run the embedded MQTT broker (amqtt), loopback only by default")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=1883, help="port (default: 1883)")
    p.add_argument("--allow-remote", action="store_true", help="permit a non-loopback bind")
    p.set_defaults(func=cmd_broker)

    p = sub.add_parser("status", help="show nodes and rounds seen on a broker")
    p.add_argument("--broker", required=True, help="mqtt://HOST:PORT")
    p.add_argument(
        "--run-id", default=None, help="only this run; also asks its clients for a fresh status (presence request)"
    )
    p.add_argument("--wait", type=float, default=2.0, help="seconds to collect retained messages")
    p.add_argument("--ca-file", default=None, help="CA certificate for mqtts:// (default: the system's CA store)")
    p.add_argument("--max-age-hours", type=float, default=24.0, help="hide runs that finished longer ago (default: 24)")
    p.add_argument("--all", action="store_true", help="show finished runs of any age")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser(
        "dashboard",
        help="serve a read-only web page of the fleet and the rounds, live from a broker (loopback only by default)",
        description="Subscribes to the broker (publishes nothing) and serves http://HOST:PORT/. Round history "
        "starts when the dashboard starts: the broker keeps only each run's latest round.",
    )
    p.add_argument("--broker", required=True, help="mqtt://[USER:PASSWORD@]HOST:PORT (the password is never shown)")
    p.add_argument("--host", default="127.0.0.1", help="address to serve on (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=8080, help="port to serve on (default: 8080)")
    p.add_argument("--ca-file", default=None, help="CA certificate for mqtts:// (default: the system's CA store)")
    p.add_argument("--run-id", default=None, help="only this run (default: every run on the broker)")
    p.add_argument("--allow-remote", action="store_true", help="permit a non-loopback bind (the page has no login)")
    p.set_defaults(func=cmd_dashboard)

    p = sub.add_parser(
        "doctor",
        help="check a node's config, files, broker, TLS, credentials, ACL, data and model before a run",
        description="One line per check with the fix; exits 1 when a check fails. Run it before starting "
        "the service: it connects as the node, so a running node with the same id would reconnect once.",
    )
    p.add_argument("--config", required=True, help="the node's TOML settings file")
    p.add_argument("--role", choices=["client", "coordinator"], default=None, help="default: from the file's keys")
    p.add_argument("--skip-model", action="store_true", help="do not load the model (the slowest check)")
    p.set_defaults(func=cmd_doctor)

    p = sub.add_parser(
        "provision",
        help="create devices' broker accounts, ACL entries, signing keys and configs",
        description="The first run writes OUT/fleet.toml from these flags; later runs add devices with the "
        "fleet's settings (flags left out take the fleet's values; --update-fleet changes them).",
    )
    p.add_argument("node_ids", nargs="+", metavar="NODE_ID", help="device ids (also their broker usernames)")
    p.add_argument("--out", default="flora-provision", help="provisioning directory; keep it private")
    fleet = "(default for a new fleet: %(default)s; afterwards the fleet's)"
    for flag, key, what in (
        ("--broker-url", "broker_url", "broker URL the configs name"),
        ("--run-id", "run_id", "run id the configs name"),
        ("--coordinator-id", "coordinator_id", "the coordinator's node id and username"),
        ("--model", "model", "checkpoint the configs name (hub id or directory)"),
        ("--data-dir", "data_dir", "devices' training data directory"),
        ("--state-dir", "state_dir", "devices' state directory (the systemd unit's StateDirectory)"),
        ("--checkpoint-dir", "checkpoint_dir", "the coordinator's checkpoint directory"),
        ("--install-dir", "install_dir", "where the files will live on each machine"),
    ):
        p.add_argument(flag, default=None, help=f"{what} {fleet % {'default': FLEET_DEFAULTS[key]}}")
    p.add_argument("--certs", default=None, help="make-certs.sh output: its ca.crt, and NODE.crt/.key when made")
    p.add_argument("--in-place", action="store_true", help="configs name the files where they are written")
    p.add_argument("--update-fleet", action="store_true", help="change the fleet's saved settings with these flags")
    p.add_argument("--force", action="store_true", help="re-provision a device: new password and keys")
    p.set_defaults(func=cmd_provision)
    return parser


class Terminated(KeyboardInterrupt):
    """SIGTERM (kill, docker stop, Kubernetes), raised where SIGINT raises KeyboardInterrupt: the roles' stops are
    the same (offline status published, state saved, training in progress abandoned like on Ctrl-C)."""


def _stop_on_sigterm() -> Any:
    """Install the SIGTERM handler; returns the previous one (main restores it: main may run inside a test)."""
    if threading.current_thread() is not threading.main_thread():
        return None  # only the main thread may set handlers; main() called from a thread keeps the default

    def handler(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not interrupt the graceful stop
        raise Terminated()

    return signal.signal(signal.SIGTERM, handler)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    previous = _stop_on_sigterm()
    try:
        return _run(args)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _run(args: argparse.Namespace) -> int:
    _quiet_libraries()
    if args.command != "demo":
        _setup_logging("INFO")
    else:  # the demo shows its own view, not log lines; libraries' noise stays out of it all the same
        _set_library_log_levels()
    try:
        return args.func(args)
    except FloraError as exc:
        print(f"flora {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as exc:
        hint = missing_extra_hint(args.command, exc)
        if hint is None:
            raise  # our own module is missing: a broken install, not a missing extra
        print(f"flora {args.command}: error: {hint}", file=sys.stderr)
        return 2
    except OSError as exc:
        from flora.files import ENVIRONMENT_ERRNOS, storage_error

        if exc.errno not in ENVIRONMENT_ERRNOS or not exc.filename:
            raise
        # A write that did not go through flora.files (a library's own): the same one line, path and fix.
        print(f"flora {args.command}: error: {storage_error(exc.filename, exc)}", file=sys.stderr)
        return 2
    except Terminated:
        logging.getLogger("flora").info("flora %s stopped by SIGTERM", args.command)
        return 128 + signal.SIGTERM
    except KeyboardInterrupt:
        return 130


# The extra (pyproject.toml) that installs what each command needs beyond the core.
EXTRA_FOR_COMMAND = {
    "demo": "demo",
    "simulate": "demo",
    "coordinator": "coordinator",
    "client": "edge",
    "export": "export",
    "infer": "infer",
    "broker": "broker",
    "dashboard": "dashboard",
}
OWN_PACKAGES = ("flora", "coordinator", "edge_client", "export")


def missing_extra_hint(command: str, exc: ModuleNotFoundError) -> str | None:
    """What to install when a command's third-party dependency is missing; None for our own modules."""
    missing = (exc.name or "").split(".")[0]
    if not missing or missing in OWN_PACKAGES or command not in EXTRA_FOR_COMMAND:
        return None
    extra = EXTRA_FOR_COMMAND[command]
    return (
        f"`flora {command}` needs the Python package {missing!r}, which is not installed; "
        f'install the "{extra}" extra: pip install "flora-edge[{extra}]" (on a Jetson, install NVIDIA\'s PyTorch '
        "wheel first: docs/EDGE.md)"
    )


if __name__ == "__main__":
    sys.exit(main())
