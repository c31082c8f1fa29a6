"""Write a tiny, randomly initialised CLIP checkpoint to disk.

Tests and the demo need a model without network access. Rather than special-casing a toy
model, we write a real checkpoint directory (config, weights, tokenizer, image processor via
`save_pretrained`) and every consumer loads it back through the same `from_pretrained` path
that `openai/clip-vit-base-patch32` uses. Only this module knows the model is tiny.

Sizes: hidden 64 (not smaller) because bitsandbytes quantizes in blocks of 64 values, so a
4-bit layer needs input features that are a multiple of 64.
"""

from __future__ import annotations

from pathlib import Path

# The words the demo's prompts use get whole-word merges so prompts stay short (~8 tokens);
# anything else still tokenizes, byte by byte, as CLIP's byte-level BPE does.
_VOCAB_WORDS = [
    "a",
    "photo",
    "of",
    "the",
    "digit",
    "number",
    "picture",
    "an",
    "image",
    "this",
    "is",
    "zero",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
    "cat",
    "dog",
    "car",
    "bird",
]


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable-unicode table (the BPE alphabet)."""
    printable = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    codes = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in codes)))


def build_tiny_vocab(words: tuple[str, ...] = _VOCAB_WORDS) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A CLIP-format BPE vocabulary: every byte (alone and word-final), plus merges for `words`."""
    alphabet = list(_bytes_to_unicode().values())
    vocab: dict[str, int] = {}
    for symbol in alphabet:
        vocab[symbol] = len(vocab)
    for symbol in alphabet:
        vocab[symbol + "</w>"] = len(vocab)
    merges: list[tuple[str, str]] = []
    for word in words:
        pieces = list(word)
        pieces[-1] += "</w>"
        merged = pieces[0]
        for piece in pieces[1:]:
            if (merged, piece) not in merges:
                merges.append((merged, piece))
            merged += piece
            vocab.setdefault(merged, len(vocab))
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return vocab, merges


def write_tiny_clip(
    out_dir: str | Path,
    *,
    hidden_size: int = 64,
    layers: int = 2,
    heads: int = 4,
    image_size: int = 32,
    patch_size: int = 8,
    projection_dim: int = 64,
    seed: int = 0,
) -> Path:
    """Create the checkpoint directory (idempotent: an existing complete one is kept)."""
    import torch
    from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel, CLIPProcessor, CLIPTokenizer

    out = Path(out_dir)
    if (out / "config.json").is_file() and (out / "model.safetensors").is_file():
        return out
    vocab, merges = build_tiny_vocab()
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges)
    text_config = {
        "vocab_size": len(vocab),
        "hidden_size": hidden_size,
        "intermediate_size": hidden_size * 2,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "max_position_embeddings": 32,
        # The text tower pools at the first end-of-text token: its id must be the tokenizer's.
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    vision_config = {
        "hidden_size": hidden_size,
        "intermediate_size": hidden_size * 2,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "image_size": image_size,
        "patch_size": patch_size,
    }
    config = CLIPConfig(text_config=text_config, vision_config=vision_config, projection_dim=projection_dim)
    torch.manual_seed(seed)
    model = CLIPModel(config)
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )
    processor = CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)
    tmp = out.with_name(out.name + ".partial")
    model.save_pretrained(tmp)
    processor.save_pretrained(tmp)
    tmp.replace(out)  # a half-written checkpoint never carries the final name
    return out


# SigLIP's tiny checkpoint is written by its family module, beside its other SigLIP specifics.
from flora.modeling.families.siglip import write_tiny_siglip  # noqa: E402, F401
