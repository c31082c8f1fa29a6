"""How the real coordinator scales with the number of clients (issue 4): orchestration time, memory, messages.

    .venv/bin/python bench/coordinator_scale.py --clients 10,100,500 --rounds 3 > coordinator_scale.json
    .venv/bin/python bench/coordinator_scale.py --clients 10,1000 --strategy median,trimmed_mean  # robust (issue 15)

For each N: a fresh Mosquitto on a free loopback port; N simulated clients, one MQTT connection each, spread
over a few worker processes that drive their paho clients from one selector loop (no threads, no model, no
training); and the real `coordinator.server.Coordinator`, built by `coordinator.main.build_coordinator` in a
process of its own so that its memory is measured alone. Clients answer a `train` instruction at once with
random tensors of exactly the instruction's names and shapes, so a round's wall time is all orchestration:
fan-out of the global adapter, receiving, checking and aggregating N updates, checkpointing (PEFT directory,
state.json, report.json, metrics.png) and publishing the round result.

The coordinator's model is a CLIP of the ViT-B/32 shape (text width 512, 12 layers; random weights, 151M
parameters) written to disk and loaded through the same `from_pretrained` path as `openai/clip-vit-base-patch32`,
so the `paper` recipe gives the real adapter: 24 tensors, 24,576 parameters, ~100 KB per message. No evaluation
data: the coordinator holds the model only to write PEFT checkpoints.

The coordinator's phases are timed by a subscriber to its events (coordinator/events.py), from the events'
monotonic stamps: nothing in the coordinator is wrapped or replaced. Memory: the coordinator's peak RSS during the
rounds (VmHWM, reset with /proc/self/clear_refs after the model is loaded), next to its RSS after setup.

`--strategy` takes a comma-separated list: each strategy runs every N in turn, and the output has one entry per
strategy under `by_strategy`, each with its own memory-growth verdict. For the robust strategies (median, trimmed
mean) the target is a peak-RSS growth under ROBUST_GROWTH_TARGET_MB (64 MiB) from the smallest to the largest N:
they spill updates to disk (flora/algorithms/spill.py) instead of holding them.

Prints one JSON object on stdout; progress goes to stderr. Linux only (/proc).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import multiprocessing as mp
import os
import platform
import queue
import resource
import selectors
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import uuid
from pathlib import Path
from typing import Any

# The Mosquitto launcher is test tooling (tests/brokers.py), not part of the installed package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TARGET_CLIENTS = 500
TARGET_ORCHESTRATION_S = 5.0
# Mosquitto's defaults queue at most 1000 QoS 1 messages per client; the coordinator may have N updates queued.
MOSQUITTO_CONFIG = "max_connections -1\nmax_queued_messages 10000\n"
CONNECT_BATCH = 64  # clients a worker connects before waiting for their CONNACKs (the broker's listen backlog)


# --------------------------------------------------------------------------------------------------------------------
# The coordinator's model: a CLIP of the real ViT-B/32 shape with random weights.
# --------------------------------------------------------------------------------------------------------------------
def write_vit_b32_shaped_clip(out: Path) -> Path:
    """A complete checkpoint directory (weights, config, tokenizer, image processor); kept if already there."""
    if (out / "config.json").is_file() and (out / "model.safetensors").is_file():
        return out
    import torch
    from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel, CLIPProcessor, CLIPTokenizer

    from flora.modeling.tiny import build_tiny_vocab

    _quiet_libraries()

    vocab, merges = build_tiny_vocab()  # the tokenizer plays no part here (no evaluation): keep it small
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges)
    text_config = {
        "vocab_size": 49408,
        "hidden_size": 512,
        "intermediate_size": 2048,
        "num_hidden_layers": 12,
        "num_attention_heads": 8,
        "max_position_embeddings": 77,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    vision_config = {
        "hidden_size": 768,
        "intermediate_size": 3072,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "image_size": 224,
        "patch_size": 32,
    }
    config = CLIPConfig(text_config=text_config, vision_config=vision_config, projection_dim=512)
    torch.manual_seed(0)
    model = CLIPModel(config)
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224})
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(tmp)
    tmp.replace(out)
    return out


# --------------------------------------------------------------------------------------------------------------------
# The coordinator, in its own process.
# --------------------------------------------------------------------------------------------------------------------
def _proc_status_mb(pid: int | str = "self") -> dict[str, float]:
    values = {}
    with open(f"/proc/{pid}/status") as handle:
        for line in handle:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                values[key] = int(rest.split()[0]) / 1024  # kB -> MiB
    return values


def _proc_cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def _reset_peak_rss() -> bool:
    """Make VmHWM restart from the current RSS (Linux 4.0+), so the peak excludes loading the model."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


# Round phases, in the order run_round goes through them; "other" is the rest (loading the in-flight selection,
# the loop between attempts). wait_for_clients includes selecting clients and saving the selection.
PHASES = ("wait_for_clients", "publish_instruction", "collect", "aggregate", "evaluate", "checkpoint", "publish_result")
# Per-update work inside "collect", summed over the round: "check" is decoding, verifying and validating an update;
# "round_record" (after evaluation) is building the round record, mostly the error meter's final error().
MESSAGE_WORK = ("check", "accumulate", "error_meter_add", "round_record")
# Inside "checkpoint": the PEFT checkpoint (adapter dir + state.json), then the RoundEnded subscribers' outputs
# (report.json, global_adapter/, metrics.png when redrawn).
CHECKPOINT_WORK = ("checkpoint_store_save", "outputs")


class RoundTimer:
    """Subscriber to the coordinator's events: per round, phase durations from the events' monotonic stamps,
    the coordinator's CPU and traffic, its inbox backlog; puts one ("round", {...}) on `out` per round.

    Stamps are time.monotonic() values, the same clock in every process on Linux, so they can be set against
    the clients' timestamps."""

    def __init__(self, transport, out):
        self.transport, self.out = transport, out
        inner = transport
        while hasattr(inner, "inner"):  # ChunkingTransport(MqttTransport)
            inner = inner.inner
        self._inner = inner
        self._inbox = getattr(inner, "_inbox", None)  # MqttTransport's queue, filled by paho's network thread
        self._start_round()

    def _start_round(self) -> None:
        self.events: list[Any] = []
        self.backlog = {"max": 0, "max_bytes": 0}
        self.cpu0, self.sent0, self.received0 = os.times(), self.transport.bytes_sent, self.transport.bytes_received

    def _sample_inbox(self) -> None:
        if self._inbox is not None:  # messages (status and updates) and their payload bytes, bounded by max_inbox_bytes
            self.backlog["max"] = max(self.backlog["max"], self._inbox.qsize())
            self.backlog["max_bytes"] = max(self.backlog["max_bytes"], self._inner.inbox_bytes)

    def __call__(self, event) -> None:
        from coordinator.events import ResultPublished

        self.events.append(event)
        self._sample_inbox()
        if isinstance(event, ResultPublished):
            self.out.put(("round", self._summary(event)))
            self._start_round()

    def _summary(self, published) -> dict[str, Any]:
        from coordinator.events import (
            Aggregated,
            CheckpointSaved,
            Evaluated,
            InstructionPublished,
            RoundEnded,
            RoundStarted,
            UpdateAccepted,
            UpdatesCollected,
        )

        def of(kind) -> list[Any]:
            return [e for e in self.events if isinstance(e, kind) and getattr(e, "round", None) == published.round]

        starts, instructions, collected = of(RoundStarted), of(InstructionPublished), of(UpdatesCollected)
        (aggregated,), (evaluated,) = of(Aggregated), of(Evaluated)
        (saved,), (ended,) = of(CheckpointSaved), of(RoundEnded)
        accepted = of(UpdateAccepted)
        record = ended.record
        total = published.at - starts[0].waiting_since
        phases = {
            "wait_for_clients": sum(s.at - s.waiting_since for s in starts),
            "publish_instruction": sum(i.at - s.at for s, i in zip(starts, instructions)),
            "collect": sum(c.at - i.at for i, c in zip(instructions, collected)),
            "aggregate": aggregated.at - collected[-1].at,
            "evaluate": evaluated.at - aggregated.at,
            "checkpoint": published.started_at - saved.started_at,
            "publish_result": published.at - published.started_at,
        }
        phases["other"] = max(0.0, total - sum(phases.values()))
        # Clients can only answer once the instruction is out: time the updates from the start of its publishing.
        t0 = starts[-1].at
        cpu1 = os.times()
        return {
            "round": record.round,
            "selected": record.selected,
            "participants": record.participants,
            "rejected": record.rejected,
            "round_s": total,  # run_round end to end: the orchestration time of this round
            "record_seconds": record.seconds,  # the coordinator's own figure (ends before checkpoint)
            "phases_s": phases,
            "message_work_s": {
                "check": sum(u.validated_at - u.received_at for u in accepted),
                "accumulate": sum(u.aggregated_at - u.validated_at for u in accepted),
                "error_meter_add": sum(u.at - u.aggregated_at for u in accepted),
                "round_record": saved.started_at - evaluated.at,
            },
            "checkpoint_work_s": {
                "checkpoint_store_save": saved.at - saved.started_at,
                "outputs": published.started_at - ended.at,
            },
            "instruction_published_at": t0,  # monotonic, matched with the clients' stamps
            "first_update_accumulated_after_s": min(u.aggregated_at for u in accepted) - t0 if accepted else None,
            "last_update_accumulated_after_s": max(u.aggregated_at for u in accepted) - t0 if accepted else None,
            "updates_per_s": record.participants / phases["collect"] if phases["collect"] else None,
            # Messages received but not yet processed by the round loop, at most (sampled at each event).
            "max_inbox_backlog": self.backlog["max"],
            "max_inbox_bytes": self.backlog["max_bytes"],
            "bytes_up": record.bytes_up,
            "bytes_down": record.bytes_down,
            "coordinator_bytes_published": self.transport.bytes_sent - self.sent0,
            "coordinator_bytes_received": self.transport.bytes_received - self.received0,
            "coordinator_cpu_s": (cpu1.user + cpu1.system) - (self.cpu0.user + self.cpu0.system),
            "rss_mb": _proc_status_mb(),
        }


def _quiet_libraries() -> None:
    """No download/load progress bars or library deprecation notices in the benchmark's progress output."""
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module="peft")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def coordinator_process(settings: dict[str, Any], events) -> None:
    """Build the real coordinator from its config, run every round, report timings and memory on `events`."""
    logging.basicConfig(level=logging.WARNING, format="[coordinator] %(levelname)s %(name)s: %(message)s")
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # imported by peft; no CPU 4-bit kernels needed here
    try:
        _quiet_libraries()
        from coordinator.config import CoordinatorConfig
        from coordinator.main import build_coordinator

        start = time.monotonic()
        config = CoordinatorConfig(**settings)
        coord = build_coordinator(config)
        adapter = coord.evaluator.initial_adapter()
        setup_s = time.monotonic() - start
        rss_setup = _proc_status_mb()
        reset_ok = _reset_peak_rss()
        events.put(
            (
                "setup",
                {
                    "setup_s": setup_s,
                    "rss_after_setup_mb": rss_setup["VmRSS"],
                    "adapter": {
                        "tensors": len(adapter),
                        "parameters": int(sum(v.size for v in adapter.values())),
                        "shapes": sorted({tuple(v.shape) for v in adapter.values()}),
                    },
                },
            )
        )
        coord.events.subscribe(RoundTimer(coord.transport, events))
        report = coord.run()
        status = _proc_status_mb()
        events.put(
            (
                "done",
                {
                    "rss_after_setup_mb": rss_setup["VmRSS"],
                    "peak_rss_rounds_mb": status["VmHWM"] if reset_ok else None,
                    "peak_rss_lifetime_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                    "rss_end_mb": status["VmRSS"],
                    "rejections": report["rejections"],
                },
            )
        )
    except BaseException:
        events.put(("error", traceback.format_exc()))
        raise


# --------------------------------------------------------------------------------------------------------------------
# Simulated clients: many paho connections per worker process, one selector loop, no threads.
# --------------------------------------------------------------------------------------------------------------------
class SimClient:
    def __init__(self, node: str, worker: ClientWorker):
        import paho.mqtt.client as mqtt

        from flora.protocol import Envelope, envelope_to_bytes

        self.node, self.worker = node, worker
        self.sock = None
        self.write_registered = False
        self.connected = self.subscribed = self.announced = self.finished = self.closing = False
        self.sub_mid = self.status_mid = None
        self.update_mids: set[int] = set()
        self.last_round = 0
        self.paho = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2, client_id=node, protocol=mqtt.MQTTv311, clean_session=False
        )
        offline = Envelope(kind="status", run=worker.run_id, sender=node, data={"state": "offline"})
        self.paho.will_set(worker.topics.status(node), envelope_to_bytes(offline), qos=1, retain=True)
        self.paho.on_connect = self._on_connect
        self.paho.on_subscribe = self._on_subscribe
        self.paho.on_publish = self._on_publish
        self.paho.on_message = self._on_message
        self.paho.on_disconnect = self._on_disconnect

    @property
    def ready(self) -> bool:
        return self.connected and self.subscribed and self.announced

    def status_payload(self, state: str) -> bytes:
        from flora.protocol import Envelope, envelope_to_bytes

        data: dict[str, Any] = {"state": state, "last_round_trained": self.last_round or -1}
        if state == "online":
            data |= {"recipe": "paper", "capabilities": {"hostname": self.node, "simulated": True, "dataset_size": 500}}
        return envelope_to_bytes(Envelope(kind="status", run=self.worker.run_id, sender=self.node, data=data))

    def _on_connect(self, client, userdata, flags, reason_code, properties):
        if reason_code.is_failure:
            self.worker.error(f"{self.node}: broker refused the connection: {reason_code}")
            return
        self.connected = True
        topics = self.worker.topics
        _, self.sub_mid = client.subscribe([(topics.instruction, 1), (topics.metrics, 1)])
        self.status_mid = client.publish(topics.status(self.node), self.status_payload("online"), 1, True).mid

    def _on_subscribe(self, client, userdata, mid, reason_code_list, properties):
        if mid == self.sub_mid:
            self.subscribed = True

    def _on_publish(self, client, userdata, mid, reason_code, properties):
        if mid == self.status_mid:
            self.announced = True
        elif mid in self.update_mids:
            self.update_mids.discard(mid)
            self.worker.stats["updates_acked"] += 1

    def _on_disconnect(self, client, userdata, flags, reason_code, properties):
        self.connected = False
        if not self.closing:
            self.worker.stats["disconnects"] += 1

    def _on_message(self, client, userdata, message):
        self.worker.on_message(self, message.topic, bytes(message.payload))


class ClientWorker:
    """Hosts many SimClients; answers selected `train` instructions at once with random tensors."""

    def __init__(self, index: int, nodes: list[str], host: str, port: int, run_id: str):
        import numpy as np

        from flora.protocol import Topics

        self.index, self.host, self.port, self.run_id = index, host, port, run_id
        self.topics = Topics(run_id)
        self.rng = np.random.default_rng(1000 + index)
        self.sel = selectors.DefaultSelector()
        self.instruction: tuple[str, Any] | None = None  # (msg_id, decoded): the same bytes reach every client
        self.stats: dict[str, Any] = {
            "clients": len(nodes),
            "instructions": {},
            "updates_sent": {},
            "results": {},
            "updates_acked": 0,
            "disconnects": 0,
            "bytes_sent": 0,
            "bytes_received": 0,
            "respond_s": 0.0,
            "errors": [],
            "stamps": {},  # round -> monotonic times: first/last instruction received, last update handed to paho
        }
        self.clients = [SimClient(node, self) for node in nodes]
        self.next_misc = 0.0

    def error(self, text: str) -> None:
        if len(self.stats["errors"]) < 10:
            self.stats["errors"].append(text)

    def _count(self, key: str, round_: Any) -> None:
        bucket = self.stats[key]
        bucket[str(round_)] = bucket.get(str(round_), 0) + 1

    def _stamp(self, round_: Any, name: str, *, first: bool = False) -> None:
        stamps = self.stats["stamps"].setdefault(str(round_), {})
        if not first or name not in stamps:
            stamps[name] = time.monotonic()

    # -- the event loop ------------------------------------------------------------------------------------------
    def _sync(self, client: SimClient) -> None:
        """Keep the selector in step with the client's socket, and flush what it has to send."""
        sock = client.paho.socket()
        if sock is not client.sock:
            if client.sock is not None:
                with contextlib.suppress(KeyError, ValueError):
                    self.sel.unregister(client.sock)
            client.sock, client.write_registered = sock, False
            if sock is not None:
                self.sel.register(sock, selectors.EVENT_READ, client)
        if sock is None:
            return
        if client.paho.want_write():
            client.paho.loop_write()  # usually all of it: loopback sockets have room
            if client.paho.socket() is not sock:
                return self._sync(client)
        want = client.paho.want_write()
        if want != client.write_registered:
            events = selectors.EVENT_READ | (selectors.EVENT_WRITE if want else 0)
            self.sel.modify(sock, events, client)
            client.write_registered = want

    def pump(self, timeout: float) -> None:
        for key, mask in self.sel.select(timeout):
            client: SimClient = key.data
            if mask & selectors.EVENT_READ:
                client.paho.loop_read()
            if mask & selectors.EVENT_WRITE and client.paho.socket() is not None:
                client.paho.loop_write()
            self._sync(client)
        now = time.monotonic()
        if now >= self.next_misc:  # keepalive pings
            self.next_misc = now + 1.0
            for client in self.clients:
                if client.sock is not None:
                    client.paho.loop_misc()
                    self._sync(client)

    def connect_all(self, deadline: float) -> None:
        for start in range(0, len(self.clients), CONNECT_BATCH):
            batch = self.clients[start : start + CONNECT_BATCH]
            for client in batch:
                client.paho.connect(self.host, self.port, keepalive=60)
                self._sync(client)
            while not all(c.ready for c in batch):
                if time.monotonic() > deadline or self.stats["errors"]:
                    missing = sum(not c.ready for c in self.clients)
                    raise RuntimeError(f"worker {self.index}: {missing} clients not online: {self.stats['errors']}")
                self.pump(0.05)

    def close_all(self, timeout: float = 10.0) -> None:
        """Like a real client on `finished`: publish an offline status, then disconnect cleanly."""
        for client in self.clients:
            client.closing = True
            if client.connected:
                client.paho.publish(self.topics.status(client.node), client.status_payload("offline"), 1, True)
                client.paho.disconnect()
            self._sync(client)
        deadline = time.monotonic() + timeout
        while any(c.sock is not None for c in self.clients) and time.monotonic() < deadline:
            self.pump(0.05)

    # -- the protocol -------------------------------------------------------------------------------------------
    def _decode_instruction(self, payload: bytes) -> dict[str, Any]:
        """Decode once per worker: every client receives the very same bytes."""
        from flora.protocol import adapter_from_body, envelope_from_bytes
        from flora.protocol.envelope import read_header

        header, _ = read_header(payload)
        if self.instruction is None or self.instruction[0] != header.get("msg_id"):
            env = envelope_from_bytes(payload)  # framing, version, size and sha256 checks
            shapes = None
            if env.kind == "train":
                shapes = {k: v.shape for k, v in adapter_from_body(env.body, env.body_meta).items()}
            decoded = {
                "kind": env.kind,
                "round": env.round,
                "msg_id": env.msg_id,
                "selected": frozenset(env.data.get("selected", ())),
                "shapes": shapes,
            }
            self.instruction = (env.msg_id, decoded)
        return self.instruction[1]

    def on_message(self, client: SimClient, topic: str, payload: bytes) -> None:
        from flora.errors import ProtocolError
        from flora.protocol.chunking import is_chunk
        from flora.protocol.envelope import read_header

        self.stats["bytes_received"] += len(payload)
        if not payload:
            return  # a cleared retained topic
        if is_chunk(payload):
            # A message over the coordinator's max_message_bytes (the instruction's `selected` list grows with N).
            self.error(f"{client.node}: a chunked message on {topic}; the simulated clients do not reassemble")
            return
        try:
            if topic == self.topics.metrics:
                header, _ = read_header(payload)
                self._count("results", header.get("round"))
                return
            instruction = self._decode_instruction(payload)
        except ProtocolError as exc:
            self.error(f"{client.node}: bad message on {topic}: {exc}")
            return
        if instruction["kind"] == "finished":
            client.finished = True
            return
        if instruction["kind"] != "train":
            return
        round_ = instruction["round"]
        self._count("instructions", round_)
        self._stamp(round_, "instruction_first", first=True)
        self._stamp(round_, "instruction_last")
        if client.node in instruction["selected"] and round_ > client.last_round:
            client.last_round = round_
            self._answer(client, instruction)

    def _answer(self, client: SimClient, instruction: dict[str, Any]) -> None:
        import numpy as np

        from flora.protocol import Envelope, adapter_to_body, envelope_to_bytes

        start = time.perf_counter()
        tensors = {
            name: self.rng.standard_normal(shape, dtype=np.float32) * np.float32(0.02)
            for name, shape in instruction["shapes"].items()
        }
        body, meta = adapter_to_body(tensors, "float32")
        env = Envelope(
            kind="update",
            run=self.run_id,
            sender=client.node,
            round=instruction["round"],
            data={
                "num_examples": int(self.rng.integers(1, 1001)),
                "in_reply_to": instruction["msg_id"],
                "metrics": {"train_loss": 1.0},
            },
            body=body,
            body_meta=meta,
        )
        payload = envelope_to_bytes(env)
        info = client.paho.publish(self.topics.update(client.node), payload, qos=1)
        client.update_mids.add(info.mid)
        self.stats["bytes_sent"] += len(payload)
        self._count("updates_sent", instruction["round"])
        self._stamp(instruction["round"], "update_last")
        self.stats["respond_s"] += time.perf_counter() - start


def client_worker_process(index: int, nodes: list[str], host: str, port: int, run_id: str, conn) -> None:
    """Connect every client, say "ready", serve rounds until the run is finished (or "stop"), report stats."""
    worker = None
    try:
        worker = ClientWorker(index, nodes, host, port, run_id)
        start = time.monotonic()
        worker.connect_all(deadline=start + 120.0)
        conn.send(("ready", {"seconds": time.monotonic() - start}))
        next_poll = 0.0
        while not all(c.finished for c in worker.clients):
            worker.pump(0.05)
            now = time.monotonic()
            if now >= next_poll:
                next_poll = now + 0.1
                if worker.stats["errors"]:
                    raise RuntimeError(f"worker {index}: {worker.stats['errors']}")
                if conn.poll() and conn.recv() == "stop":
                    break
        worker.close_all()
        times = os.times()
        worker.stats["cpu_s"] = times.user + times.system
        conn.send(("stats", worker.stats))
    except BaseException:
        conn.send(("error", traceback.format_exc()))
        raise


# --------------------------------------------------------------------------------------------------------------------
# One N: broker, clients, coordinator; collect and summarise.
# --------------------------------------------------------------------------------------------------------------------
def _recv(conn, timeout: float, what: str):
    if not conn.poll(timeout):
        raise TimeoutError(f"no {what} within {timeout:.0f}s")
    kind, payload = conn.recv()
    if kind == "error":
        raise RuntimeError(f"{what} failed:\n{payload}")
    return payload


def bench_clients(n: int, args, model_dir: Path, workdir: Path, log) -> dict[str, Any]:
    from tests.brokers import mosquitto_broker

    load_before = os.getloadavg()[0]
    ctx = mp.get_context("spawn")
    run_id = f"scale-n{n}-{uuid.uuid4().hex[:6]}"
    nodes = [f"sim-{i:05d}" for i in range(n)]
    workers = max(1, min(args.workers, n))
    procs: list = []
    broker = mosquitto_broker(extra_config=MOSQUITTO_CONFIG, log_path=workdir / f"mosquitto-n{n}.log").start()
    try:
        pipes = []
        for index in range(workers):
            parent, child = ctx.Pipe()
            proc = ctx.Process(
                target=client_worker_process,
                args=(index, nodes[index::workers], broker.host, broker.port, run_id, child),
                name=f"sim-clients-{index}",
            )
            proc.start()
            procs.append(proc)
            pipes.append(parent)
        start = time.monotonic()
        for index, pipe in enumerate(pipes):
            _recv(pipe, args.connect_timeout, f"client worker {index} ready")
        online_s = time.monotonic() - start
        log(f"N={n}: {n} clients online in {online_s:.1f}s ({workers} worker processes)")

        events = ctx.Queue()
        settings = {
            "model": str(model_dir),
            "run_id": run_id,
            "broker_url": broker.url,
            "recipe": "paper",
            "strategy": args.strategy,
            "rounds": args.rounds,
            "clients_per_round_fraction": 1.0,
            "min_clients_per_round": n,
            "min_available_clients": n,
            "quorum": n,
            "round_deadline_s": args.round_deadline,
            "wait_for_clients_s": args.round_deadline,
            "max_round_attempts": 1,
            "checkpoint_dir": workdir / f"ckpt-{run_id}",  # fresh: an old state.json would be resumed
            "output_dir": workdir / f"out-{run_id}",
            "eval_data_dir": None,
            "device": "cpu",
        }
        coordinator = ctx.Process(target=coordinator_process, args=(settings, events), name="coordinator")
        coordinator.start()
        procs.append(coordinator)
        rounds, setup, done = [], None, None
        early: dict[int, tuple[str, Any]] = {}  # messages from the workers read while the rounds ran
        deadline = time.monotonic() + 180.0 + args.rounds * (args.round_deadline + 30.0)
        while done is None:
            if time.monotonic() > deadline:
                raise TimeoutError(f"N={n}: the coordinator did not finish in time")
            try:
                kind, payload = events.get(timeout=1.0)
            except queue.Empty:
                if not coordinator.is_alive():
                    raise RuntimeError(f"N={n}: coordinator exited with code {coordinator.exitcode}") from None
                for index, pipe in enumerate(pipes):
                    if index not in early and pipe.poll():  # an error, or stats if the run just finished
                        early[index] = pipe.recv()
                        if early[index][0] == "error":
                            raise RuntimeError(f"N={n}: client worker {index} failed:\n{early[index][1]}") from None
                continue
            if kind == "error":
                raise RuntimeError(f"N={n}: coordinator failed:\n{payload}")
            if kind == "setup":
                setup = payload
                rss = payload["rss_after_setup_mb"]
                log(f"N={n}: coordinator ready in {payload['setup_s']:.1f}s, RSS {rss:.0f} MiB")
            elif kind == "round":
                rounds.append(payload)
                phases = payload["phases_s"]
                log(
                    f"N={n} round {payload['round']}/{args.rounds}: {payload['participants']}/{payload['selected']} "
                    f"updates, {payload['round_s']:.2f}s (collect {phases['collect']:.2f}s, checkpoint "
                    f"{phases['checkpoint']:.2f}s), coordinator RSS {payload['rss_mb']['VmRSS']:.0f} MiB"
                )
            elif kind == "done":
                done = payload
        coordinator.join(30)
        stats = [early[i][1] if i in early else _recv(p, 60.0, f"client worker {i} stats") for i, p in enumerate(pipes)]
        for proc in procs:
            proc.join(10)
        broker_status = _proc_status_mb(broker.proc.pid)
        broker_cpu_s = _proc_cpu_s(broker.proc.pid)
    finally:
        for proc in procs:
            if proc.is_alive():
                proc.terminate()
                proc.join(5)
        broker.stop()
    result = summarise(n, rounds, setup, done, stats, online_s, broker_status, broker_cpu_s)
    result["load_average_before"] = load_before  # 1-minute load: other work on a shared machine skews wall times
    return result


def summarise(n, rounds, setup, done, stats, online_s, broker_status, broker_cpu_s) -> dict[str, Any]:
    def per_round(key: str) -> dict[str, int]:
        total: dict[str, int] = {}
        for worker in stats:
            for round_, count in worker[key].items():
                total[round_] = total.get(round_, 0) + count
        return total

    instructions, updates_sent, results = per_round("instructions"), per_round("updates_sent"), per_round("results")
    for record in rounds:
        r = str(record["round"])
        # Through the broker: in = instruction + N updates + round result; out = N instructions + N updates
        # (to the coordinator) + N round results.
        delivered = instructions.get(r, 0) + record["participants"] + results.get(r, 0)
        published = 2 + updates_sent.get(r, 0)
        record["broker_messages"] = {"published": published, "delivered": delivered}
        stamps = [w["stamps"][r] for w in stats if r in w["stamps"]]
        t0 = record["instruction_published_at"]
        if stamps:
            record["clients"] = {
                "first_instruction_after_s": min(x["instruction_first"] for x in stamps) - t0,
                "last_instruction_after_s": max(x["instruction_last"] for x in stamps) - t0,
                "last_update_sent_after_s": max(x.get("update_last", t0) for x in stamps) - t0,
            }
        record["messages_per_s"] = (published + delivered) / record["round_s"]
    round_s = [r["round_s"] for r in rounds]

    def median(fn) -> float:
        return statistics.median(fn(r) for r in rounds)

    breakdown = {
        "error_meter_ms_per_update": median(lambda r: 1e3 * r["message_work_s"]["error_meter_add"] / r["participants"]),
        "other_update_work_ms_per_update": median(
            lambda r: 1e3 * sum(r["message_work_s"][k] for k in MESSAGE_WORK[:2]) / r["participants"]
        ),
        "outputs_s": median(lambda r: r["checkpoint_work_s"]["outputs"]),
        "checkpoint_save_s": median(lambda r: r["checkpoint_work_s"]["checkpoint_store_save"]),
        "clients_all_updates_sent_after_s": median(lambda r: r.get("clients", {}).get("last_update_sent_after_s", 0.0)),
        "last_update_accumulated_after_s": median(lambda r: r["last_update_accumulated_after_s"] or 0.0),
        "max_inbox_backlog": max(r["max_inbox_backlog"] for r in rounds),
        "max_inbox_mb": max(r["max_inbox_bytes"] for r in rounds) / 1e6,
    }
    complete = all(r["participants"] == n for r in rounds) and len(rounds) > 0
    return {
        "clients": n,
        "complete": complete,
        "clients_online_s": online_s,
        "coordinator_setup_s": setup["setup_s"],
        "adapter": setup["adapter"],
        "instruction_bytes": rounds[-1]["bytes_down"] // max(1, rounds[-1]["selected"]),
        "update_bytes": rounds[-1]["bytes_up"] // max(1, rounds[-1]["participants"]),
        "orchestration_s": {
            "median": statistics.median(round_s),
            "max": max(round_s),
            "min": min(round_s),
            "per_round": round_s,
        },
        "updates_per_s_median": statistics.median(r["updates_per_s"] for r in rounds),
        "messages_per_s_median": statistics.median(r["messages_per_s"] for r in rounds),
        "messages_per_round": rounds[-1]["broker_messages"],
        "bytes_up_per_round": rounds[-1]["bytes_up"],
        "bytes_down_per_round": rounds[-1]["bytes_down"],
        "coordinator_memory_mb": {
            "rss_after_setup": done["rss_after_setup_mb"],
            "peak_during_rounds": done["peak_rss_rounds_mb"],
            "peak_above_setup": (done["peak_rss_rounds_mb"] or 0.0) - done["rss_after_setup_mb"],
            "peak_lifetime": done["peak_rss_lifetime_mb"],
        },
        "breakdown_median": breakdown,
        "coordinator_cpu_s_per_round_median": statistics.median(r["coordinator_cpu_s"] for r in rounds),
        "broker": {"peak_rss_mb": broker_status.get("VmHWM"), "cpu_s": broker_cpu_s},
        "simulated_clients": {
            "worker_processes": len(stats),
            "cpu_s": sum(w["cpu_s"] for w in stats),
            "respond_ms_per_update": 1e3 * sum(w["respond_s"] for w in stats) / max(1, sum(updates_sent.values())),
            "updates_acked": sum(w["updates_acked"] for w in stats),
            "disconnects": sum(w["disconnects"] for w in stats),
            "errors": [e for w in stats for e in w["errors"]],
        },
        "rejections": done["rejections"],
        "rounds": rounds,
    }


ROBUST_GROWTH_TARGET_MB = 64.0
ROBUST = ("median", "trimmed_mean")


def verdict(results: list[dict[str, Any]], strategy: str = "fedavg") -> dict[str, Any]:
    at_target = next((r for r in results if r["clients"] == TARGET_CLIENTS), None)
    out: dict[str, Any] = {"clients": TARGET_CLIENTS, "max_orchestration_s": TARGET_ORCHESTRATION_S}
    if at_target is None:
        out["met"] = None
        out["note"] = f"N={TARGET_CLIENTS} was not run"
    else:
        worst = at_target["orchestration_s"]["max"]
        out["worst_round_s"] = worst
        out["met"] = bool(at_target["complete"] and worst < TARGET_ORCHESTRATION_S)
    peaks = [(r["clients"], r["coordinator_memory_mb"]["peak_during_rounds"]) for r in results]
    if len(peaks) > 1 and all(p is not None for _, p in peaks):
        (n_lo, lo), (n_hi, hi) = min(peaks), max(peaks)
        out["peak_rss_growth_mb"] = {"from_clients": n_lo, "to_clients": n_hi, "mb": hi - lo, "fraction": hi / lo - 1}
        if strategy in ROBUST:
            out["robust_growth_under_mb"] = ROBUST_GROWTH_TARGET_MB
            out["robust_growth_met"] = bool(hi - lo < ROBUST_GROWTH_TARGET_MB)
    return out


# --------------------------------------------------------------------------------------------------------------------
def environment() -> dict[str, Any]:
    from importlib.metadata import version

    from flora import __version__
    from tests.brokers import mosquitto_binary

    mosquitto = subprocess.run([mosquitto_binary(), "-h"], capture_output=True, text=True).stdout.splitlines()
    return {
        "cpus": len(os.sched_getaffinity(0)),
        "cpu_model": next(
            (line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), None
        ),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "mosquitto": mosquitto[0] if mosquitto else None,
        "paho_mqtt": version("paho-mqtt"),
        "numpy": version("numpy"),
        "torch": version("torch"),
        "flora_edge": __version__,
    }


def raise_fd_limit(clients: int) -> dict[str, int]:
    """Mosquitto (our child) needs a descriptor per connection; workers need one per client they host."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 2 * clients + 1024
    if soft < wanted:
        soft = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    return {"soft": soft, "hard": hard}


def markdown_rows(results: list[dict[str, Any]]) -> list[str]:
    rows = [
        "| N | orchestration s/round (median / max) | collect s | checkpoint s | updates/s | broker messages/s "
        "| coordinator peak RSS MiB (after setup) | up / down per round |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        collect = statistics.median(x["phases_s"]["collect"] for x in r["rounds"])
        checkpoint = statistics.median(x["phases_s"]["checkpoint"] for x in r["rounds"])
        mem = r["coordinator_memory_mb"]
        rows.append(
            f"| {r['clients']} | {r['orchestration_s']['median']:.2f} / {r['orchestration_s']['max']:.2f} "
            f"| {collect:.2f} | {checkpoint:.2f} | {r['updates_per_s_median']:.0f} | {r['messages_per_s_median']:.0f} "
            f"| {mem['peak_during_rounds']:.0f} ({mem['rss_after_setup']:.0f}) "
            f"| {r['bytes_up_per_round'] / 1e6:.1f} MB / {r['bytes_down_per_round'] / 1e6:.1f} MB |"
        )
    rows += [
        "",
        "| N | error meter ms/update | other work ms/update | outputs s | checkpoint save s "
        "| all updates sent after s | last update accumulated after s | max inbox backlog (MB) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        b = r["breakdown_median"]
        rows.append(
            f"| {r['clients']} | {b['error_meter_ms_per_update']:.1f} | {b['other_update_work_ms_per_update']:.2f} "
            f"| {b['outputs_s']:.2f} | {b['checkpoint_save_s']:.2f} "
            f"| {b['clients_all_updates_sent_after_s']:.2f} | {b['last_update_accumulated_after_s']:.2f} "
            f"| {b['max_inbox_backlog']} ({b['max_inbox_mb']:.1f}) |"
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--clients", default="10,100,500", help="comma-separated client counts (default 10,100,500)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per client count (default 3)")
    parser.add_argument("--workers", type=int, default=2, help="processes hosting the simulated clients (default 2)")
    parser.add_argument("--strategy", default="fedavg", help="aggregation strategies, comma-separated (default fedavg)")
    parser.add_argument("--round-deadline", type=float, default=120.0, help="coordinator round_deadline_s (120)")
    parser.add_argument("--connect-timeout", type=float, default=180.0, help="seconds for all clients to come online")
    parser.add_argument(
        "--model-dir",
        type=Path,
        help="CLIP checkpoint directory for the coordinator; if it holds none, a ViT-B/32-shaped one with random\n"
        "weights is written there and kept (default: written to a temporary directory, removed at exit)",
    )
    parser.add_argument("--workdir", type=Path, help="keep broker logs and checkpoints here (default: temporary)")
    args = parser.parse_args(argv)
    counts = [int(c) for c in args.clients.split(",") if c.strip()]
    if not counts or min(counts) < 1 or args.rounds < 1:
        parser.error("--clients needs positive integers and --rounds must be >= 1")

    from rich.console import Console

    console = Console(stderr=True)

    def log(text: str) -> None:
        console.log(text, highlight=False)

    fd_limit = raise_fd_limit(max(counts))
    temp = Path(tempfile.mkdtemp(prefix="flora-bench-scale-"))
    workdir = args.workdir or temp
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        started = time.monotonic()
        model_dir = args.model_dir or temp / "clip-vit-b32-shape"
        if not (model_dir / "config.json").is_file():
            log(f"writing a ViT-B/32-shaped CLIP (random weights) to {model_dir}")
        write_vit_b32_shaped_clip(model_dir)
        strategies = [name for name in args.strategy.split(",") if name.strip()]
        by_strategy: dict[str, Any] = {}
        for strategy in strategies:
            run_args = argparse.Namespace(**{**vars(args), "strategy": strategy})
            results = [bench_clients(n, run_args, model_dir, workdir, log) for n in counts]
            by_strategy[strategy] = {"target": verdict(results, strategy), "results": results}
            for row in markdown_rows(results):
                console.print(f"{strategy}: {row}", highlight=False, markup=False, soft_wrap=True)
        first = by_strategy[strategies[0]]
        output = {
            "benchmark": "coordinator_scale",
            "command": " ".join([".venv/bin/python", "bench/coordinator_scale.py", *(argv or sys.argv[1:])]),
            "environment": environment(),
            "settings": {
                "clients": counts,
                "rounds": args.rounds,
                "client_worker_processes": args.workers,
                "recipe": "paper",
                "strategy": args.strategy,
                "model": "CLIP ViT-B/32 shape, random weights" if args.model_dir is None else str(model_dir),
                "mosquitto_extra_config": MOSQUITTO_CONFIG.strip().splitlines(),
                "fd_limit": fd_limit,
            },
            "target": first["target"],  # the first strategy's, where a single one ran (the format before)
            "results": first["results"],
            "by_strategy": by_strategy,
            "wall_s": time.monotonic() - started,
        }
        print(json.dumps(output, indent=2, default=str))
        return 0
    finally:
        shutil.rmtree(temp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
