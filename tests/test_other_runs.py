"""Devices under another run id: which topics count, what is remembered, and the bound on it."""

from coordinator.other_runs import OtherRuns
from flora.protocol import Envelope
from flora.protocol.topics import run_of_status_topic


def _status(node: str, run: str, state: str = "online", **extra) -> Envelope:
    return Envelope(kind="status", run=run, sender=node, data={"state": state, **extra})


def test_only_status_topics_name_a_run():
    assert run_of_status_topic("flora/v1/cifar/status/jetson-1") == "cifar"
    assert run_of_status_topic("flora/v1/cifar/update/jetson-1") is None
    assert run_of_status_topic("flora/v1/cifar/status/jetson-1/chunk/0") is None
    assert run_of_status_topic("other/v1/cifar/status/jetson-1") is None


def test_online_clients_of_other_runs_are_remembered_until_they_leave_or_join():
    runs = OtherRuns("mine")
    runs.heard(_status("a", "typo"))
    runs.heard(_status("b", "mine"))  # this run: the registry's business
    runs.heard(_status("c", "typo", role="coordinator"))  # another run's coordinator is no misconfigured device
    assert dict(runs.nodes) == {"a": "typo"}
    assert runs.summary() == "a (run 'typo')"
    runs.heard(_status("a", "typo", state="offline"))
    assert not runs.nodes
    runs.heard(_status("a", "typo"))
    runs.joined("a")
    assert not runs.nodes


def test_what_is_remembered_is_bounded_oldest_first():
    runs = OtherRuns("mine", max_tracked=3)
    for i in range(10):
        runs.heard(_status(f"n{i}", "flood"))
    assert list(runs.nodes) == ["n7", "n8", "n9"]
    assert runs.summary(limit=2) == "n7 (run 'flood'), n8 (run 'flood') and 1 more"
