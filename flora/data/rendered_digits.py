"""Digits rendered from a font, made on this machine: a related but different domain from handwritten digits.

Pretraining on these gives the tiny CLIP a starting point that is not random (flora/modeling/pretrain.py), as
real CLIP weights are for the paper's experiments, without a download. Each image is one digit drawn with
Pillow's built-in font (ImageFont.load_default(size), the same on every machine) at a random size, rotation,
shear, stroke width and position, then blurred, brought to scikit-learn's 8x8 grid of 17 grey levels, and
noised. So the domain is close to sklearn's digits (the federated task) but typeset, not handwritten.
"""

from __future__ import annotations

import numpy as np

from flora.data.datasets import LabeledImages
from flora.data.digits import DIGIT_NAMES

CANVAS = 64  # drawn large, then reduced to 8x8 as the scanner of sklearn's digits did


def render_digit(digit: int, rng: np.random.Generator):
    from PIL import Image, ImageDraw, ImageFilter, ImageFont

    size = int(rng.integers(34, 58))
    font = ImageFont.load_default(size)
    canvas = Image.new("L", (CANVAS, CANVAS), 0)
    draw = ImageDraw.Draw(canvas)
    stroke = int(rng.integers(1, 5))
    left, top, right, bottom = draw.textbbox((0, 0), str(digit), font=font, stroke_width=stroke)
    x = (CANVAS - (right - left)) / 2 - left + rng.normal(0, 3)
    y = (CANVAS - (bottom - top)) / 2 - top + rng.normal(0, 3)
    draw.text((x, y), str(digit), fill=255, font=font, stroke_width=stroke, stroke_fill=255)
    shear = rng.normal(0, 0.15)
    canvas = canvas.transform(canvas.size, Image.Transform.AFFINE, (1, shear, -shear * CANVAS / 2, 0, 1, 0))
    canvas = canvas.rotate(float(rng.normal(0, 10)), resample=Image.Resampling.BILINEAR)
    ink = canvas.crop(canvas.getbbox() or (0, 0, CANVAS, CANVAS))
    # Handwritten digits fill the scanner's frame in height: scale the glyph to most of it, keep its aspect.
    height = int(CANVAS * rng.uniform(0.8, 1.0))
    width = max(1, min(CANVAS, round(ink.width * height / max(ink.height, 1) * rng.uniform(0.9, 1.4))))
    ink = ink.resize((width, height), Image.Resampling.BILINEAR)
    canvas = Image.new("L", (CANVAS, CANVAS), 0)
    canvas.paste(ink, ((CANVAS - width) // 2 + int(rng.integers(-3, 4)), (CANVAS - height) // 2))
    canvas = canvas.filter(ImageFilter.GaussianBlur(float(rng.uniform(1.0, 3.0))))
    small = np.asarray(canvas.resize((8, 8), Image.Resampling.BOX), dtype=np.float64)
    small = small / max(small.max(), 1.0) * 16 + rng.normal(0, float(rng.uniform(0, 1.5)), small.shape)
    levels = np.clip(np.rint(small), 0, 16)  # sklearn's digits count 0..16 pixels per 4x4 block
    pixels = (levels * (255.0 / 16.0)).astype(np.uint8)
    return Image.fromarray(pixels, mode="L").convert("RGB")


def rendered_digits(per_class: int, *, seed: int = 0) -> LabeledImages:
    """`per_class` rendered images of each digit 0-9, seeded (same seed, same images)."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(10, dtype=np.int64), per_class)
    images = [render_digit(int(d), rng) for d in labels]
    return LabeledImages(images, labels, list(DIGIT_NAMES))
