"""The `flora` command: demo, coordinator, client, export, broker, status. A composition root."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from flora import __version__
from flora.errors import FloraError

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def _setup_logging(level: str) -> None:
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO), format=LOG_FORMAT, stream=sys.stderr)
    for noisy in ("transformers", "peft", "amqtt", "bitsandbytes", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _quiet_libraries() -> None:
    import os
    import warnings

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    # bitsandbytes tries to fetch an optional CPU kernel from the hub and warns when it cannot;
    # its built-in fallback is what runs offline, so the warning is noise for users.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)


def cmd_demo(args: argparse.Namespace) -> int:
    from flora.demo import DemoSettings, run_demo

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


def cmd_coordinator(args: argparse.Namespace) -> int:
    from coordinator.config import CoordinatorConfig, load_coordinator_config
    from flora.config import describe

    if args.help_config:
        print(describe(CoordinatorConfig))
        return 0
    config = load_coordinator_config(args.config, broker_url=args.broker, run_id=args.run_id)
    _setup_logging(config.log_level)
    from coordinator.main import run_coordinator

    report = run_coordinator(config)
    logging.getLogger("flora").info("run %s finished: final accuracy %s", config.run_id, report.get("final_accuracy"))
    return 0


def cmd_client(args: argparse.Namespace) -> int:
    from edge_client.config import ClientConfig, load_client_config
    from flora.config import describe

    if args.help_config:
        print(describe(ClientConfig))
        return 0
    config = load_client_config(args.config, broker_url=args.broker, node_id=args.node_id)
    _setup_logging(config.log_level)
    from edge_client.main import run_client

    run_client(config)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    import json

    from export.pipeline import export_and_validate
    from flora.data.datasets import load_image_folder

    eval_data = load_image_folder(args.eval_data) if args.eval_data else None
    result = export_and_validate(
        args.base,
        args.adapter,
        args.out,
        eval_data=eval_data,
        prompt_template=args.prompt_template,
        tolerance=args.tolerance,
    )
    print(json.dumps(result, indent=2))
    return 0


def cmd_broker(args: argparse.Namespace) -> int:
    from flora.transport.brokers import run_amqtt

    if args.host not in ("127.0.0.1", "localhost", "::1") and not args.allow_remote:
        raise FloraError(
            f"the embedded broker allows anonymous clients; binding {args.host} would expose it. "
            "Use Mosquitto with deploy/mosquitto for networked fleets, or pass --allow-remote on a trusted network."
        )
    run_amqtt(args.host, args.port)
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from flora.status import print_status

    return print_status(args.broker, run_id=args.run_id, wait=args.wait)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flora", description=__doc__)
    parser.add_argument("--version", action="version", version=f"flora-edge {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="run a complete federated LoRA run offline on this machine")
    p.add_argument("--out", default="runs/demo", help="output directory (default: runs/demo)")
    p.add_argument("--clients", type=int, default=4, help="edge client processes (default: 4)")
    p.add_argument("--rounds", type=int, default=10, help="federated rounds (default: 10)")
    p.add_argument("--local-epochs", type=int, default=2, help="local epochs per round (default: 2)")
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

    p = sub.add_parser("export", help="merge an adapter into its base and export validated ONNX")
    p.add_argument("--base", required=True, help="base CLIP checkpoint: hub id or directory")
    p.add_argument("--adapter", required=True, help="PEFT adapter directory (e.g. runs/demo/global_adapter)")
    p.add_argument("--out", required=True, help="output directory for model.onnx and the processor files")
    p.add_argument("--eval-data", default=None, help="image folder to score the export on (optional)")
    p.add_argument("--prompt-template", default="a photo of a {label}.", help="class prompt template")
    p.add_argument("--tolerance", type=float, default=1e-4, help="max abs difference ORT vs PyTorch")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("broker", help="run the embedded MQTT broker (amqtt), loopback only by default")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=1883, help="port (default: 1883)")
    p.add_argument("--allow-remote", action="store_true", help="permit a non-loopback bind")
    p.set_defaults(func=cmd_broker)

    p = sub.add_parser("status", help="show nodes and rounds seen on a broker")
    p.add_argument("--broker", required=True, help="mqtt://HOST:PORT")
    p.add_argument("--run-id", default=None, help="only this run")
    p.add_argument("--wait", type=float, default=2.0, help="seconds to collect retained messages")
    p.set_defaults(func=cmd_status)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _quiet_libraries()
    if args.command != "demo":
        _setup_logging("INFO")
    try:
        return args.func(args)
    except FloraError as exc:
        print(f"flora {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
