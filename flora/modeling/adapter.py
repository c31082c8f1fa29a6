"""Attach LoRA from a recipe, and read or write the adapter's tensors by their PEFT names.

Names are those of `adapter_model.safetensors` in a PEFT adapter directory (the adapter name
stripped), so what travels on the wire is exactly what `PeftModel.from_pretrained` loads.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import weakref
from pathlib import Path
from typing import Any

from flora.errors import ConfigError, ProtocolError, RejectReason
from flora.files import os_error_of, storage_error
from flora.modeling.recipes import LoraRecipe


def attach_lora(model: Any, recipe: LoraRecipe, *, seed: int = 0):
    """Wrap `model` in a PeftModel. A fixed seed gives every party the same initial A matrices.

    A recipe's `modules_to_save` must all exist, and be full precision: PEFT silently trains nothing for a name
    the model lacks, and a quantized module's copy cannot be trained."""
    import torch
    from peft import get_peft_model

    from flora.modeling.kbit import is_quantized

    modules = dict(model.named_modules())
    absent = [name for name in recipe.modules_to_save if name not in modules]
    if absent:
        raise ConfigError(
            f"recipe {recipe.name!r} trains module(s) {absent} whole, which this {type(model).__name__} does not "
            "have; choose a recipe made for this model family (flora.modeling.recipes)"
        )
    if recipe.modules_to_save and is_quantized(model):
        raise ConfigError(
            f"recipe {recipe.name!r} trains whole modules, which a quantized base cannot: set quantization = "
            '"none" (LoRA recipes such as "paper" train on a 4-bit or 8-bit base)'
        )
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        peft_model = get_peft_model(model, recipe.to_lora_config())
    finally:
        torch.random.set_rng_state(state)
    return peft_model


def get_adapter_state(peft_model: Any) -> dict[str, Any]:
    """The adapter's tensors, detached fp32 CPU copies, keyed by PEFT names."""
    import torch

    state, _ = _adapter_tensors(peft_model)
    return {name: t.detach().to("cpu", torch.float32).clone() for name, t in sorted(state.items())}


def adapter_parameters(peft_model: Any) -> int:
    """How many values the adapter's tensors hold (what an update carries), without copying them."""
    return sum(t.numel() for t in _adapter_tensors(peft_model)[0].values())


# PEFT name -> the model's own parameter name, per model. PEFT's get/set_peft_model_state_dict walk the whole
# model's state dict and every module's prefixes on each call: time in the model's size, paid several times a
# round by every client and the coordinator, where the adapter is a few tensors. The names are found once,
# through PEFT itself, and each call then resolves them (a few attribute lookups each, no references held, so a
# released module is not kept alive and a replaced one is found anew).
_PARAMETER_NAMES: weakref.WeakKeyDictionary[Any, dict[str, str]] = weakref.WeakKeyDictionary()


def _adapter_tensors(peft_model: Any) -> tuple[dict[str, Any], bool]:
    """(PEFT name -> tensor, whether those tensors are the model's parameters themselves).

    False where some adapter tensor is not a parameter: the tensors are then PEFT's state dict, and only PEFT's
    own functions may load them."""
    names = _PARAMETER_NAMES.get(peft_model)
    if names is not None:
        try:
            return {peft_name: peft_model.get_parameter(name) for peft_name, name in names.items()}, True
        except AttributeError:  # a module on the path was replaced or removed: find the names again
            pass
    from peft import get_peft_model_state_dict

    state = get_peft_model_state_dict(peft_model)
    # PEFT's tensors share storage with the parameters they come from: the storage says which one.
    by_storage = {
        (p.data_ptr(), tuple(p.shape), p.stride()): name
        for name, p in peft_model.named_parameters(remove_duplicate=False)
    }
    names = {}
    for peft_name, t in state.items():
        name = by_storage.get((t.data_ptr(), tuple(t.shape), t.stride()))
        if name is None:  # not a parameter (a buffer, or a tensor PEFT derived): PEFT's own copy each time
            _PARAMETER_NAMES.pop(peft_model, None)
            return state, False
        names[peft_name] = name
    _PARAMETER_NAMES[peft_model] = names
    return {peft_name: peft_model.get_parameter(name) for peft_name, name in names.items()}, True


def lower_rank_of(expected: dict[str, Any], received: dict[str, Any]) -> int | None:
    """The one LoRA rank below the expected one that every A/B pair of `received` has, else None.

    Used where a strategy accepts clients training at a lower rank (shape rules: A is [r, in],
    B is [out, r], r the same for every module and at most the global rank).
    """
    ranks = set()
    for name, ref in expected.items():
        got = tuple(received[name].shape)
        if ".lora_A." in name and len(got) == 2 and got[1] == ref.shape[1] and 1 <= got[0] <= ref.shape[0]:
            ranks.add(got[0])
        elif ".lora_B." in name and len(got) == 2 and got[0] == ref.shape[0] and 1 <= got[1] <= ref.shape[1]:
            ranks.add(got[1])
        elif got != tuple(ref.shape):
            return None
    return ranks.pop() if len(ranks) == 1 else None


def check_adapter_tensors(
    expected: dict[str, Any], received: dict[str, Any], *, allow_lower_rank: bool = False
) -> None:
    """Raise ProtocolError unless `received` has exactly the names and shapes of `expected`
    (or, with `allow_lower_rank`, the same modules at one lower LoRA rank)."""
    missing = sorted(set(expected) - set(received))
    extra = sorted(set(received) - set(expected))
    if missing or extra:
        raise ProtocolError(
            RejectReason.TENSOR_NAMES,
            f"adapter tensors do not match the recipe: missing {missing[:3]}{'...' if len(missing) > 3 else ''}, "
            f"unexpected {extra[:3]}{'...' if len(extra) > 3 else ''}",
        )
    if allow_lower_rank and lower_rank_of(expected, received) is not None:
        return
    for name, ref in expected.items():
        if tuple(received[name].shape) != tuple(ref.shape):
            got_rank, want_rank = _rank_of(name, received[name].shape), _rank_of(name, ref.shape)
            if got_rank is not None and got_rank != want_rank and _same_but_rank(name, received[name].shape, ref.shape):
                # The shapes say which setting differs: name it, not the recipe (the recipe may well match).
                raise ProtocolError(
                    RejectReason.TENSOR_SHAPES,
                    f"LoRA rank {got_rank}, the run's rank is {want_rank} ({name}: shape "
                    f"{tuple(received[name].shape)}, expected {tuple(ref.shape)})",
                )
            raise ProtocolError(
                RejectReason.TENSOR_SHAPES,
                f"{name}: shape {tuple(received[name].shape)}, expected {tuple(ref.shape)} "
                "(client and coordinator must use the same recipe and base model)",
            )


def _rank_of(name: str, shape: Any) -> int | None:
    """The LoRA rank a factor's shape holds (A is [r, in], B is [out, r]); None for other tensors."""
    shape = tuple(shape)
    if len(shape) != 2:
        return None
    return shape[0] if ".lora_A." in name else shape[1] if ".lora_B." in name else None


def _same_but_rank(name: str, got: Any, want: Any) -> bool:
    got, want = tuple(got), tuple(want)
    return len(got) == len(want) == 2 and (got[1] == want[1] if ".lora_A." in name else got[0] == want[0])


def set_adapter_state(peft_model: Any, tensors: dict[str, Any]) -> None:
    """Load tensors into the adapter after checking names and shapes (never a partial load)."""
    import torch
    from peft import set_peft_model_state_dict

    live, are_parameters = _adapter_tensors(peft_model)
    check_adapter_tensors(live, tensors)
    if are_parameters:  # copy into each
        with torch.no_grad():
            for name, target in live.items():
                target.copy_(tensors[name])  # casts to the parameter's dtype and device, as load_state_dict does
        return
    result = set_peft_model_state_dict(peft_model, tensors)
    unexpected = getattr(result, "unexpected_keys", None)
    if unexpected:
        raise ProtocolError(RejectReason.TENSOR_NAMES, f"PEFT did not accept {unexpected[:3]}")


def save_adapter_dir(
    peft_model: Any, out_dir: str | Path, *, base_model: str | None = None, extra_json: dict[str, Any] | None = None
) -> Path:
    """Write a standard PEFT adapter directory atomically (write aside, then swap in).

    `extra_json` maps file names to JSON-able content written beside the adapter, inside the same swap
    (e.g. flora_training.json: the prompt the adapter was trained with).
    """
    out = Path(out_dir)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    except OSError as exc:
        raise storage_error(out, exc) from exc
    try:
        if base_model is not None:
            peft_model.peft_config["default"].base_model_name_or_path = base_model
        peft_model.save_pretrained(tmp)
        for name, content in (extra_json or {}).items():
            (tmp / name).write_text(json.dumps(content, indent=2, allow_nan=False), encoding="utf-8")
        _fsync_tree(tmp)
        old = out.with_name(f".{out.name}.old")
        if out.exists():
            if old.exists():
                shutil.rmtree(old)
            os.replace(out, old)
        os.replace(tmp, out)
        if old.exists():
            shutil.rmtree(old)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        cause = os_error_of(exc) if isinstance(exc, Exception) else None
        if cause is not None:
            raise storage_error(out, cause) from exc
        raise
    return out


def _fsync_tree(path: Path) -> None:
    for file in path.rglob("*"):
        if file.is_file():
            with open(file, "rb") as handle:
                os.fsync(handle.fileno())
