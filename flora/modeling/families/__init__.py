"""Model families: what differs between CLIP, SigLIP, ... behind one interface (see base.py, docs/FAMILIES.md)."""

from flora.modeling.families.base import FAMILIES, ModelFamily, family_for, get_family, register_family
from flora.modeling.families.clip import CLIP, ClipFamily
from flora.modeling.families.siglip import SIGLIP, SiglipFamily, write_tiny_siglip

__all__ = [
    "CLIP",
    "FAMILIES",
    "SIGLIP",
    "ClipFamily",
    "ModelFamily",
    "SiglipFamily",
    "family_for",
    "get_family",
    "register_family",
    "write_tiny_siglip",
]
