"""One LoRA training step on a tiny random CLIP: the final check of deploy/jetson/install.py.

    /opt/flora/venv/bin/python deploy/jetson/check_training.py --device cuda --4bit

Importing packages proves little: transformers disables PyTorch below the version it requires and then fails only
when CLIPModel is used, and a bitsandbytes built for server ARM imports fine and fails at its first kernel on a
Jetson. So this writes a tiny CLIP (random weights) with save_pretrained, loads it back with from_pretrained (the
path `flora client` takes), attaches LoRA with peft to the text tower and runs one optimizer step on the device;
with --4bit, one more step on a bitsandbytes NF4 base prepared as the client prepares it. Needs no network.

Prints one JSON line: {"ok": ..., "versions": {...}, "float": {...}, "4bit": {...}}; each step reports "ok" and
either its loss or its error. Exit status 0 when the full-precision step ran (the 4-bit result is reported, the
installer decides what to do with it), 1 otherwise.

Runs in the installed venv (Python >= 3.10); the installer itself never imports it.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import sys
import tempfile
import traceback

# Small enough to run in a second anywhere; the module names are CLIP's (text_model.encoder.layers.N.self_attn...).
TINY_TEXT = {
    "vocab_size": 99,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "max_position_embeddings": 16,
    "pad_token_id": 1,
    "bos_token_id": 0,
    "eos_token_id": 2,
}
# Linear layers of 64 inputs: bitsandbytes quantizes in blocks of 64.
TINY_VISION = {
    "image_size": 32,
    "patch_size": 8,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
}
# The default recipe's targets (flora/modeling/families/base.py: TEXT_OUT_PROJ) plus the other attention projections.
TEXT_TARGETS = r".*text_model\.encoder\.layers\.\d+\.self_attn\.(q_proj|v_proj|out_proj)"
PACKAGES = ("torch", "transformers", "peft", "accelerate", "bitsandbytes", "numpy")


def versions() -> dict:
    found = {}
    for name in PACKAGES:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    return found


def write_tiny_clip(path: str) -> None:
    import torch
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(0)
    config = CLIPConfig(text_config=TINY_TEXT, vision_config=TINY_VISION, projection_dim=16)
    CLIPModel(config).save_pretrained(path)


def train_step(path: str, device: str, four_bit: bool) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import CLIPModel

    kwargs = {}
    if four_bit:
        from transformers import BitsAndBytesConfig

        # As flora.modeling.loading.quantization_config("4bit") builds it.
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float16,
        )
        kwargs["device_map"] = device
    model = CLIPModel.from_pretrained(path, **kwargs)
    if four_bit:
        from peft import prepare_model_for_kbit_training

        if not getattr(model, "is_loaded_in_4bit", False):
            raise RuntimeError("from_pretrained did not quantize the model to 4 bits")
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    else:
        model.to(device)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=TEXT_TARGETS))
    model.train()
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    if not trainable or not all("lora_" in name for name in trainable):
        raise RuntimeError(f"expected only LoRA parameters to train, got {sorted(trainable)[:4]}")
    before = {name: p.detach().clone() for name, p in trainable.items()}
    optimizer = torch.optim.AdamW(trainable.values(), lr=1e-2)
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, TINY_TEXT["vocab_size"], (4, 8), generator=generator).to(device)
    pixel_values = torch.randn(4, 3, 32, 32, generator=generator).to(device)
    loss = model(input_ids=input_ids, pixel_values=pixel_values, return_loss=True).loss
    loss.backward()
    optimizer.step()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    loss = loss.detach()
    if not bool(torch.isfinite(loss)):
        raise RuntimeError(f"the loss is not finite: {float(loss)}")
    changed = sum(not torch.equal(before[name], p.detach()) for name, p in trainable.items())
    if changed == 0:
        raise RuntimeError("the optimizer step left every LoRA parameter unchanged")
    return {
        "ok": True,
        "loss": round(float(loss), 4),
        "lora_tensors": len(trainable),
        "updated": changed,
        "device": str(next(iter(trainable.values())).device),
    }


def attempt(function, *args) -> dict:
    try:
        return function(*args)
    except Exception as exc:  # reported as data: the installer turns it into advice
        lines = traceback.format_exception_only(type(exc), exc)
        return {"ok": False, "error": "".join(lines).strip().splitlines()[-1][:2000]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    parser.add_argument("--4bit", dest="four_bit", action="store_true", help="also train on a bitsandbytes NF4 base")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a local directory only: never the network
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    result = {"ok": False, "versions": versions(), "device": args.device}
    with tempfile.TemporaryDirectory(prefix="flora-check-") as path:
        written = attempt(lambda: write_tiny_clip(path) or {"ok": True})
        if not written["ok"]:
            result["float"] = written
        else:
            result["float"] = attempt(train_step, path, args.device, False)
            if args.four_bit:
                result["4bit"] = attempt(train_step, path, args.device, True)
    result["ok"] = result["float"]["ok"]
    print(json.dumps(result), flush=True)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
