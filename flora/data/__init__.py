"""Local datasets, partitioners and CLIP preprocessing. Data never leaves the device."""
