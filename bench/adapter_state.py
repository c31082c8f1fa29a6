"""What reading and loading the adapter costs: flora.modeling.adapter against PEFT's own state-dict functions.

    python bench/adapter_state.py [--calls 200] [--vit-b32]

Every client reads the adapter once a round (its update) and loads it once (the global adapter), the coordinator
loads it to evaluate: at hundreds of short rounds, the per-call cost adds up. Prints JSON: milliseconds per
get + set call pair, side by side in one process, for each recipe on the tiny CLIP (and, with --vit-b32, the paper
recipe on a randomly initialised ViT-B/32-sized CLIP), PEFT's `get_peft_model_state_dict` (+ the same fp32 copy)
and `set_peft_model_state_dict` against `get_adapter_state` and `set_adapter_state`; and the ratio.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

RECIPES = ("paper", "both-towers", "linear-probe", "fedfft", "vision-head")


def _peft_get(model):
    from peft import get_peft_model_state_dict

    return {k: t.detach().to("cpu", torch.float32).clone() for k, t in get_peft_model_state_dict(model).items()}


def _peft_set(model, tensors):
    from peft import set_peft_model_state_dict

    set_peft_model_state_dict(model, tensors)


def _ms_per_pair(get, set_, model, calls: int) -> float:
    state = get(model)
    set_(model, state)  # warm: the toolkit's first call finds the names
    started = time.perf_counter()
    for _ in range(calls):
        set_(model, get(model))
    return (time.perf_counter() - started) / calls * 1000


def _measure(model_dir: str, recipe: str, calls: int) -> dict:
    from flora.modeling.adapter import attach_lora, get_adapter_state, set_adapter_state
    from flora.modeling.loading import load_clip
    from flora.modeling.recipes import get_recipe

    model = attach_lora(load_clip(model_dir).model, get_recipe(recipe))
    peft_ms = _ms_per_pair(_peft_get, _peft_set, model, calls)
    ours_ms = _ms_per_pair(get_adapter_state, set_adapter_state, model, calls)
    return {
        "recipe": recipe,
        "tensors": len(get_adapter_state(model)),
        "peft_ms": round(peft_ms, 3),
        "toolkit_ms": round(ours_ms, 3),
        "speedup": round(peft_ms / ours_ms, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--vit-b32", action="store_true", help="also the paper recipe on a ViT-B/32-sized CLIP")
    args = parser.parse_args()
    from flora.modeling.tiny import write_tiny_clip

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        tiny = f"{tmp}/tiny"
        write_tiny_clip(tiny, seed=0)
        rows = [{"model": "tiny", **_measure(tiny, recipe, args.calls)} for recipe in RECIPES]
        if args.vit_b32:
            from local_training import write_vit_b32

            vit = str(write_vit_b32(Path(tmp) / "vit-b32"))
            rows.append({"model": "vit-b32", **_measure(vit, "paper", max(args.calls // 10, 5))})
    print(json.dumps({"calls": args.calls, "threads": 1, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
