"""The one error hierarchy of maskpatch.

Every exception maskpatch raises derives from :class:`MaskpatchError` and from the builtin a
caller would already catch for that kind of failure (``ValueError`` for bad arguments,
``TypeError`` for an unsupported object, ``RuntimeError`` for a state found at run time).
"""

from __future__ import annotations

__all__ = [
    "AdapterExistsError",
    "AlreadyPatchedError",
    "DriftError",
    "DriftWarning",
    "InvalidAdapterError",
    "KnownLimitError",
    "MaskpatchError",
    "MaskpatchWarning",
    "PolicyError",
    "SidecarError",
    "UnknownAdapterError",
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


class KnownLimitError(MaskpatchError, RuntimeError):
    """A combination maskpatch cannot make right (a known limit), raised instead of a warning under ``strict``.

    The message names the case and what to do; without ``strict`` the same message is a
    :class:`MaskpatchWarning`, once per install.
    """


class InvalidAdapterError(MaskpatchError, TypeError):
    """An object given as an adapter lacks what :class:`maskpatch.plugin.Adapter` requires."""


class AdapterExistsError(MaskpatchError, ValueError):
    """An adapter of the same name is registered already (``register_adapter(..., replace=True)`` replaces it)."""


class UnknownAdapterError(MaskpatchError, KeyError):
    """No adapter of that name is registered."""

    def __str__(self) -> str:
        # KeyError would quote the message as the repr of a key; it is a sentence here.
        return str(self.args[0]) if self.args else ""


class SidecarError(MaskpatchError, ValueError):
    """A ``maskpatch.json`` beside an adapter that this version cannot read (see :mod:`maskpatch.provenance`)."""


class MaskpatchWarning(UserWarning):
    """Warnings about misuse that maskpatch tolerates (e.g. a second ``apply``), and known limits.

    A known limit (:mod:`maskpatch.limits`) is a combination maskpatch cannot make right; its
    warning names the case and what to do, once per install.
    """


class DriftWarning(MaskpatchWarning):
    """Audit mode found a token-level output and its mask that disagree (issued once per site).

    :func:`maskpatch.audit` only observes: nothing was repaired. The message names the module, both
    lengths, the active adapter and its ``M``, and what each policy would do.
    """
