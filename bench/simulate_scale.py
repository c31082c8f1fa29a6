"""flora simulate's scale: 100 virtual clients x 50 rounds of the tiny model, beside 10 clients, in one run.

    PYTHONPATH=. .venv/bin/python bench/simulate_scale.py > simulate_scale.json
    PYTHONPATH=. .venv/bin/python bench/simulate_scale.py --clients 10,100 --rounds 50   # the defaults

Each variant is one grid cell (flora.app.simulate.cell.run_cell): the real coordinator and N real EdgeAgents over
the in-memory broker, the clients sharing one frozen base; the paper's recipe (LoRA r=2 on the text out_proj),
the tiny random CLIP, scikit-learn's digits split IID over the clients, 1 local epoch, batch 32, class-prompt
objective, evaluation on the validation split every round and on the test split once. Each variant runs in its
own fresh Python process, single-threaded (a shared 2-core machine), so each peak RSS is its own.

Reported per variant: `seconds` (the whole cell: loading, every round, the test), `seconds_per_round`,
`peak_rss_mb` (the process's high-water mark), `cpu_seconds` (user + system CPU time of the process: on a
shared machine the wall time also counts waiting for a core); and, side by side, the ratios of the largest fleet to the
smallest: `time_ratio` and `memory_ratio` (memory should stay flat: one base, adapters per round only).
Prints one JSON object on stdout.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path


def one(clients: int, rounds: int) -> dict:
    import torch

    from flora.app.simulate.cell import run_cell
    from flora.app.simulate.experiment import Cell, ExperimentConfig
    from flora.modeling.tiny import write_tiny_clip

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        exp = ExperimentConfig(out=Path(tmp), clients=clients, rounds=rounds, recipes=["paper"], splits=["iid"])
        model = write_tiny_clip(Path(tmp) / "tiny", seed=0)
        row = run_cell(exp, Cell("paper", "iid", "fedavg", "class-prompts", 0), str(model), Path(tmp) / "work")
    import resource

    keys = ("clients", "rounds", "seconds", "seconds_per_round", "peak_rss_mb", "test_accuracy", "bytes_per_round")
    usage = resource.getrusage(resource.RUSAGE_SELF)
    # CPU time beside wall time: on a shared machine the wall time also counts waiting for a core.
    return {**{k: row[k] for k in keys}, "cpu_seconds": usage.ru_utime + usage.ru_stime}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", default="10,100", help="fleet sizes, comma-separated (default: 10,100)")
    parser.add_argument("--rounds", type=int, default=50)
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)  # internal: run one variant in this process
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one(args.one, args.rounds)))
        return
    results = []
    for clients in [int(c) for c in args.clients.split(",")]:
        print(f"{clients} clients x {args.rounds} rounds ...", file=sys.stderr)
        out = subprocess.run(
            [sys.executable, __file__, "--one", str(clients), "--rounds", str(args.rounds)],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        results.append(json.loads(out.strip().splitlines()[-1]))
    small, large = results[0], results[-1]
    print(
        json.dumps(
            {
                "variants": results,
                "time_ratio": large["seconds"] / small["seconds"],
                "memory_ratio": large["peak_rss_mb"] / small["peak_rss_mb"],
                "torch_threads": 1,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
