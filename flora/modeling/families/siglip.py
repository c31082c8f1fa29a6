"""SigLIP (Zhai et al., 2023): logits = exp(logit_scale) * cosine + logit_bias, trained with a sigmoid loss.

Differences from CLIP that the toolkit must respect, all declared here:
- the text tower pools the *last* position, so prompts are always padded to the tower's full length
  (`text_padding = "max_length"`) and, as SigLIP was trained, without an attention mask;
- there is no visual_projection: the image head (attention pooling) is inside vision_model;
- every image-text pair is an independent binary problem (sigmoid loss), with a learnt bias;
- preprocessing resizes straight to a square (no center crop) and normalises with mean = std = 0.5.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

from flora.modeling.families.base import ModelFamily, register_family

# The tiny tokenizer's words: the demo's and the tests' prompts; anything else maps to <unk>.
_TINY_WORDS = ["a", "photo", "of", "the", "digit", "number", "picture", "an", "image", "this", "is"]
_TINY_WORDS += ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "cat", "dog", "car"]
_TINY_WORDS += ["bird", *"0123456789"]


class SiglipFamily(ModelFamily):
    name = "siglip"
    model_types = ("siglip",)
    model_class_name = "SiglipModel"
    image_path_modules = ("vision_model",)  # its pooling head is vision_model.head
    text_input_names = ("input_ids",)
    text_padding = "max_length"
    # transformers' SiglipImageProcessor defaults: a plain resize to 224x224, mean = std = 0.5.
    preprocessing_defaults: ClassVar[dict] = {
        "size": {"height": 224, "width": 224},
        "do_center_crop": False,
        "resample": 3,  # bicubic
        "image_mean": (0.5, 0.5, 0.5),
        "image_std": (0.5, 0.5, 0.5),
    }

    def logit_bias(self, model):
        return model.logit_bias.float()

    def loss(self, image_embeds, text_embeds, targets, scale, bias=None):
        """The sigmoid pairwise loss: -1/|images| * sum_ij log sigmoid(z_ij * logit_ij).

        z_ij = +1 when text j is image i's text, else -1. With one distinct text per image this is
        Zhai et al. (2023), eq. 1; when images share a text, each (image, text) pair still counts once.
        """
        import torch.nn.functional as F

        logits = self.logits(image_embeds, text_embeds, scale, bias)  # [images, texts]
        signs = 2 * F.one_hot(targets, num_classes=text_embeds.shape[0]).float() - 1
        return -F.logsigmoid(signs * logits).sum() / image_embeds.shape[0]

    def write_tiny(self, out_dir: str | Path, *, seed: int = 0) -> Path:
        return write_tiny_siglip(out_dir, seed=seed)


def build_tiny_tokenizer(max_length: int):
    """A SigLIP-like fast tokenizer built offline: lower-cased words, punctuation dropped, `</s>` appended,
    `</s>` as padding (as google/siglip-* do). A `tokenizers` model, so it saves a tokenizer.json that
    the torch-free runtime reads; SigLIP's own SentencePiece tokenizer would need a trained spiece.model."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2}
    for word in _TINY_WORDS:
        vocab.setdefault(word, len(vocab))
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.Lowercase(), normalizers.Replace(".", " ")])
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation("removed")]
    )
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="</s>", pad_token="</s>", unk_token="<unk>", model_max_length=max_length
    )


def write_tiny_siglip(
    out_dir: str | Path,
    *,
    hidden_size: int = 64,
    layers: int = 2,
    heads: int = 4,
    image_size: int = 32,
    patch_size: int = 8,
    max_length: int = 16,
    seed: int = 0,
) -> Path:
    """Create a tiny random SigLIP checkpoint directory (idempotent: an existing complete one is kept).

    hidden 64 for the same reason as write_tiny_clip: bitsandbytes quantizes in blocks of 64 values.
    """
    import torch
    from transformers import SiglipConfig, SiglipImageProcessorPil, SiglipModel, SiglipProcessor

    out = Path(out_dir)
    if (out / "config.json").is_file() and (out / "model.safetensors").is_file():
        return out
    tokenizer = build_tiny_tokenizer(max_length)
    tower = {
        "hidden_size": hidden_size,
        "intermediate_size": hidden_size * 2,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
    }
    text_config = {
        **tower,
        "vocab_size": len(tokenizer),
        "max_position_embeddings": max_length,
        "pad_token_id": tokenizer.pad_token_id,
        "eos_token_id": tokenizer.eos_token_id,
    }
    vision_config = {**tower, "image_size": image_size, "patch_size": patch_size}
    config = SiglipConfig(text_config=text_config, vision_config=vision_config)
    torch.manual_seed(seed)
    model = SiglipModel(config)
    with torch.no_grad():  # SigLIP's published initialisation (t' = log 10, b = -10), not torch.randn
        model.logit_scale.fill_(torch.log(torch.tensor(10.0)))
        model.logit_bias.fill_(-10.0)
    image_processor = SiglipImageProcessorPil(size={"height": image_size, "width": image_size})
    processor = SiglipProcessor(image_processor=image_processor, tokenizer=tokenizer)
    tmp = out.with_name(out.name + ".partial")
    model.save_pretrained(tmp)
    processor.save_pretrained(tmp)
    tmp.replace(out)  # a half-written checkpoint never carries the final name
    return out


SIGLIP = register_family(SiglipFamily())
