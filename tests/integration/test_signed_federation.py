"""A signed federation over the secured broker, against an attacker who controls the broker.

Coordinator and two clients run from the configs `flora provision` wrote (TLS, passwords, ACL, Ed25519 keys).
The attacker holds an account that may publish and read anything, as whoever runs a compromised broker
would, but none of the nodes' signing keys. Everything it forges, alters or replays is refused, with the
reason counted, and the run still completes with both real clients in every round.
"""

from __future__ import annotations

import json
import logging
import struct
import threading
import time

import numpy as np
import pytest

from coordinator.main import build_coordinator
from edge_client.config import load_client_config
from flora.protocol import Envelope, Topics, adapter_to_body, envelope_from_bytes, envelope_to_bytes
from flora.protocol.chunking import DEFAULT_MAX_MESSAGE_BYTES
from flora.protocol.signing import Signer, generate_private_key, is_signed
from flora.transport import Message
from flora.transport.chunked import ChunkingTransport
from tests.integration.helpers import coordinator_config, stage_clients, start_agents
from tests.integration.secure_fleet import provision_fleet

pytestmark = pytest.mark.integration

RUN = "itest"
CLIENTS = ["client-0", "client-1"]
ADMIN = "broker-admin"


def rewrite_round(payload: bytes, round_: int) -> bytes:
    """What an attacker does to move a captured update to another round: edit the header, keep the rest."""
    (n,) = struct.unpack(">I", payload[4:8])
    header = json.loads(payload[8 : 8 + n])
    header["round"] = round_
    raw = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    return payload[:4] + struct.pack(">I", len(raw)) + raw + payload[8 + n :]


def forged_update(sender: str, round_: int, template: dict[str, np.ndarray]) -> Envelope:
    body, meta = adapter_to_body({k: np.full_like(v, 0.5) for k, v in template.items()})
    data = {"num_examples": 10**6, "metrics": {"train_loss": 0.1}, "in_reply_to": "0" * 32}
    return Envelope(kind="update", run=RUN, sender=sender, round=round_, data=data, body=body, body_meta=meta)


def forged_instruction(round_: int, template: dict[str, np.ndarray]) -> Envelope:
    body, meta = adapter_to_body({k: np.full_like(v, 9.0) for k, v in template.items()})
    data = {"selected": CLIENTS, "deadline": 0, "recipe": "both-towers", "train": {"learning_rate": 1.0}}
    return Envelope(kind="train", run=RUN, sender="coordinator", round=round_, data=data, body=body, body_meta=meta)


class Attacker:
    """Before round 1: forged updates and a forged status. In round 2: replays of client-0's round-1 update,
    and forged instructions to the clients."""

    def __init__(self, transport, template):
        self.transport = transport
        self.template = template
        self.own_key = Signer(generate_private_key())  # a valid Ed25519 key, just not a provisioned one
        self.topics = Topics(RUN)
        self.captured: bytes | None = None
        self.done = threading.Event()

    def before_round_1(self) -> None:
        publish = self.transport.publish
        publish(Message(self.topics.update("client-0"), self.own_key.sign(forged_update("client-0", 1, self.template))))
        publish(Message(self.topics.update("client-1"), envelope_to_bytes(forged_update("client-1", 1, self.template))))
        ghost = Envelope(kind="status", run=RUN, sender="client-9", data={"state": "online", "recipe": "both-towers"})
        publish(Message(self.topics.status("client-9"), self.own_key.sign(ghost), retain=True))

    def run(self, stop: threading.Event) -> None:
        while not stop.is_set() and not self.done.is_set():
            message = self.transport.receive(timeout=0.1)
            if message is None or not message.payload:
                continue
            env = envelope_from_bytes(message.payload)
            if env.kind == "update" and env.sender == "client-0" and env.round == 1 and is_signed(message.payload):
                self.captured = message.payload
            elif env.kind == "train" and env.round == 2 and env.sender == "coordinator":
                assert self.captured is not None, "client-0's round-1 update was not seen"
                publish = self.transport.publish
                publish(Message(self.topics.update("client-0"), self.captured))  # as it was: signed for round 1
                publish(Message(self.topics.update("client-0"), rewrite_round(self.captured, 2)))
                forged = self.own_key.sign(forged_instruction(99, self.template))
                publish(Message(self.topics.instruction, forged))
                publish(Message(self.topics.instruction, envelope_to_bytes(forged_instruction(98, self.template))))
                self.done.set()


def test_a_signed_federation_refuses_what_a_compromised_broker_forges(
    tmp_path, tiny_model_dir, digits, digits_split, test_folder, caplog
):
    caplog.set_level(logging.ERROR, logger="edge_client.agent")
    fleet = provision_fleet(tmp_path, CLIENTS, model=str(tiny_model_dir), admin=ADMIN)
    broker = fleet.start_broker()
    try:
        train_idx, _ = digits_split
        data_dirs = stage_clients(tmp_path, digits, train_idx, clients=2, per_client=150)
        provisioned = {
            "username": "coordinator",
            "password": fleet.passwords["coordinator"],
            "ca_file": str(fleet.certs / "ca.crt"),
            "signing_key": fleet.out / "coordinator" / "coordinator.key",
            "device_keys_dir": fleet.out / "coordinator" / "device-keys",
        }
        config = coordinator_config(
            tmp_path, tiny_model_dir, broker.url, test_folder, clients=2, rounds=2, local_epochs=1, **provisioned
        )
        assert config.require_signatures  # on by default once device keys are configured
        coordinator = build_coordinator(config)
        template = coordinator.evaluator.initial_adapter()

        attacker_link = ChunkingTransport(fleet.transport(broker, ADMIN), DEFAULT_MAX_MESSAGE_BYTES)
        attacker_link.connect(timeout=10)
        for topic_filter in (f"flora/v1/{RUN}/update/+", f"flora/v1/{RUN}/instruction", f"flora/v1/{RUN}/status/+"):
            attacker_link.subscribe(topic_filter)
            attacker_link.subscribe(topic_filter + "/chunk/+")
        attacker = Attacker(attacker_link, template)

        result: dict = {}
        coordinator_thread = threading.Thread(target=lambda: result.update(report=coordinator.run()), daemon=True)
        coordinator_thread.start()
        wait_for_coordinator_online(attacker_link)
        attacker.before_round_1()  # held by the coordinator until round 1 opens, then judged

        configs = [
            load_client_config(
                fleet.device_toml(node),
                broker_url=broker.url,
                model=str(tiny_model_dir),
                data_dir=data_dir,
                recipe="both-towers",
                device="cpu",
                state_dir=tmp_path / f"state-{node}",
                exit_when_finished=True,
                seed=i,
            )
            for i, (node, data_dir) in enumerate(zip(CLIENTS, data_dirs))
        ]
        assert all(c.signing_key and c.coordinator_public_key and c.ca_file for c in configs)
        stop = threading.Event()
        attacker_thread = threading.Thread(target=attacker.run, args=(stop,), daemon=True)
        attacker_thread.start()
        agents, threads = start_agents(configs)
        coordinator_thread.join(180)
        stop.set()
        for t in [attacker_thread, *threads]:
            t.join(30)
        attacker_link.close()
    finally:
        broker.stop()

    report = result["report"]
    assert attacker.done.is_set()
    # Both real clients in both rounds; the ghost that announced itself with an unprovisioned key was never selected.
    assert [(r["selected"], r["participants"]) for r in report["rounds"]] == [(2, 2), (2, 2)]
    assert report["rejections"] == {
        "bad_signature": 2,  # round 1: client-0 forged with another key; round 2: the replay moved to round 2
        "unsigned": 1,  # round 1: client-1 forged without a signature
    }
    # Round 2: client-0's signed round-1 update, replayed as it was. A copy of an update that round 1 accepted is
    # what a restarted client re-sends, byte for byte: counted as a re-send, apart from rejections, and harmless.
    assert [r["resent"] for r in report["rounds"]] == [0, 1]
    assert report["final_accuracy"] > report["initial_accuracy"]
    # The clients refused both forged instructions and trained exactly the two real rounds.
    assert [a.rounds_trained for a in agents] == [2, 2]
    assert all(a.state.last_round_trained == 2 for a in agents)
    refused = [r.getMessage() for r in caplog.records if r.getMessage().startswith("refused train")]
    for round_, why in ((99, "does not verify"), (98, "not signed")):
        assert sum(f"round {round_}" in m and why in m for m in refused) == 2, refused


def wait_for_coordinator_online(link, timeout: float = 60.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        message = link.receive(timeout=0.2)
        if message is None or not message.payload or not message.topic.endswith("/status/coordinator"):
            continue
        if envelope_from_bytes(message.payload).data.get("state") == "online":
            return
    raise AssertionError("the coordinator never came online")
