"""Federated vs centralized on digits with the tiny model: 10 clients, Dirichlet(0.1) label skew, a random start.

Same data, same total epochs (16); only the federation differs. Centralized is the paper's AdamW (lr 5e-3, batch 32)
over all 16 epochs without a restart, CLIP's in-batch loss. Federated is the setting first on three seeds'
validation in EXPERIMENTS.md's fourth pass: each client takes about one plain-SGD step a round on a batch of 4,
and the server's Adam (fedadam, tau 1e-6, beta2 0.98, lr 5e-3) steps along their example-weighted average, with
the class-prompt loss (whose average over clients is the pooled data's gradient): 464 rounds x 1/29 epoch.
The grid measured it at 80.6 ± 3.1% against 87.8% over three seeds (gap 7.2). Here, on this test's own split
over a real Mosquitto, it reached 76.6% against 88.0% on an AMD EPYC (AVX512) VM: a gap of 11.4 points. Before,
the test ran FedAvgM (server lr 1.5, momentum 0.5) over 16 whole-epoch rounds: 67.4% against 88.0% (gap 20.6,
stated as 21); FedAvg alone measured 61.6% against 84.7% (gap 23.1) on an Intel Xeon VM.
The stated margin, 14 points, leaves room for the CPU's float kernels (they moved the centralized reference by 3
points between the two VMs); a change that costs the federated run more than 2.6 points fails it here.
464 rounds make this the suite's longest test (about 13 minutes on a loaded 2-core VM).
"""

from __future__ import annotations

import numpy as np
import pytest

from coordinator.main import build_coordinator
from edge_client.trainer import LocalTrainer, TrainSettings
from flora.data.datasets import load_image_folder, write_image_folder
from flora.data.partition import dirichlet
from flora.modeling import scoring
from flora.modeling.loading import load_clip
from flora.modeling.recipes import get_recipe
from tests.integration.helpers import TEMPLATE, client_configs, coordinator_config, start_agents

pytestmark = [pytest.mark.integration, pytest.mark.timeout(1800)]  # 464 rounds x 10 clients: slow on a busy machine

CLIENTS, TOTAL_EPOCHS = 10, 16
# Federated (EXPERIMENTS.md, fourth pass): one plain-SGD step a round on a batch of 4 per client, the server's Adam
# along their average, the class-prompt loss; 464 rounds x 1/29 epoch = 16 epochs.
ROUNDS, ROUND_EPOCHS = 464, 0.0345
FEDERATED = dict(
    local_epochs=ROUND_EPOCHS, batch_size=4, client_optimizer="sgd", learning_rate=0.5, weight_decay=0.0,
    strategy="fedadam", strategy_params={"server_lr": 5e-3, "beta2": 0.98, "tau": 1e-6}, objective="class-prompts",
)  # fmt: skip
# Centralized: the paper's AdamW over all 16 epochs without a restart, CLIP's in-batch loss.
CENTRALIZED_LR, CENTRALIZED_BATCH = 5e-3, 32
MARGIN = 0.14  # stated: the federated run may trail centralized by at most this under Dirichlet(0.1)


def test_federated_accuracy_is_within_the_stated_margin_of_centralized(
    tmp_path, mosquitto, tiny_model_dir, digits, digits_split, test_folder
):
    train_idx, _ = digits_split
    parts = dirichlet(digits.labels[train_idx], CLIENTS, beta=0.1, seed=0)
    data_dirs = [write_image_folder(digits.subset(train_idx[p]), tmp_path / f"data-{i}") for i, p in enumerate(parts)]

    config = coordinator_config(
        tmp_path, tiny_model_dir, mosquitto.url, test_folder, clients=CLIENTS, rounds=ROUNDS, **FEDERATED,
        wait_for_clients_s=600.0, round_deadline_s=600.0,  # a busy machine: ten agents load and train slowly
    )  # fmt: skip
    coordinator = build_coordinator(config)
    coordinator.start()
    configs = client_configs(tmp_path, tiny_model_dir, mosquitto.url, data_dirs)
    _agents, threads = start_agents(configs, max_seconds=2400)
    try:
        federated = coordinator.run()["final_accuracy"]
    finally:
        for t in threads:
            t.join(60)

    # Centralized: one trainer on the union of the clients' data, the same number of epochs in total.
    union = digits.subset(np.concatenate([train_idx[p] for p in parts]))
    trainer = LocalTrainer(load_clip(tiny_model_dir), get_recipe("both-towers"), union, progress=False)
    settings = TrainSettings(
        local_epochs=TOTAL_EPOCHS,
        learning_rate=CENTRALIZED_LR,
        batch_size=CENTRALIZED_BATCH,
        prompt_template=TEMPLATE,
    )
    trainer.train_round({k: v.numpy() for k, v in trainer.adapter_state().items()}, settings, round_=1)
    test = load_image_folder(test_folder)
    from flora.data.datasets import pixel_values

    centralized = scoring.evaluate(
        trainer.model,
        trainer.clip.tokenizer,
        pixel_values(trainer.clip.image_processor, test.images),
        test.labels,
        scoring.class_prompts(test.class_names, TEMPLATE),
    )["accuracy"]
    print(f"federated {federated:.4f} centralized {centralized:.4f} (Dirichlet 0.1, {CLIENTS} clients)")
    assert centralized > 0.5  # the reference itself learned
    assert federated > 0.3  # federation learned despite the label skew
    assert federated >= centralized - MARGIN
