"""Warn once per process about an upstream assumption that does not hold (and what is left unpatched)."""

from __future__ import annotations

import threading
import warnings

from ..errors import MaskpatchWarning

__all__ = ["warn_once"]

_SEEN: set[str] = set()
_LOCK = threading.Lock()


def warn_once(key: str, message: str) -> bool:
    """Emit ``message`` as a :class:`MaskpatchWarning` the first time ``key`` is seen; return whether it was emitted."""
    with _LOCK:
        if key in _SEEN:
            return False
        _SEEN.add(key)
    warnings.warn(message, MaskpatchWarning, stacklevel=3)
    return True
