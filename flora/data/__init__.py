"""Local datasets, partitioners and preprocessing. Data never leaves the device.

Names are imported on first use.
"""

from flora.lazy_exports import lazy_exports

_EXPORTS = {
    "LabeledImages": "flora.data.datasets",
    "load_image_folder": "flora.data.datasets",
    "write_image_folder": "flora.data.datasets",
    "load_local_data": "flora.data.formats",
    "load_digits_images": "flora.data.digits",
    "partition": "flora.data.partition",
    "train_test_split": "flora.data.partition",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
