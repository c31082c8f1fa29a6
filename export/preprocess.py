"""Image preprocessing in NumPy and Pillow, read from the processor file `save_pretrained` wrote.

A device running `flora infer` has no transformers, so the steps of transformers' image processors
(CLIPImageProcessorPil, SiglipImageProcessorPil) are reimplemented here in the same order and with the same arithmetic:
convert to RGB (transparency composited onto white), resize the shortest edge (Pillow, bicubic),
center crop (zero padding if the image is smaller), rescale in float64 then cast to float32,
normalise in float32, channels first. Keys a saved config leaves out take the model family's
defaults (CLIP: shortest edge + center crop; SigLIP: a square resize, no crop). Done this way
the result matches transformers bit for bit on the images we test; tests/test_infer_preprocess.py holds it to that.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from flora.errors import ConfigError
from flora.modeling.families import CLIP, ModelFamily, family_for, get_family

OPENAI_CLIP_MEAN = tuple(CLIP.preprocessing_defaults["image_mean"])
OPENAI_CLIP_STD = tuple(CLIP.preprocessing_defaults["image_std"])
PIL_BICUBIC = 3


@dataclass(frozen=True)
class ImagePreprocessor:
    resize_shortest_edge: int | None = 224  # None: resize to (resize_height, resize_width) instead
    resize_height: int | None = None
    resize_width: int | None = None
    resample: int = PIL_BICUBIC
    do_resize: bool = True
    crop_height: int = 224
    crop_width: int = 224
    do_center_crop: bool = True
    rescale_factor: float = 1 / 255
    do_rescale: bool = True
    image_mean: tuple[float, ...] = OPENAI_CLIP_MEAN
    image_std: tuple[float, ...] = OPENAI_CLIP_STD
    do_normalize: bool = True

    @classmethod
    def from_dir(cls, model_dir: str | Path, family: ModelFamily | str | None = None) -> ImagePreprocessor:
        """Read processor_config.json (transformers 5) or preprocessor_config.json (older checkpoints).

        `family` supplies defaults for missing keys: by default the checkpoint's (its config.json), else CLIP's.
        """
        model_dir = Path(model_dir)
        if isinstance(family, str):
            family = get_family(family)
        elif family is None:
            family = family_for(model_dir) if (model_dir / "config.json").is_file() else CLIP
        combined, legacy = model_dir / "processor_config.json", model_dir / "preprocessor_config.json"
        if combined.is_file() and "image_processor" in (data := json.loads(combined.read_text())):
            return cls.from_config(data["image_processor"], family)
        if legacy.is_file():
            return cls.from_config(json.loads(legacy.read_text()), family)
        raise ConfigError(
            f"{model_dir} has no image processor settings (processor_config.json or preprocessor_config.json); "
            "point --model at a directory written by `flora export`, which saves them beside the ONNX files"
        )

    @classmethod
    def from_config(cls, cfg: dict[str, Any], family: ModelFamily = CLIP) -> ImagePreprocessor:
        cfg = {**family.preprocessing_defaults, **{k: v for k, v in cfg.items() if v is not None}}
        size = cfg["size"]
        if isinstance(size, dict) and {"height", "width"} <= set(size):
            crop = cfg.get("crop_size") or {"height": size["height"], "width": size["width"]}
        else:
            crop = cfg.get("crop_size") or {"height": 224, "width": 224}
        if isinstance(size, int):  # legacy configs: an int means the shortest edge, as transformers reads it
            size = {"shortest_edge": size}
        if isinstance(crop, int):
            crop = {"height": crop, "width": crop}
        if "shortest_edge" in size and "longest_edge" not in size:
            resize = {"resize_shortest_edge": int(size["shortest_edge"])}
        elif {"height", "width"} <= set(size):
            resize = {"resize_shortest_edge": None, "resize_height": size["height"], "resize_width": size["width"]}
        else:
            raise ConfigError(f"unsupported image processor size {size!r}: expected shortest_edge or height/width")
        mean, std = cfg["image_mean"], cfg["image_std"]
        return cls(
            **resize,
            resample=int(cfg.get("resample", PIL_BICUBIC)),
            do_resize=bool(cfg.get("do_resize", True)),
            crop_height=int(crop["height"]),
            crop_width=int(crop["width"]),
            do_center_crop=bool(cfg.get("do_center_crop", True)),
            rescale_factor=float(cfg.get("rescale_factor", 1 / 255)),
            do_rescale=bool(cfg.get("do_rescale", True)),
            image_mean=tuple(mean) if isinstance(mean, (list, tuple)) else (mean,) * 3,
            image_std=tuple(std) if isinstance(std, (list, tuple)) else (std,) * 3,
            do_normalize=bool(cfg.get("do_normalize", True)),
        )

    def __call__(self, images: Sequence[Any]) -> np.ndarray:
        """PIL images -> float32 pixel_values [N, 3, H, W]. Every output must share H and W."""
        if not images:
            raise ValueError("no images to preprocess")
        return np.stack([self.one(image) for image in images])

    def one(self, image: Any) -> np.ndarray:
        pixels = np.asarray(self.resize(to_rgb(image)))  # HWC uint8
        if self.do_center_crop:
            pixels = center_crop(pixels, self.crop_height, self.crop_width)
        if self.do_rescale:
            pixels = (pixels.astype(np.float64) * self.rescale_factor).astype(np.float32)
        if self.do_normalize:
            pixels = pixels.astype(np.float32, copy=False)
            mean = np.asarray(self.image_mean, dtype=np.float32)
            std = np.asarray(self.image_std, dtype=np.float32)
            pixels = (pixels - mean) / std
        return np.ascontiguousarray(pixels.transpose(2, 0, 1), dtype=np.float32)

    def resize(self, image: Any) -> Any:
        if not self.do_resize:
            return image
        width, height = image.size
        if self.resize_shortest_edge is None:
            new_height, new_width = self.resize_height, self.resize_width
        else:
            # transformers' get_resize_output_image_size(default_to_square=False): the long side is
            # truncated with int(), not rounded; keep that or outputs drift by a pixel column.
            short, long = (width, height) if width <= height else (height, width)
            new_short, new_long = self.resize_shortest_edge, int(self.resize_shortest_edge * long / short)
            new_height, new_width = (new_long, new_short) if width <= height else (new_short, new_long)
        return image.resize((new_width, new_height), resample=self.resample)


def to_rgb(image: Any) -> Any:
    """RGB, with any transparency composited onto white (what transformers' convert_to_rgb does)."""
    from PIL import Image

    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def center_crop(pixels: np.ndarray, height: int, width: int) -> np.ndarray:
    """Center crop an HWC array; pad with zeros first if it is smaller than the crop (as transformers does)."""
    orig_h, orig_w = pixels.shape[:2]
    top, left = (orig_h - height) // 2, (orig_w - width) // 2
    if top >= 0 and left >= 0:
        return pixels[top : top + height, left : left + width]
    new_h, new_w = max(height, orig_h), max(width, orig_w)
    pad_top, pad_left = -(-(new_h - orig_h) // 2), -(-(new_w - orig_w) // 2)  # ceil division
    padded = np.zeros((new_h, new_w, *pixels.shape[2:]), dtype=pixels.dtype)
    padded[pad_top : pad_top + orig_h, pad_left : pad_left + orig_w] = pixels
    top, left = top + pad_top, left + pad_left
    return padded[max(0, top) : min(new_h, top + height), max(0, left) : min(new_w, left + width)]
