"""maskpatch: correct PEFT prompt-learning results inside sentence-transformers and transformers.

PEFT prompt tuning, P-tuning and multitask prompt tuning prepend ``M`` virtual tokens, so a
model's token-level output has ``N + M`` positions while the caller's ``attention_mask`` still
has ``N``. ``maskpatch.apply(model, policy=...)`` repairs that at run time with forward hooks.

Importing maskpatch imports neither sentence-transformers nor peft and changes no model. It does
not import torch either: the public names are loaded on first use (PEP 562), so the start-up paths
(``maskpatch run`` and the ``maskpatch_auto.pth`` line, see :mod:`maskpatch.auto`) stay cheap.
"""

from __future__ import annotations

# Not typing.TYPE_CHECKING: importing typing would cost milliseconds at interpreter start.
TYPE_CHECKING = False

__version__ = "0.1.0"

#: Public name -> the module that defines it, imported on first access.
_EXPORTS: dict[str, str] = {
    "prepended_mask": ".adapters.generic",
    "output_mask": ".api",
    "apply": ".api",
    "is_patched": ".api",
    "patched": ".api",
    "remove": ".api",
    "AuditReport": ".auditing",
    "AuditSession": ".auditing",
    "Finding": ".auditing",
    "audit": ".auditing",
    "MaskConvention": ".conventions",
    "POLICIES": ".drift",
    "Policy": ".drift",
    "AdapterExistsError": ".errors",
    "AlreadyPatchedError": ".errors",
    "DriftError": ".errors",
    "DriftWarning": ".errors",
    "InvalidAdapterError": ".errors",
    "KnownLimitError": ".errors",
    "MaskpatchError": ".errors",
    "MaskpatchWarning": ".errors",
    "PolicyError": ".errors",
    "SidecarError": ".errors",
    "UnknownAdapterError": ".errors",
    "UnsupportedModelError": ".errors",
    "UnsupportedVersionError": ".errors",
    "PatchHandle": ".handle",
    "VirtualLayout": ".layout",
    "active_layout": ".layout",
    "Adapter": ".registry",
    "load_entry_points": ".registry",
    "register_adapter": ".registry",
    "registered_adapters": ".registry",
    "unregister_adapter": ".registry",
}

#: Modules that moved into subpackages: still reachable as ``maskpatch.<name>``, with a warning.
_MOVED: dict[str, str] = {"autoenable": ".auto.autoenable", "constants": ".auto.constants"}

__all__ = [
    "POLICIES",
    "Adapter",
    "AdapterExistsError",
    "AlreadyPatchedError",
    "AuditReport",
    "AuditSession",
    "DriftError",
    "DriftWarning",
    "Finding",
    "InvalidAdapterError",
    "KnownLimitError",
    "MaskConvention",
    "MaskpatchError",
    "MaskpatchWarning",
    "PatchHandle",
    "Policy",
    "PolicyError",
    "SidecarError",
    "UnknownAdapterError",
    "UnsupportedModelError",
    "UnsupportedVersionError",
    "VirtualLayout",
    "__version__",
    "active_layout",
    "apply",
    "audit",
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

if TYPE_CHECKING:
    from typing import Any

    from .adapters.generic import prepended_mask
    from .api import apply, is_patched, output_mask, patched, remove
    from .auditing import AuditReport, AuditSession, Finding, audit
    from .conventions import MaskConvention
    from .drift import POLICIES, Policy
    from .errors import (
        AdapterExistsError,
        AlreadyPatchedError,
        DriftError,
        DriftWarning,
        InvalidAdapterError,
        KnownLimitError,
        MaskpatchError,
        MaskpatchWarning,
        PolicyError,
        SidecarError,
        UnknownAdapterError,
        UnsupportedModelError,
        UnsupportedVersionError,
    )
    from .handle import PatchHandle
    from .layout import VirtualLayout, active_layout
    from .registry import Adapter, load_entry_points, register_adapter, registered_adapters, unregister_adapter


def __getattr__(name: str) -> Any:
    """Import the module that defines the public ``name`` on first access (PEP 562)."""
    import importlib

    module = _EXPORTS.get(name)
    if module is not None:
        _guard_loads()
        value = getattr(importlib.import_module(module, __name__), name)
        globals()[name] = value  # later lookups no longer reach __getattr__
        return value
    moved = _MOVED.get(name)
    if moved is not None:
        import warnings

        warnings.warn(
            f"maskpatch.{name} moved to maskpatch{moved}; import it from there",
            DeprecationWarning,
            stacklevel=2,
        )
        return importlib.import_module(moved, __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _guard_loads() -> None:
    """Once maskpatch is used, loading an adapter saved under a policy into a model not patched with it warns.

    Not at ``import maskpatch``: that runs at interpreter start under auto-enable, which must not
    import torch or wrapt (auto-enable guards loads itself). See :mod:`maskpatch.provenance`.
    """
    global _guarded
    if not _guarded:
        _guarded = True
        from . import provenance

        provenance.guard_loads()


_guarded = False


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
