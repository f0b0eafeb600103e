"""The one error hierarchy of maskpatch.

Every exception maskpatch raises derives from :class:`MaskpatchError` and from the builtin a
caller would already catch for that kind of failure (``ValueError`` for bad arguments,
``TypeError`` for an unsupported object, ``RuntimeError`` for a state found at run time).
"""

from __future__ import annotations

__all__ = [
    "AlreadyPatchedError",
    "DriftError",
    "MaskpatchError",
    "MaskpatchWarning",
    "PolicyError",
    "SidecarError",
    "UnsupportedModelError",
    "UnsupportedVersionError",
]


class MaskpatchError(Exception):
    """Base class of every error maskpatch raises."""


class PolicyError(MaskpatchError, ValueError):
    """A repair policy or option that maskpatch does not know."""


class UnsupportedModelError(MaskpatchError, TypeError):
    """No registered adapter knows how to patch the object given."""


class UnsupportedVersionError(MaskpatchError, RuntimeError):
    """An installed library is outside the version range an adapter was tested with."""


class AlreadyPatchedError(MaskpatchError, RuntimeError):
    """The model is already patched, with options that differ from the ones asked for."""


class DriftError(MaskpatchError, RuntimeError):
    """A token-level output is longer than its mask by an amount maskpatch cannot explain.

    maskpatch repairs an excess of exactly the active adapter's ``num_virtual_tokens``; any other
    non-zero excess is reported with this error instead of being repaired silently.
    """


class SidecarError(MaskpatchError, ValueError):
    """A ``maskpatch.json`` beside an adapter that this version cannot read (see :mod:`maskpatch.provenance`)."""


class MaskpatchWarning(UserWarning):
    """Warnings about misuse that maskpatch tolerates (e.g. a second ``apply``)."""
