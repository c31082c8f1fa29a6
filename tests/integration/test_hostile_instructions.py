"""A client without the coordinator's key, fed hostile instructions through a real Mosquitto (issue 10, item 4).

Whoever may publish on the instruction and metrics topics (a compromised broker, a stray coordinator) sends a
real agent well-framed messages with type-confused fields, all retained, then a valid-looking instruction for
round 1000. The agent must drop each with a logged reason, keep running, refuse to jump to round 1000, and
then train the genuine round 1 of a real coordinator.
"""

from __future__ import annotations

import logging
import time

import pytest

from coordinator.main import build_coordinator
from flora.protocol import Envelope, Topics, adapter_to_body, envelope_to_bytes
from flora.transport import Message
from flora.transport.chunked import ChunkingTransport
from flora.transport.mqtt import MqttTransport
from tests.integration.helpers import client_configs, coordinator_config, stage_clients, start_agents

pytestmark = pytest.mark.integration

RUN = "itest"
NODE = "client-0"


def poll(condition, what: str, timeout: float = 60.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if condition():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def test_type_confused_and_far_ahead_instructions_neither_stop_nor_derail_a_client(
    tmp_path, mosquitto, tiny_model_dir, digits, digits_split, test_folder, caplog
):
    caplog.set_level(logging.INFO)
    train_idx, _ = digits_split
    data_dirs = stage_clients(tmp_path, digits, train_idx, clients=1, per_client=100)
    config = coordinator_config(tmp_path, tiny_model_dir, mosquitto.url, test_folder, clients=1, rounds=1)
    coordinator = build_coordinator(config)
    body, meta = adapter_to_body(coordinator.evaluator.initial_adapter())
    topics = Topics(RUN)

    def instruction(round_: int, **data) -> Message:
        fields = {"selected": [NODE], "deadline": 0, "recipe": "both-towers", "train": {"prompt_template": "{label}"}}
        env = Envelope(kind="train", run=RUN, sender="coordinator", round=round_, data={**fields, **data})
        env.body, env.body_meta = body, meta
        return Message(topics.instruction, envelope_to_bytes(env), retain=True)

    hostile = ChunkingTransport(MqttTransport(mosquitto.url, "hostile"), 120_000)
    hostile.connect(timeout=10)
    agents, threads = start_agents(client_configs(tmp_path, tiny_model_dir, mosquitto.url, data_dirs), 240)
    (agent,), (agent_thread,) = agents, threads
    poll(lambda: any("online in run" in r.getMessage() for r in caplog.records), "the agent to come online")

    def dropped(text: str) -> bool:
        return any(r.name == "edge_client.agent" and text in r.getMessage() for r in caplog.records)

    result = Envelope(kind="round_result", run=RUN, sender="coordinator", round=0, data={"accepted": 5})
    hostile.publish(Message(topics.metrics, envelope_to_bytes(result), retain=True))
    poll(lambda: dropped("round_result.data.accepted must be a list"), "the round result with accepted=5")
    confused = [
        (instruction(1, selected=5), "train.data.selected must be a list"),
        (instruction(1, train=[1]), "train.data.train must be a JSON object"),
        (instruction(1, train={"prompt_template": "{0}"}), "prompt_template must contain {label}"),
        (instruction(1, train={"betas": [0.5]}), "betas must be a list of 2 numbers"),
    ]
    for message, reason in confused:
        hostile.publish(message)
        poll(lambda reason=reason: dropped(reason), reason)
        assert agent_thread.is_alive()
    hostile.publish(instruction(1000))  # valid in every field, but 1000 rounds ahead of anything seen
    poll(lambda: dropped("held the unsigned instruction for round 1000"), "the round-1000 instruction to be held")
    assert agent.rounds_trained == 0 and agent.state.last_round_trained == -1

    # The genuine coordinator clears the retained instruction and runs round 1: the agent trains it.
    report = coordinator.run()
    agent_thread.join(60)
    hostile.close()
    assert [(r["round"], r["participants"]) for r in report["rounds"]] == [(1, 1)]
    assert agent.rounds_trained == 1 and agent.state.last_round_trained == 1
    assert not agent_thread.is_alive()  # it left because the run finished (exit_when_finished), not on an error
    assert not any(r.levelno >= logging.ERROR and r.name == "edge_client.agent" for r in caplog.records)
