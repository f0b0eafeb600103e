"""Which attribute of sentence-transformers' ``Transformer`` holds the Hugging Face model.

``auto_model`` up to 5.3, ``model`` from 5.4 (where ``auto_model`` stays as a deprecated alias).
Learned from the module's own submodules, so a model pickled under one release and loaded
under another is read right too.
"""

from __future__ import annotations

from torch import nn

from ..errors import UnsupportedVersionError
from .versions import installed_version

__all__ = ["INNER_NAMES", "inner_model", "inner_name"]

#: The attribute names, newest first.
INNER_NAMES = ("model", "auto_model")


def inner_name(transformer: nn.Module) -> str:
    """Return the name under which ``transformer`` (an ST ``Transformer``) keeps its model.

    Raises :class:`UnsupportedVersionError` when it has neither ``model`` nor ``auto_model``
    as a submodule: maskpatch would not see the PEFT model inside, so it refuses to guess.
    """
    for name in INNER_NAMES:
        if isinstance(transformer._modules.get(name), nn.Module):
            return name
    raise UnsupportedVersionError(
        f"expected sentence-transformers' {type(transformer).__name__} to hold its model as a submodule named "
        f"{' or '.join(repr(n) for n in INNER_NAMES)}, but found submodules {sorted(transformer._modules)} "
        f"(sentence-transformers {installed_version('sentence-transformers')})"
    )


def inner_model(transformer: nn.Module) -> nn.Module | None:
    """Return the model inside ``transformer``, or None when it holds none under a known name (never raises)."""
    for name in INNER_NAMES:
        found = transformer._modules.get(name)
        if isinstance(found, nn.Module):
            return found
    return None
