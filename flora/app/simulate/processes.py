"""`flora simulate --processes`: a cell's clients as separate `flora client` processes over a real broker.

The same cell as the in-process fleet, deployed as on a fleet: each client's share is written as an image folder
with its own client TOML, each client is its own process (its own copy of the base, so memory grows with the
clients), and they meet the coordinator over the embedded MQTT broker (amqtt, loopback) or the one `--broker`
names. Slower and heavier; it checks that what the grid measures in one process holds across processes.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from edge_client.config import ClientConfig
from flora.config import to_toml
from flora.data.datasets import LabeledImages, write_image_folder


class ProcessFleet:
    def __init__(
        self,
        model: str,
        recipe: str,
        shares: list[LabeledImages],
        *,
        broker_url: str,
        run_id: str,
        state_dir: Path,
        batch_size: int,
        device: str = "cpu",
        seed: int = 0,
    ):
        self.configs: list[Path] = []
        self.procs: list[subprocess.Popen] = []
        self.logs = state_dir / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        for i, data in enumerate(shares):
            node = f"sim-{i:04d}"
            config = ClientConfig(
                node_id=node,
                model=model,
                data_dir=write_image_folder(data, state_dir / f"data-{i:04d}"),
                run_id=run_id,
                broker_url=broker_url,
                recipe=recipe,
                device=device,
                batch_size=batch_size,
                state_dir=state_dir / f"client-{i:04d}",
                exit_when_finished=True,
                seed=seed * 1000 + i,
                log_level="WARNING",
            )
            path = state_dir / f"{node}.toml"
            path.write_text(to_toml(config))
            self.configs.append(path)

    def start(self) -> None:
        # One BLAS thread per process: N clients share the cores without oversubscription.
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
        for path in self.configs:
            with open(self.logs / f"{path.stem}.log", "wb") as log:
                self.procs.append(
                    subprocess.Popen(
                        [sys.executable, "-m", "flora.app", "client", "--config", str(path)],
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        env=env,
                        start_new_session=True,
                    )
                )

    def stop(self) -> None:
        for proc in self.procs:
            try:
                proc.wait(timeout=60)  # they exit by themselves when the run finishes
            except subprocess.TimeoutExpired:
                proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
