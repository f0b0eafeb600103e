"""maskpatch: correct PEFT prompt-learning results inside sentence-transformers and transformers.

PEFT prompt tuning, P-tuning and multitask prompt tuning prepend ``M`` virtual tokens, so a
model's token-level output has ``N + M`` positions while the caller's ``attention_mask`` still
has ``N``. ``maskpatch.apply(model, policy=...)`` repairs that at run time with forward hooks.

Importing maskpatch imports neither sentence-transformers nor peft and changes no model.
"""

from __future__ import annotations

from . import provenance
from .adapters import register_builtin_adapters
from .adapters.generic import prepended_mask
from .adapters.peft import output_mask
from .api import apply, is_patched, patched, remove
from .conventions import MaskConvention
from .drift import POLICIES, Policy
from .errors import (
    AlreadyPatchedError,
    DriftError,
    MaskpatchError,
    MaskpatchWarning,
    PolicyError,
    SidecarError,
    UnsupportedModelError,
    UnsupportedVersionError,
)
from .handle import PatchHandle
from .layout import VirtualLayout, active_layout
from .registry import Adapter, load_entry_points, register_adapter, registered_adapters, unregister_adapter

__version__ = "0.1.0"

__all__ = [
    "POLICIES",
    "Adapter",
    "AlreadyPatchedError",
    "DriftError",
    "MaskConvention",
    "MaskpatchError",
    "MaskpatchWarning",
    "PatchHandle",
    "Policy",
    "PolicyError",
    "SidecarError",
    "UnsupportedModelError",
    "UnsupportedVersionError",
    "VirtualLayout",
    "__version__",
    "active_layout",
    "apply",
    "is_patched",
    "load_entry_points",
    "output_mask",
    "patched",
    "prepended_mask",
    "register_adapter",
    "registered_adapters",
    "remove",
    "unregister_adapter",
]

register_builtin_adapters()
# Adapters saved by a patched model record their policy; loading one unpatched warns (maskpatch.provenance).
provenance.guard_loads()
