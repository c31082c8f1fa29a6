"""A user's strategy and client hook, registered by name, in one real round; an unknown hook is refused."""

from __future__ import annotations

import logging
import threading

import numpy as np

from coordinator.main import build_coordinator
from edge_client.main import build_agent
from flora.algorithms import ClientHook, FedAvg, register_client_hook, register_strategy
from flora.data.datasets import write_image_folder
from flora.protocol import Envelope, Topics, adapter_to_body, envelope_to_bytes
from flora.transport import Message
from tests.integration.helpers import TEMPLATE, client_configs, coordinator_config

hook_calls: list[dict] = []  # what the user hook saw, on the (in-process) clients


@register_client_hook("test_text_tower_only")
class TextTowerOnly(ClientHook):
    """Trains only the text tower's LoRA; records its params and what it was handed."""

    def __init__(self, tag: str = ""):
        if not isinstance(tag, str):
            raise ValueError(f"tag must be a string, got {tag!r}")
        self.tag = tag

    def trains(self, parameter_name: str) -> bool:
        return "text_model" in parameter_name

    def process_update(self, update, global_adapter):
        hook_calls.append({"tag": self.tag, "sent": sorted(update), "global": sorted(global_adapter)})
        return update


@register_strategy("test_biggest_client")
class BiggestClient(FedAvg):
    """Selects the client with the most examples, and asks it to run the user hook."""

    def select(self, candidates, *, round_, rng_seed, default):
        self.seen = {c.node: c.capabilities["dataset_size"] for c in candidates}
        return [max(candidates, key=lambda c: c.capabilities["dataset_size"]).node]

    def client_hooks(self):
        return [{"name": "test_text_tower_only", "params": {"tag": "from-strategy"}}]


def test_a_user_strategy_and_hook_run_end_to_end(tmp_path, tiny_model_dir, digits):
    sizes = {"client-0": 40, "client-1": 90}
    data_dirs = [
        write_image_folder(digits.subset(range(start, start + n)), tmp_path / f"data-{i}")
        for i, (start, n) in enumerate([(0, 40), (100, 90)])
    ]
    url = "memory://algorithms-round"
    configs = client_configs(tmp_path, tiny_model_dir, url, data_dirs, run_id="algo")
    config = coordinator_config(
        tmp_path, tiny_model_dir, url, None, clients=1, rounds=1, run_id="algo", local_epochs=1,
        min_available_clients=2, clients_per_round_fraction=0.5, strategy="test_biggest_client",
    )  # fmt: skip
    coordinator = build_coordinator(config)
    initial = {k: v.copy() for k, v in coordinator.evaluator.initial_adapter().items()}
    agents = [build_agent(c, progress=False) for c in configs]
    threads = [threading.Thread(target=a.run, kwargs={"max_seconds": 120}, daemon=True) for a in agents]
    for t in threads:
        t.start()
    hook_calls.clear()
    report = coordinator.run()
    for t in threads:
        t.join(timeout=60)

    assert coordinator.strategy.seen == sizes  # candidates carry the capabilities they announced
    (record,) = report["rounds"]
    assert record["selected"] == 1 and record["accepted"] == ["client-1"]  # the biggest, as the strategy chose
    assert [a.rounds_trained for a in agents] == [0, 1]
    assert hook_calls == [{"tag": "from-strategy", "sent": sorted(initial), "global": sorted(initial)}]
    final = coordinator.global_tensors
    vision = [k for k in initial if "vision_model" in k]
    text = [k for k in initial if "text_model" in k]
    assert vision and all(np.array_equal(final[k], initial[k]) for k in vision)  # the hook froze them
    assert any(not np.array_equal(final[k], initial[k]) for k in text)
    assert report["strategy"]["name"] == "test_biggest_client"
    assert report["strategy"]["class"] == f"{__name__}:BiggestClient"
    assert report["strategy"]["client_hooks"] == [{"name": "test_text_tower_only", "params": {"tag": "from-strategy"}}]


def test_an_instruction_naming_an_unknown_hook_is_refused_with_a_log_line(tmp_path, tiny_model_dir, digits, caplog):
    data_dir = write_image_folder(digits.subset(range(20)), tmp_path / "data")
    (config,) = client_configs(tmp_path, tiny_model_dir, "memory://algorithms-unknown-hook", [data_dir], run_id="algo")
    agent = build_agent(config, progress=False)
    agent.start()
    body, meta = adapter_to_body({k: v.numpy() for k, v in agent.trainer.adapter_state().items()})
    train = {"learning_rate": 1e-3, "prompt_template": TEMPLATE, "client_hooks": [{"name": "no_such_hook"}]}
    env = Envelope(
        kind="train", run="algo", sender="coordinator", round=1,
        data={"selected": [config.node_id], "recipe": config.recipe, "train": train}, body=body, body_meta=meta,
    )  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="edge_client.agent"):
        agent.handle(Message(Topics("algo").instruction, envelope_to_bytes(env)))
    agent.stop()
    assert agent.rounds_trained == 0 and agent.state.last_round_trained == -1
    (line,) = [r.getMessage() for r in caplog.records if "dropped instruction" in r.getMessage()]
    assert "unknown client hook 'no_such_hook'" in line
