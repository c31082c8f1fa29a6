"""`flora demo`: a real federated LoRA run on one machine, offline, in a few minutes.

Composition root (it may import every role). What happens:
  1. write a tiny CLIP checkpoint and load it back through from_pretrained;
  2. split scikit-learn's digits into a held-out test set and N non-IID client folders (Dirichlet);
  3. start an MQTT broker (embedded amqtt on loopback, or the one given with --broker);
  4. start one coordinator and N edge clients as separate OS processes, each its own MQTT client;
  5. show a live per-round view from the coordinator's round results;
  6. merge the global adapter into the fp32 base, export ONNX, validate it and score it with ONNX Runtime.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.live import Live

from flora.config import field, to_toml
from flora.errors import FloraError
from flora.files import atomic_write_json
from flora.live import print_round_line, rounds_table
from flora.protocol import Topics, envelope_from_bytes
from flora.transport import connect_transport
from flora.transport.embedded import embedded_broker


@dataclasses.dataclass
class DemoSettings:
    out: Path = field(Path("runs/demo"), help="output directory")
    clients: int = field(4, help="number of edge client processes")
    rounds: int = field(10, help="federated rounds")
    local_epochs: float = field(2, help="local epochs per round (a fraction: part of an epoch a round)")
    learning_rate: float = field(3e-3, help="clients' learning rate (the tiny random model wants more than 5e-5)")
    batch_size: int = field(32, help="local batch size")
    recipe: str = field("both-towers", help="LoRA recipe (the paper's recipe is 'paper')")
    dirichlet_beta: float = field(0.5, help="label skew across clients (smaller is more skewed)")
    test_fraction: float = field(0.2, help="held-out share of the data")
    broker: str | None = field(None, help="external broker URL; default: embedded broker on loopback")
    run_id: str = field("demo", help="run id")
    seed: int = field(0, help="seed for data split and training")
    timeout_s: float = field(600.0, help="abort if the federation takes longer than this")


def _stage_data(settings: DemoSettings, console: Console) -> tuple[list[Path], Path, dict[str, Any]]:
    import numpy as np

    from flora.data.datasets import write_image_folder
    from flora.data.digits import load_digits_images
    from flora.data.partition import dirichlet, train_test_split

    data = load_digits_images()
    train_idx, test_idx = train_test_split(data.labels, settings.test_fraction, seed=settings.seed)
    parts = dirichlet(data.labels[train_idx], settings.clients, beta=settings.dirichlet_beta, seed=settings.seed)
    root = settings.out / "data"
    client_dirs = []
    for i, part in enumerate(parts):
        client_dirs.append(write_image_folder(data.subset(train_idx[part]), root / f"client-{i}"))
    test_dir = write_image_folder(data.subset(test_idx), root / "test")
    summary = {
        "dataset": "scikit-learn digits",
        "train_examples": len(train_idx),
        "test_examples": len(test_idx),
        "partition": f"dirichlet(beta={settings.dirichlet_beta})",
        "client_sizes": [len(p) for p in parts],
        "client_label_counts": [
            {str(k): int(v) for k, v in zip(*np.unique(data.labels[train_idx][p], return_counts=True))} for p in parts
        ],
    }
    console.print(
        f"data: {len(train_idx)} training images across {settings.clients} clients "
        f"(sizes {summary['client_sizes']}), {len(test_idx)} held out for testing"
    )
    return client_dirs, test_dir, summary


def _write_configs(
    settings: DemoSettings, model_dir: Path, broker_url: str, client_dirs: list[Path], test_dir: Path
) -> tuple[Path, list[Path]]:
    from coordinator.config import CoordinatorConfig
    from edge_client.config import ClientConfig
    from flora.data.digits import DIGIT_TEMPLATE

    config_dir = settings.out / "configs"
    config_dir.mkdir(parents=True, exist_ok=True)
    coordinator = CoordinatorConfig(
        model=str(model_dir),
        run_id=settings.run_id,
        broker_url=broker_url,
        recipe=settings.recipe,
        rounds=settings.rounds,
        min_clients_per_round=settings.clients,
        min_available_clients=settings.clients,
        quorum=max(1, settings.clients // 2),
        round_deadline_s=120.0,
        wait_for_clients_s=180.0,
        local_epochs=settings.local_epochs,
        learning_rate=settings.learning_rate,
        batch_size=settings.batch_size,
        prompt_template=DIGIT_TEMPLATE,
        checkpoint_dir=settings.out / "checkpoints",
        output_dir=settings.out,
        eval_data_dir=test_dir,
        seed=settings.seed,
    )
    coordinator_path = config_dir / "coordinator.toml"
    coordinator_path.write_text(to_toml(coordinator))
    client_paths = []
    for i, data_dir in enumerate(client_dirs):
        client = ClientConfig(
            node_id=f"client-{i}",
            model=str(model_dir),
            data_dir=data_dir,
            run_id=settings.run_id,
            broker_url=broker_url,
            recipe=settings.recipe,
            device="cpu",
            batch_size=settings.batch_size,
            state_dir=settings.out / "state" / f"client-{i}",
            exit_when_finished=True,
            seed=settings.seed + i,
        )
        path = config_dir / f"client-{i}.toml"
        path.write_text(to_toml(client))
        client_paths.append(path)
    return coordinator_path, client_paths


def _spawn(role: str, config: Path, log_path: Path) -> subprocess.Popen:
    # One BLAS thread per process: N clients share 2 cores without oversubscription.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    with open(log_path, "wb") as log:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(
            [sys.executable, "-m", "flora.app", role, "--config", str(config)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )


def _watch(
    settings: DemoSettings,
    broker_url: str,
    coordinator: subprocess.Popen,
    clients: list[subprocess.Popen],
    console: Console,
) -> list[dict[str, Any]]:
    """Show the live view until the coordinator exits; fail fast if any process dies."""
    topics = Topics(settings.run_id)
    observer = connect_transport(broker_url, f"{settings.run_id}-observer")
    observer.connect()
    observer.subscribe(topics.metrics)
    records: dict[int, dict[str, Any]] = {}
    deadline = time.monotonic() + settings.timeout_s
    title = f"federated run '{settings.run_id}': {settings.clients} clients, recipe {settings.recipe}"
    live = Live(rounds_table([], title), console=console, refresh_per_second=4) if console.is_terminal else None
    try:
        if live:
            live.start()
        while coordinator.poll() is None:
            if time.monotonic() > deadline:
                raise FloraError(f"demo exceeded {settings.timeout_s:.0f}s; see {settings.out / 'logs'}")
            dead = [i for i, c in enumerate(clients) if c.poll() not in (None, 0)]
            if dead:
                raise FloraError(
                    f"client-{dead[0]} exited with an error; see {settings.out / 'logs'}/client-{dead[0]}.log"
                )
            message = observer.receive(timeout=0.5)
            if message is None or not message.payload:  # empty: a cleared retained topic
                continue
            env = envelope_from_bytes(message.payload)
            if env.kind == "round_result" and env.round not in records:
                records[env.round] = env.data
                if live:
                    live.update(rounds_table(sorted(records.values(), key=lambda r: r["round"]), title))
                else:
                    print_round_line(console, env.data)
    finally:
        if live:
            live.stop()
        observer.close()
    if coordinator.returncode != 0:
        raise FloraError(
            f"coordinator exited with code {coordinator.returncode}; see {settings.out / 'logs/coordinator.log'}"
        )
    return sorted(records.values(), key=lambda r: r["round"])


def run_demo(settings: DemoSettings, console: Console | None = None) -> dict[str, Any]:
    from export.pipeline import export_and_validate
    from flora.data.datasets import load_image_folder
    from flora.data.digits import DIGIT_TEMPLATE
    from flora.modeling.loading import load_clip
    from flora.modeling.tiny import write_tiny_clip

    console = console or Console()
    started = time.monotonic()
    out = settings.out
    (out / "logs").mkdir(parents=True, exist_ok=True)
    with console.status("writing the tiny CLIP checkpoint and staging data..."):
        model_dir = write_tiny_clip(out / "base_model", seed=settings.seed)
        load_clip(model_dir)  # the same from_pretrained path a hub checkpoint takes; fails early if broken
        client_dirs, test_dir, data_summary = _stage_data(settings, console)

    broker = None
    if settings.broker:
        broker_url = settings.broker
    else:
        broker = embedded_broker(log_path=out / "logs" / "broker.log").start()
        broker_url = broker.url
    console.print(f"broker: {broker_url}" + (" (embedded amqtt, loopback only)" if broker else ""))
    processes: list[subprocess.Popen] = []
    try:
        coordinator_cfg, client_cfgs = _write_configs(settings, model_dir, broker_url, client_dirs, test_dir)
        coordinator = _spawn("coordinator", coordinator_cfg, out / "logs" / "coordinator.log")
        processes.append(coordinator)
        clients = [_spawn("client", cfg, out / "logs" / f"{cfg.stem}.log") for cfg in client_cfgs]
        processes.extend(clients)
        console.print(f"started 1 coordinator and {len(clients)} edge clients (logs in {out / 'logs'})")
        _watch(settings, broker_url, coordinator, clients, console)
        for client in clients:
            client.wait(timeout=60)
    finally:
        for proc in processes:
            if proc.poll() is None:
                proc.terminate()
        for proc in processes:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
        if broker:
            broker.stop()
    federation_seconds = time.monotonic() - started

    with console.status("merging the adapter, exporting ONNX and validating it..."):
        test_data = load_image_folder(test_dir)
        onnx = export_and_validate(
            str(model_dir), out / "global_adapter", out / "onnx", eval_data=test_data, prompt_template=DIGIT_TEMPLATE
        )
    report = json.loads((out / "report.json").read_text())
    report.update(
        data=data_summary,
        onnx=onnx.to_dict(),
        federation_seconds=federation_seconds,
        total_seconds=time.monotonic() - started,
        broker=broker_url,
    )
    atomic_write_json(out / "report.json", report)
    _summary(console, report)
    return report


def _summary(console: Console, report: dict[str, Any]) -> None:
    console.print(rounds_table(report["rounds"], "rounds", report.get("initial_accuracy")))
    gain = (report["final_accuracy"] - report["initial_accuracy"]) * 100
    onnx = report["onnx"]
    console.print(
        f"accuracy {report['initial_accuracy'] * 100:.1f}% -> {report['final_accuracy'] * 100:.1f}% "
        f"({gain:+.1f} points) on {report['data']['test_examples']} held-out images\n"
        f"ONNX: max |ORT - PyTorch| = {onnx['max_abs_diff']:.2e}; ONNX Runtime accuracy "
        f"{onnx['onnxruntime_accuracy'] * 100:.1f}% (PyTorch {onnx['pytorch_accuracy'] * 100:.1f}%)\n"
        f"total {report['total_seconds']:.0f}s; outputs: report.json, metrics.png, global_adapter/, onnx/"
    )
