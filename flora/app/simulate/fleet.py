"""N virtual edge clients in one process: the real EdgeAgent and LocalTrainer, one shared frozen base.

Each virtual client is a real `EdgeAgent` with its own in-memory transport, state directory and data, so it
speaks the real protocol (status, instruction, update, round result) and runs the real training loop. What they
share is the model: one loaded base with one set of LoRA layers, which every `train_round` overwrites with the
round's global adapter before training. So memory is one base plus one adapter, flat in the number of clients.
Sharing is safe because one driver thread serves the clients one message at a time: two clients never train at
once. (Time is then the sum of the clients' training, as on one device training for all of them.)
"""

from __future__ import annotations

import threading
from pathlib import Path

from edge_client.agent import EdgeAgent
from edge_client.config import ClientConfig
from edge_client.trainer import LocalTrainer
from flora.data.datasets import LabeledImages
from flora.modeling.adapter import attach_lora
from flora.modeling.kbit import prepare_quantized_for_training
from flora.modeling.loading import load_clip
from flora.modeling.recipes import LoraRecipe
from flora.transport import transport_for


class VirtualFleet:
    def __init__(
        self,
        model: str,
        recipe: LoraRecipe,
        shares: list[LabeledImages],
        *,
        broker_url: str,
        run_id: str,
        state_dir: Path,
        batch_size: int,
        device: str = "cpu",
        seed: int = 0,
    ):
        self.clip = load_clip(model, device=device)
        prepare_quantized_for_training(self.clip.model)
        shared = attach_lora(self.clip.model, recipe, seed=seed)  # one set of LoRA layers for every client
        self.agents: list[EdgeAgent] = []
        for i, data in enumerate(shares):
            config = ClientConfig(
                node_id=f"sim-{i:04d}",
                model=model,
                data_dir=state_dir / "unused",  # the data is handed over in memory, never read from here
                run_id=run_id,
                broker_url=broker_url,
                recipe=recipe.name,
                device=device,
                batch_size=batch_size,
                state_dir=state_dir / f"client-{i:04d}",
                exit_when_finished=True,
                seed=seed * 1000 + i,
            )
            trainer = LocalTrainer(
                self.clip,
                recipe,
                data,
                seed=config.seed,
                max_batch_size=batch_size,
                progress=False,
                cache_dir=None,  # image embeddings stay in memory: nothing to keep across a simulated reboot
                shared_model=shared,
            )
            # Chunking, as `flora client` has it: a large adapter (fedfft) comes as chunks over max_message_bytes.
            transport = transport_for(config)
            self.agents.append(EdgeAgent(config, transport, trainer))
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        for agent in self.agents:
            agent.start()
        self._thread = threading.Thread(target=self._serve, name="virtual-fleet", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        """One thread for every client: take each client's next message in turn (so one trains at a time)."""
        while not self._stop.is_set() and not all(a.finished for a in self.agents):
            idle = True
            for agent in self.agents:
                message = agent.transport.receive(timeout=0)
                if message is not None:
                    idle = False
                    agent.handle(message)
            if idle:
                self._stop.wait(0.01)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=60)
        for agent in self.agents:
            agent.stop()

    @property
    def trainable_parameters(self) -> int:
        return sum(t.numel() for t in self.agents[0].trainer.adapter_state().values())
