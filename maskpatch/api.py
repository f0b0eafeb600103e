"""The public entry points: ``apply``, ``patched``, ``is_patched`` and ``remove``."""

from __future__ import annotations

import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

from .adapters.generic import PrependedTokensAdapter, check_same_count, validate_count
from .drift import Policy, validate_policy
from .errors import AlreadyPatchedError, MaskpatchWarning, UnsupportedModelError
from .handle import PatchHandle, find_record, install, remove_hooks
from .hooks import InstallRecord
from .registry import check_requirements, find_adapter

__all__ = ["apply", "is_patched", "patched", "remove"]

# One process-wide lock orders installs and removals; it lives here, never on a model, so
# patched models stay picklable.
_LOCK = threading.RLock()


def apply(
    model: nn.Module, *, policy: Policy = "extend", check_versions: bool = True, prepended_tokens: int | None = None
) -> PatchHandle:
    """Patch ``model`` so its token-level outputs and masks line up again; return the handle.

    ``model`` is what the user holds: a SentenceTransformer (or another sentence-transformers
    model class), one of its modules, or a model another registered adapter handles. ``policy``
    is ``"extend"`` (the default), ``"ignore"`` or ``"strip"``. A second ``apply`` on a patched
    model installs nothing: it warns and returns the existing install's handle, and raises
    :class:`AlreadyPatchedError` if it asks for another policy. ``handle.remove()`` undoes the
    install exactly. Library versions outside an adapter's tested range raise
    :class:`UnsupportedVersionError` unless ``check_versions`` is false.

    ``prepended_tokens=M`` patches a module that prepends ``M`` tokens by itself, without PEFT
    (see :mod:`maskpatch.adapters.generic` and :func:`maskpatch.prepended_mask`).
    """
    policy = validate_policy(policy)
    _require_module(model)
    if prepended_tokens is not None:
        validate_count(prepended_tokens)
    with _LOCK:
        record = find_record(model)
        if record is None:
            return _install(model, policy, pinned=True, check_versions=check_versions, prepended=prepended_tokens)
        _require_same_policy(model, record, policy)
        check_same_count(model, prepended_tokens)
        warnings.warn(
            f"{type(model).__name__} is already patched by maskpatch (policy {record.policy!r}); "
            "returning the existing handle instead of patching twice",
            MaskpatchWarning,
            stacklevel=2,
        )
        record.pinned = True
        return PatchHandle(model, record)


@contextmanager
def patched(
    model: nn.Module, *, policy: Policy = "extend", check_versions: bool = True, prepended_tokens: int | None = None
) -> Iterator[PatchHandle]:
    """Patch ``model`` for the body of a ``with`` block; undo on exit, also when the body raises.

    Blocks nest, on one thread or several: a block entered on a model that is already patched
    with the same policy joins that install, and the install is removed when the last block that
    shares it exits (never when it was made by an explicit :func:`apply`). ``prepended_tokens`` is
    as for :func:`apply`.
    """
    policy = validate_policy(policy)
    _require_module(model)
    if prepended_tokens is not None:
        validate_count(prepended_tokens)
    with _LOCK:
        record = find_record(model)
        if record is None:
            handle = _install(model, policy, pinned=False, check_versions=check_versions, prepended=prepended_tokens)
        else:
            _require_same_policy(model, record, policy)
            check_same_count(model, prepended_tokens)
            handle = PatchHandle(model, record)
        handle._record.contexts += 1
    try:
        yield handle
    finally:
        with _LOCK:
            handle._record.contexts -= 1
            if handle._record.contexts == 0 and not handle._record.pinned:
                handle.remove()


def is_patched(model: nn.Module) -> bool:
    """Return whether any module of ``model`` carries a maskpatch hook."""
    return isinstance(model, nn.Module) and find_record(model) is not None


def remove(model: nn.Module) -> bool:
    """Remove every maskpatch hook from ``model``; return whether there was any.

    This is the way to unpatch a copy (``pickle``, ``copy.deepcopy``, ``torch.save``) of a patched
    model, whose handle stayed with the original.
    """
    _require_module(model)
    with _LOCK:
        return remove_hooks(model) > 0


def _install(
    model: nn.Module, policy: Policy, *, pinned: bool, check_versions: bool, prepended: int | None = None
) -> PatchHandle:
    # A module that prepends tokens by itself cannot be recognised: the stated count selects the generic path.
    adapter = find_adapter(model) if prepended is None else PrependedTokensAdapter(prepended)
    if check_versions:
        check_requirements(adapter)
    record = InstallRecord(policy, adapter.name, pinned=pinned)
    install(adapter.plan(model, record))
    return PatchHandle(model, record)


def _require_module(model: object) -> None:
    if not isinstance(model, nn.Module):
        raise UnsupportedModelError(
            f"expected a torch.nn.Module (a SentenceTransformer, one of its modules or a PeftModel), "
            f"but got {type(model).__module__}.{type(model).__qualname__}"
        )


def _require_same_policy(model: nn.Module, record: InstallRecord, policy: Policy) -> None:
    if record.policy != policy:
        raise AlreadyPatchedError(
            f"{type(model).__name__} is already patched with policy {record.policy!r}, but policy "
            f"{policy!r} was asked for; remove the first install (handle.remove() or "
            "maskpatch.remove(model)) before patching with another policy"
        )
