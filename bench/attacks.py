"""Floods against the real coordinator, each beside an un-attacked run with the same seed (issue 10's figures).

    .venv/bin/python bench/attacks.py > attacks.json

For each attack: a fresh Mosquitto on a free loopback port, the real coordinator (in this process, so its RSS
is this process's), the attack sent from a process of its own while the coordinator waits for its clients
(tests/integration/hostile_senders.py: what an attacker with one device's credentials can publish), then two
honest clients join and the run goes its rounds. The un-attacked run does the same with no attack. Reported per
run: the coordinator's RSS growth across the attack (after it has read every byte; freed memory handed back to
the OS first), whether it stayed up, rounds completed, and the final accuracy; per attack, its RSS and accuracy
beside the un-attacked run's. The harness is the flood tests' (tests/integration/test_hostile_flood.py).

Targets (issue 10): the coordinator stays up, RSS within 32 MiB of the un-attacked run, every round completes,
final accuracy within 1 point of the un-attacked run. Prints one JSON object on stdout; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

# The broker launcher and the flood harness are test tooling (tests/), not part of the installed package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

ATTACKS = ("early_updates", "partial_transfers", "fake_statuses")
MiB = 1024 * 1024
RSS_TARGET_MIB = 32.0
ACCURACY_TARGET_POINTS = 1.0


def run_once(work: Path, attack: str | None, *, rounds: int, model_dir, digits, digits_split, test_folder) -> dict:
    from tests.brokers import mosquitto_broker
    from tests.integration.test_hostile_flood import Federation, flood, rss

    work.mkdir(parents=True, exist_ok=True)
    with mosquitto_broker() as broker:
        before = rss()
        run_id = f"bench-{attack or 'clean'}"
        # Enough training to move accuracy well off chance (10%), so "within 1 point" compares learning, not noise.
        fed = Federation(
            work, broker.url, model_dir, digits, digits_split, test_folder, rounds=rounds, run_id=run_id, local_epochs=3
        )
        started = time.monotonic()
        grown = flood(fed, attack) if attack else 0
        fed.join()
        try:
            report = fed.finish()
            error = None
        except AssertionError as exc:
            report, error = {"rounds": [], "final_accuracy": None}, str(exc)
        return {
            "attack": attack or "none",
            "coordinator_up": error is None,
            "error": error,
            "rss_growth_mib": round(grown / MiB, 1),
            "rss_after_setup_mib": round(before / MiB, 1),
            "rounds_completed": len(report["rounds"]),
            "rounds_planned": rounds,
            "final_accuracy": report["final_accuracy"],
            "seconds": round(time.monotonic() - started, 1),
        }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=8, help="rounds per run (default: 8)")
    parser.add_argument("--attacks", default=",".join(ATTACKS), help=f"comma-separated, of: {', '.join(ATTACKS)}")
    args = parser.parse_args()
    attacks = [a for a in args.attacks.split(",") if a]
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)

    from flora.data.datasets import write_image_folder
    from flora.data.digits import load_digits_images
    from flora.data.partition import train_test_split
    from flora.modeling.tiny import write_tiny_clip

    with tempfile.TemporaryDirectory(prefix="flora-attacks-") as tmp:
        tmp = Path(tmp)
        model_dir = write_tiny_clip(tmp / "tiny-clip")
        digits = load_digits_images()
        digits_split = train_test_split(digits.labels, 0.2, seed=0)
        test_folder = write_image_folder(digits.subset(digits_split[1]), tmp / "test")
        common = dict(rounds=args.rounds, model_dir=model_dir, digits=digits, digits_split=digits_split)
        runs = []
        for attack in [None, *attacks]:
            print(f"run: {attack or 'no attack'}", file=sys.stderr, flush=True)
            runs.append(run_once(tmp / (attack or "clean"), attack, test_folder=test_folder, **common))
    clean = runs[0]
    verdicts = []
    for run in runs[1:]:
        accuracy_gap = (
            None
            if run["final_accuracy"] is None or clean["final_accuracy"] is None
            else round(100 * abs(run["final_accuracy"] - clean["final_accuracy"]), 2)
        )
        verdicts.append(
            {
                "attack": run["attack"],
                "coordinator_up": run["coordinator_up"],
                "rss_over_clean_mib": round(run["rss_growth_mib"] - clean["rss_growth_mib"], 1),
                "all_rounds_completed": run["rounds_completed"] == run["rounds_planned"],
                "accuracy_gap_points": accuracy_gap,
                "meets_targets": run["coordinator_up"]
                and run["rss_growth_mib"] - clean["rss_growth_mib"] <= RSS_TARGET_MIB
                and run["rounds_completed"] == run["rounds_planned"]
                and accuracy_gap is not None
                and accuracy_gap <= ACCURACY_TARGET_POINTS,
            }
        )
    print(json.dumps({"runs": runs, "verdicts": verdicts}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
