"""scikit-learn's bundled handwritten digits (1,797 8x8 images, 10 classes): offline demo data."""

from __future__ import annotations

import numpy as np

from flora.data.datasets import LabeledImages

DIGIT_NAMES = ["0", "1", "2", "3", "4", "5", "6", "7", "8", "9"]
DIGIT_TEMPLATE = "a photo of the digit {label}."


def load_digits_images() -> LabeledImages:
    from PIL import Image
    from sklearn.datasets import load_digits

    bunch = load_digits()
    # Pixel values are 0..16; stretch to 0..255 and make RGB, as a camera image would be.
    pixels = (bunch.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
    images = [Image.fromarray(p, mode="L").convert("RGB") for p in pixels]
    return LabeledImages(images, bunch.target.astype(np.int64), list(DIGIT_NAMES))
