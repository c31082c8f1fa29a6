"""The coordinator's events: the order a real round emits them in, rejections, and subscribers that fail.

A real Coordinator and real EdgeAgents (tiny CLIP, built like `flora coordinator` and `flora client` build
them) federate over the in-memory broker; a raw peer sends the messages that must be rejected.
"""

from __future__ import annotations

import json
import logging
import threading

import numpy as np
import pytest

from coordinator.config import CoordinatorConfig
from coordinator.events import (
    CheckpointSaved,
    EventBus,
    RoundEnded,
    RoundStarted,
    RunFinished,
    UpdateAccepted,
    UpdateRejected,
)
from coordinator.main import build_coordinator
from edge_client.main import build_agent
from flora.errors import RejectReason
from flora.protocol import Envelope, Topics, adapter_to_body, envelope_from_bytes, envelope_to_bytes
from flora.records import RunReport
from flora.transport import MemoryBroker, MemoryTransport, Message
from tests.integration.helpers import TEMPLATE, client_configs, stage_clients

RUN = "events"
BROKER = "memory://coordinator-events"


class Recorder:
    """Every event, plus what was on disk and on the wire at the moments the ordering promises something."""

    def __init__(self, checkpoint_dir, observer: MemoryTransport):
        self.events = []
        self.checkpoint_dir, self.observer = checkpoint_dir, observer
        self.state_round_at_checkpoint_saved: list[int] = []
        self.results_before_round_ended: list[int] = []

    def __call__(self, event) -> None:
        self.events.append(event)
        if isinstance(event, CheckpointSaved):
            state = json.loads((self.checkpoint_dir / "state.json").read_text())
            self.state_round_at_checkpoint_saved.append(state["round"])
        if isinstance(event, RoundEnded):  # the in-memory broker delivers on publish: nothing may be there yet
            while (message := self.observer.receive(timeout=0)) is not None:
                if message.payload:
                    self.results_before_round_ended.append(envelope_from_bytes(message.payload).round)


class FailingSubscriber:
    def __init__(self):
        self.calls = 0

    def on_update_accepted(self, event: UpdateAccepted) -> None:
        self.calls += 1
        raise RuntimeError("tracker server unreachable")

    def on_round_ended(self, event: RoundEnded) -> None:
        self.calls += 1
        raise RuntimeError("tracker server unreachable")


@pytest.fixture
def federation(tmp_path, tiny_model_dir, digits, digits_split, test_folder):
    train_idx, _ = digits_split
    data_dirs = stage_clients(tmp_path, digits, train_idx, clients=2, per_client=40)
    config = CoordinatorConfig(
        model=str(tiny_model_dir),
        run_id=RUN,
        broker_url=BROKER,
        recipe="both-towers",
        rounds=2,
        min_clients_per_round=2,
        min_available_clients=2,
        quorum=2,
        round_deadline_s=60.0,
        wait_for_clients_s=60.0,
        local_epochs=1,
        batch_size=32,
        prompt_template=TEMPLATE,
        checkpoint_dir=tmp_path / "ckpt",
        output_dir=tmp_path / "out",
        eval_data_dir=test_folder,
    )
    observer = MemoryTransport(MemoryBroker.named(BROKER[len("memory://") :]), "observer")
    observer.connect()
    observer.subscribe(Topics(RUN).metrics)
    recorder, failing = Recorder(config.checkpoint_dir, observer), FailingSubscriber()
    coordinator = build_coordinator(config, subscribers=[failing, recorder])
    agents = [build_agent(c, progress=False) for c in client_configs(tmp_path, tiny_model_dir, BROKER, data_dirs, RUN)]
    yield coordinator, agents, recorder, failing, config
    observer.close()
    MemoryBroker._named.pop(BROKER[len("memory://") :], None)


def rogue_messages() -> list[Message]:
    """Junk on an update topic (rejected while no round is open), and a well-formed update for round 1 from a
    node nobody selected (held until round 1 opens, then rejected by it)."""
    topics = Topics(RUN)
    body, meta = adapter_to_body({"w": np.zeros(2, dtype=np.float32)})
    unselected = Envelope(
        kind="update", run=RUN, sender="rogue", round=1, data={"num_examples": 5}, body=body, body_meta=meta
    )
    return [
        Message(topics.update("junk"), b"not an envelope"),
        Message(topics.update("rogue"), envelope_to_bytes(unselected)),
    ]


def test_a_real_run_emits_its_events_in_order_and_survives_a_failing_subscriber(federation, caplog):
    coordinator, agents, recorder, failing, config = federation
    coordinator.start()  # subscribed: the rogue messages wait in its inbox
    peer = MemoryTransport(MemoryBroker.named(BROKER[len("memory://") :]), "rogue")
    peer.connect()
    for message in rogue_messages():
        peer.publish(message)
    threads = [threading.Thread(target=a.run, kwargs={"max_seconds": 120}, daemon=True) for a in agents]
    for t in threads:
        t.start()
    with caplog.at_level(logging.WARNING, logger="coordinator.events"):
        result = coordinator.run()
    for t in threads:
        t.join(30)

    events = recorder.events
    names = [type(e).__name__ for e in events]
    assert names[0] == "RunStarted" and names[-1] == "RunFinished"
    for round_ in (1, 2):
        in_round = [type(e).__name__ for e in events if getattr(e, "round", None) == round_]
        updates = [n for n in in_round if n.startswith("Update") and n != "UpdatesCollected"]
        assert [n for n in in_round if n not in updates] == [
            "RoundStarted",
            "InstructionPublished",
            "UpdatesCollected",
            "Aggregated",
            "Evaluated",
            "CheckpointSaved",
            "RoundEnded",
            "ResultPublished",
        ]
        assert updates.count("UpdateAccepted") == 2
        assert in_round.index("UpdateAccepted") > in_round.index("InstructionPublished")
        assert max(i for i, n in enumerate(in_round) if n == "UpdateAccepted") < in_round.index("Aggregated")
    stamps = [e.at for e in events]
    assert stamps == sorted(stamps)  # one monotonic clock, emitted in order

    # The checkpoint names the round before anyone hears of it, and the result goes out after.
    assert recorder.state_round_at_checkpoint_saved == [1, 2]
    assert recorder.results_before_round_ended == [1]  # round 1's result, seen when round 2 ended; never early

    rejected = [e for e in events if isinstance(e, UpdateRejected)]
    assert [(e.round, e.node, e.reason) for e in rejected] == [
        (None, "junk", RejectReason.MALFORMED),
        (1, "rogue", RejectReason.NOT_SELECTED),
    ]
    started = [e for e in events if isinstance(e, RoundStarted)]
    assert [sorted(e.selected) for e in started] == [["client-0", "client-1"]] * 2
    accepted = [e for e in events if isinstance(e, UpdateAccepted) and e.round == 1]
    assert sorted(e.node for e in accepted) == ["client-0", "client-1"]
    assert all(e.received_at <= e.validated_at <= e.aggregated_at <= e.at and e.bytes > 0 for e in accepted)

    # The failing subscriber ran on every update and round end, and the run completed regardless.
    assert failing.calls == 4 + 2
    failures = [r for r in caplog.records if "FailingSubscriber" in r.getMessage()]
    assert len(failures) == 6 and sum(bool(r.exc_info) for r in failures) == 1

    # Records: the events', the report's and report.json's agree.
    records = [e.record for e in events if isinstance(e, RoundEnded)]
    (finished,) = [e for e in events if isinstance(e, RunFinished)]
    assert finished.report.rounds == tuple(records) and [r.participants for r in records] == [2, 2]
    assert records[0].rejected == {"not_selected": 1}
    on_disk = json.loads((config.output_dir / "report.json").read_text())
    assert on_disk == json.loads(json.dumps(finished.report.to_dict())) == json.loads(json.dumps(result))
    assert RunReport.from_dict(on_disk) == finished.report
    assert on_disk["rejections"] == {"malformed": 1, "not_selected": 1}
    assert (config.output_dir / "metrics.png").is_file()
    assert (config.output_dir / "global_adapter" / "adapter_model.safetensors").is_file()
    # The prompt and classes the run trained with travel with the adapter and in the report (for export, infer).
    training = json.loads((config.output_dir / "global_adapter" / "flora_training.json").read_text())
    assert training == on_disk["training"]
    assert training["prompt_template"] == TEMPLATE and training["class_names"] == [str(d) for d in range(10)]


def test_a_required_subscriber_stops_the_emitter_and_an_optional_one_does_not(caplog):
    bus, seen = EventBus(), []

    def broken(event):
        raise OSError("disk full")

    bus.subscribe(broken)
    bus.subscribe(seen.append)
    event = RunFinished(report=RunReport("r", "0", "m", "paper", "fedavg", 1))
    with caplog.at_level(logging.WARNING, logger="coordinator.events"):
        bus.emit(event)
    assert seen == [event] and "disk full" in caplog.text

    bus.unsubscribe(broken)
    bus.subscribe(broken, required=True)
    with pytest.raises(OSError, match="disk full"):
        bus.emit(event)
    assert seen == [event, event]  # subscribers before the required one still heard it


def test_object_subscribers_get_only_the_events_they_handle_and_junk_is_refused():
    class OnlyRoundEnds:
        def __init__(self):
            self.seen = []

        def on_run_finished(self, event):
            self.seen.append(event)

    bus, subscriber = EventBus(), OnlyRoundEnds()
    bus.subscribe(subscriber)
    finished = RunFinished(report=RunReport("r", "0", "m", "paper", "fedavg", 1))
    bus.emit(RoundStarted(round=1, attempt=1, selected=("a",), deadline=0.0, waiting_since=0.0))
    bus.emit(finished)
    assert subscriber.seen == [finished]
    bus.unsubscribe(subscriber)
    bus.emit(finished)
    assert subscriber.seen == [finished] and bus.subscribers == []
    with pytest.raises(TypeError, match="neither callable"):
        bus.subscribe(object())
