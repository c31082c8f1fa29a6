"""Update encodings side by side: bytes per update and accuracy after the demo's federation (issue 5).

    .venv/bin/python bench/payload.py > payload.json                 # all encodings, the demo's settings
    .venv/bin/python bench/payload.py --seeds 0,1,2 > payload.json   # accuracy averaged over 3 demo seeds
    .venv/bin/python bench/payload.py --encodings float32,float16 --rounds 3   # quicker

For each wire encoding (float32, float16, bfloat16, int8-tensor, int8-channel) it runs the federation of
`flora demo` with the demo's defaults (tiny CLIP written to disk, scikit-learn digits split by a
Dirichlet(0.5) over 4 clients, 10 rounds, 2 local epochs, lr 3e-3, recipe both-towers; the demo's own
configs, written by flora.app.demo and loaded back), in this process: the real coordinator and 4 real edge
agents in threads over the in-memory broker, through the chunking transport. Clients send their updates
in the encoding under test with zstd; the coordinator sends the global adapter in float32, as in the demo.

Bytes per update: every update envelope the coordinator received, as sent (zstd) and as it would be
uncompressed (the same envelope with the decompressed body), averaged; plus the MQTT messages it takes
under the default 120 KB limit. Accuracy: the coordinator's final accuracy on the held-out 20% (359 images,
so one image is 0.28 points). Encodings are compared seed by seed: with the same seed, float32 and float16
see the same data, splits and initial adapter; with several seeds the mean is reported too.
Also the sizes of the paper recipe's update (24 tensors, ViT-B/32 text tower) in each encoding.

Prints one JSON object on stdout; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import logging
import math
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from flora.protocol import Envelope, Topics, adapter_to_body, envelope_from_bytes, envelope_to_bytes
from flora.protocol.chunking import DEFAULT_MAX_MESSAGE_BYTES, mqtt_publish_packet_size, split_message
from flora.protocol.compression import decompress
from flora.protocol.encodings import ENCODINGS


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class UpdateMeter:
    """Listens on update/+ (through the chunking transport, as the coordinator does) and sizes every update."""

    def __init__(self, broker_url: str, run_id: str):
        from flora.transport import connect_transport
        from flora.transport.chunked import ChunkingTransport

        self.topics = Topics(run_id)
        self.transport = ChunkingTransport(connect_transport(broker_url, "payload-meter"), None)
        self.sizes: list[dict[str, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self.transport.connect()
        self.transport.subscribe(self.topics.all_updates)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)
        self.transport.close()

    def _run(self) -> None:
        while not self._stop.is_set():
            message = self.transport.receive(timeout=0.2)
            if message is not None and message.payload:
                self.sizes.append(self.measure(message.topic, message.payload))

    @staticmethod
    def measure(topic: str, payload: bytes) -> dict[str, int]:
        env = envelope_from_bytes(payload)
        raw_meta = {k: v for k, v in env.body_meta.items() if k not in ("compression", "raw_size")}
        plain = envelope_to_bytes(
            dataclasses.replace(env, body=decompress(env.body, env.body_meta), body_meta=raw_meta)
        )
        return {
            "zstd": len(payload),
            "none": len(plain),
            "messages_zstd": messages_at_default_limit(topic, payload),
            "messages_none": messages_at_default_limit(topic, plain),
        }


def messages_at_default_limit(topic: str, payload: bytes) -> int:
    if mqtt_publish_packet_size(topic, len(payload)) <= DEFAULT_MAX_MESSAGE_BYTES:
        return 1
    return len(split_message(topic, payload, DEFAULT_MAX_MESSAGE_BYTES))


def federate(encoding: str, work: Path, rounds: int, seed: int) -> dict[str, Any]:
    """One run of the demo's federation with clients sending `encoding` + zstd."""
    from rich.console import Console

    from coordinator.config import load_coordinator_config
    from coordinator.main import build_coordinator
    from edge_client.config import load_client_config
    from edge_client.main import build_agent
    from flora.app.demo import DemoSettings, _stage_data, _write_configs
    from flora.modeling.tiny import write_tiny_clip

    settings = DemoSettings(out=work, rounds=rounds, seed=seed, run_id=f"payload-{encoding}")
    quiet = Console(file=io.StringIO())
    model_dir = write_tiny_clip(work / "base_model", seed=settings.seed)
    client_dirs, test_dir, _ = _stage_data(settings, quiet)
    broker_url = f"memory://payload-{encoding}-{seed}"
    coordinator_path, client_paths = _write_configs(settings, model_dir, broker_url, client_dirs, test_dir)

    coordinator = build_coordinator(load_coordinator_config(coordinator_path))
    coordinator.start()
    meter = UpdateMeter(broker_url, settings.run_id)
    meter.start()
    agents = [
        build_agent(load_client_config(path, wire_encoding=encoding, wire_compression="zstd"), progress=False)
        for path in client_paths
    ]
    threads = [threading.Thread(target=a.run, kwargs={"max_seconds": 1800}, daemon=True) for a in agents]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    try:
        report = coordinator.run()
    finally:
        for thread in threads:
            thread.join(60)
        meter.stop()
    seconds = time.monotonic() - started
    sizes = meter.sizes
    return {
        "final_accuracy": report["final_accuracy"],
        "initial_accuracy": report["initial_accuracy"],
        "accuracy_per_round": [r["accuracy"] for r in report["rounds"]],
        "updates": len(sizes),
        "bytes_per_update": {
            "none": round(statistics.mean(s["none"] for s in sizes)),
            "zstd": round(statistics.mean(s["zstd"] for s in sizes)),
        },
        "mqtt_messages_per_update_at_120kb": {
            "none": max(s["messages_none"] for s in sizes),
            "zstd": max(s["messages_zstd"] for s in sizes),
        },
        "rejections": report["rejections"],
        "seconds": round(seconds, 1),
    }


def summarize(runs: list[dict[str, Any]], seeds: list[int]) -> dict[str, Any]:
    """Accuracy averaged over seeds; sizes averaged over every update of every run."""
    return {
        "final_accuracy": statistics.mean(r["final_accuracy"] for r in runs),
        "final_accuracy_per_seed": [r["final_accuracy"] for r in runs],
        "initial_accuracy_per_seed": [r["initial_accuracy"] for r in runs],
        "seeds": seeds,
        "updates": sum(r["updates"] for r in runs),
        "bytes_per_update": {
            c: round(statistics.mean(r["bytes_per_update"][c] for r in runs)) for c in ("none", "zstd")
        },
        "mqtt_messages_per_update_at_120kb": {
            c: max(r["mqtt_messages_per_update_at_120kb"][c] for r in runs) for c in ("none", "zstd")
        },
        "rejections": [r["rejections"] for r in runs],
        "seconds_per_run": [r["seconds"] for r in runs],
        "accuracy_per_round_seed_0": runs[0]["accuracy_per_round"],
    }


def paper_recipe_sizes(seed: int = 0) -> dict[str, dict[str, int]]:
    """Update envelope bytes for the paper's recipe on ViT-B/32 (r=2 on the 12 text out_proj, width 512)."""
    rng = np.random.default_rng(seed)
    prefix = "base_model.model.text_model.encoder.layers"
    tensors = {}
    for layer in range(12):
        # Trained-looking values: A from PEFT's kaiming-uniform init, B small after a few rounds.
        bound = 1 / math.sqrt(512)
        tensors[f"{prefix}.{layer}.self_attn.out_proj.lora_A.weight"] = rng.uniform(-bound, bound, size=(2, 512))
        tensors[f"{prefix}.{layer}.self_attn.out_proj.lora_B.weight"] = rng.normal(scale=1e-3, size=(512, 2))
    sizes = {}
    for encoding in ENCODINGS:
        sizes[encoding] = {}
        for compression in ("none", "zstd"):
            body, meta = adapter_to_body(tensors, encoding, compression)
            env = Envelope(kind="update", run="paper", sender="jetson-01", round=1, body=body, body_meta=meta)
            sizes[encoding][compression] = len(envelope_to_bytes(env))
    return sizes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--encodings", default=",".join(ENCODINGS), help="comma-separated wire encodings")
    parser.add_argument("--rounds", type=int, default=10, help="federated rounds (the demo's default: 10)")
    parser.add_argument("--seeds", default="0", help="comma-separated demo seeds (data split, model, training)")
    parser.add_argument("--workdir", type=Path, default=None, help="where runs are staged (default: a temp dir)")
    args = parser.parse_args(argv)
    encodings = [e.strip() for e in args.encodings.split(",") if e.strip()]
    unknown = [e for e in encodings if e not in ENCODINGS]
    if unknown:
        parser.error(f"unknown encoding(s) {unknown}; choose from {', '.join(ENCODINGS)}")
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)

    seeds = [int(x) for x in args.seeds.split(",") if x.strip()]
    runs: dict[str, list[dict[str, Any]]] = {e: [] for e in encodings}
    with contextlib.ExitStack() as stack:
        root = args.workdir or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="flora-payload-")))
        for seed in seeds:
            for encoding in encodings:
                log(f"seed {seed}: federating with {encoding} + zstd updates ({args.rounds} rounds)...")
                run = federate(encoding, root / f"{encoding}-{seed}", args.rounds, seed)
                runs[encoding].append(run)
                log(
                    f"  {encoding}: final accuracy {run['final_accuracy'] * 100:.2f}%, "
                    f"{run['bytes_per_update']['none']} B/update ({run['bytes_per_update']['zstd']} B with zstd), "
                    f"{run['seconds']:.0f}s"
                )
    results = {encoding: summarize(runs[encoding], seeds) for encoding in encodings}
    if "float32" in results:
        reference = results["float32"]
        for r in results.values():
            r["accuracy_delta_vs_float32_points"] = round((r["final_accuracy"] - reference["final_accuracy"]) * 100, 2)
            r["accuracy_delta_vs_float32_points_per_seed"] = [
                round((a - b) * 100, 2)
                for a, b in zip(r["final_accuracy_per_seed"], reference["final_accuracy_per_seed"])
            ]
            r["bytes_vs_float32"] = round(r["bytes_per_update"]["none"] / reference["bytes_per_update"]["none"], 3)
    output = {
        "benchmark": "payload encodings",
        "command": "python bench/payload.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "settings": {
            "demo": "tiny CLIP, digits, 4 clients Dirichlet(0.5), 2 local epochs, lr 3e-3, recipe both-towers",
            "rounds": args.rounds,
            "seeds": seeds,
            "update_compression": "zstd (uncompressed sizes derived from the same updates)",
            "global_adapter": "float32, uncompressed",
        },
        "encodings": results,
        "paper_recipe_update_bytes": paper_recipe_sizes(),
    }
    print(json.dumps(output, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
