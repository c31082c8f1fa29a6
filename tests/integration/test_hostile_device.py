"""A provisioned device that sends what the JSON parser accepts but the checkpoint cannot hold (issue 10, item 1).

Over the secured broker (TLS, ACL, Ed25519 signatures), with its own account and signing key, the hostile device
announces a retained status whose capabilities hold NaN, and answers every instruction with a correctly signed
update whose train_loss is 1e308 (finite, but inf once weighted). Before, the coordinator stored both as
received, and writing the strict-JSON checkpoint raised at the end of round 1, on every restart. Now the NaN
capability is dropped, the update is rejected as bad_metrics, and the run completes with the honest client.
"""

from __future__ import annotations

import base64
import hashlib
import json
import struct
import threading

import pytest

from coordinator.main import build_coordinator
from edge_client.config import load_client_config
from flora.protocol import Topics, envelope_from_bytes
from flora.protocol.envelope import MAGIC
from flora.protocol.signing import CONTEXT, load_private_key
from flora.transport import Message
from flora.transport.chunked import ChunkingTransport
from tests.integration.helpers import coordinator_config, stage_clients, start_agents
from tests.integration.secure_fleet import provision_fleet

pytestmark = pytest.mark.integration

RUN = "itest"
HONEST, HOSTILE = "client-0", "client-1"


def signed_raw(key, header: dict, body: bytes = b"") -> bytes:
    """An envelope signed as the protocol says, written with Python's default JSON: NaN allowed, as a device
    in another language might. The signature is genuine: the device is provisioned."""
    if body:
        header["body"] = {**header["body"], "size": len(body), "sha256": hashlib.sha256(body).hexdigest()}
    text = json.dumps(header, sort_keys=True, separators=(",", ":"))
    signature = base64.b64encode(key.sign(CONTEXT + text.encode())).decode()
    sealed = {**json.loads(text), "sig": {"alg": "ed25519", "key": "0" * 16, "header": text, "value": signature}}
    raw = json.dumps(sealed, sort_keys=True, separators=(",", ":")).encode()
    return MAGIC + struct.pack(">I", len(raw)) + raw + body


def header(kind: str, round_, data: dict, body_meta=None) -> dict:
    return {"v": "1.1", "kind": kind, "run": RUN, "round": round_, "sender": HOSTILE, "msg_id": "f" * 32,
            "sent_at": 0.0, "data": data, "body": body_meta}  # fmt: skip


def hostile_device(link, key, stop: threading.Event, answered: list[int]) -> None:
    """Answers every instruction selecting it with the global adapter unchanged and train_loss 1e308."""
    topics = Topics(RUN)
    caps = {"dataset_size": 150, "memory_free_mb": float("nan"), "supports_4bit": False}
    status = header("status", None, {"state": "online", "recipe": "both-towers", "capabilities": caps})
    link.publish(Message(topics.status(HOSTILE), signed_raw(key, status), retain=True))
    while not stop.is_set():
        message = link.receive(timeout=0.1)
        if message is None or not message.payload or message.topic != topics.instruction:
            continue
        env = envelope_from_bytes(message.payload)
        if env.kind != "train" or HOSTILE not in env.data["selected"] or env.round in answered:
            continue
        data = {"num_examples": 150, "metrics": {"train_loss": 1e308}, "in_reply_to": env.msg_id}
        update = header("update", env.round, data, body_meta=dict(env.body_meta))
        link.publish(Message(topics.update(HOSTILE), signed_raw(key, update, env.body)))
        answered.append(env.round)


def test_a_device_sending_nan_capabilities_and_a_huge_loss_cannot_crash_the_coordinator(
    tmp_path, tiny_model_dir, digits, digits_split, test_folder
):
    fleet = provision_fleet(tmp_path, [HONEST, HOSTILE], model=str(tiny_model_dir))
    broker = fleet.start_broker()
    try:
        train_idx, _ = digits_split
        (data_dir,) = stage_clients(tmp_path, digits, train_idx, clients=1, per_client=150)
        provisioned = {
            "username": "coordinator",
            "password": fleet.passwords["coordinator"],
            "ca_file": str(fleet.certs / "ca.crt"),
            "signing_key": fleet.out / "coordinator" / "coordinator.key",
            "device_keys_dir": fleet.out / "coordinator" / "device-keys",
        }
        # Both are selected; the hostile update is rejected, so each round ends at its deadline with the honest one.
        extra = dict(local_epochs=1, quorum=1, round_deadline_s=20.0, **provisioned)
        config = coordinator_config(tmp_path, tiny_model_dir, broker.url, test_folder, clients=2, rounds=2, **extra)
        coordinator = build_coordinator(config)

        hostile_config = load_client_config(fleet.device_toml(HOSTILE), broker_url=broker.url)
        link = ChunkingTransport(fleet.transport(broker, HOSTILE), 120_000)
        link.connect(timeout=10)
        link.subscribe(f"flora/v1/{RUN}/instruction")
        link.subscribe(f"flora/v1/{RUN}/instruction/chunk/+")
        stop, answered = threading.Event(), []
        hostile = threading.Thread(
            target=hostile_device, args=(link, load_private_key(hostile_config.signing_key), stop, answered)
        )
        hostile.start()
        honest_config = load_client_config(
            fleet.device_toml(HONEST),
            broker_url=broker.url,
            model=str(tiny_model_dir),
            data_dir=data_dir,
            recipe="both-towers",
            device="cpu",
            state_dir=tmp_path / "state-honest",
            exit_when_finished=True,
        )
        _, threads = start_agents([honest_config], 240)
        try:
            report = coordinator.run()
        finally:
            stop.set()
            for t in [hostile, *threads]:
                t.join(60)
            link.close()
    finally:
        broker.stop()

    assert answered == [1, 2]  # it was selected and answered both rounds
    assert [(r["selected"], r["accepted"]) for r in report["rounds"]] == [(2, [HONEST])] * 2
    assert report["rejections"] == {"bad_metrics": 2}
    assert all(r["train_loss"] is not None and r["train_loss"] < 100 for r in report["rounds"])
    state = json.loads((tmp_path / "ckpt" / "state.json").read_text(), parse_constant=pytest.fail)
    assert state["round"] == 2
    assert state["registry"][HOSTILE]["capabilities"] == {"dataset_size": 150, "supports_4bit": False}
