"""Installing hooks, finding them again, and the handle that undoes one install exactly."""

from __future__ import annotations

import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from types import TracebackType

from torch import nn

from .drift import Policy
from .hooks import LOCK, InstallRecord, MaskpatchHook

__all__ = ["LOCK", "HookSpec", "PatchHandle", "find_record", "install", "install_state", "iter_hooks", "remove_hooks"]

# The dicts torch keeps per hook kind, keyed by the same hook id.
_PRE_DICTS = ("_forward_pre_hooks", "_forward_pre_hooks_with_kwargs")
_POST_DICTS = ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called")


@dataclass(frozen=True)
class HookSpec:
    """One hook to register: ``hook`` on ``module``, a pre-hook when ``hook.pre``."""

    module: nn.Module
    hook: MaskpatchHook


# The install made on each module ``apply`` was called on, so that ``is_patched``, ``output_mask``
# and ``find_record`` on that module cost O(hooks), not a scan of every module. Weak both ways (the
# record refers to its root: a strong value would keep the model, its install and the class-level
# wrappers it holds alive forever). Plain module-level data, never on the model (which stays picklable).
_ROOTS: weakref.WeakKeyDictionary[nn.Module, weakref.ref[InstallRecord]] = weakref.WeakKeyDictionary()


def install(specs: Sequence[HookSpec]) -> None:
    """Register every hook of ``specs`` (all with ``with_kwargs=True``, honouring ``always_call``), or none of them.

    Each hook is registered through its record (:meth:`InstallRecord.register`), which keeps
    torch's removable handle, so that removal finds the hook wherever its module went since. The
    install is then known by its root module (``record.root``) without a scan.
    """
    records = list({id(spec.hook.record): spec.hook.record for spec in specs}.values())
    try:
        for spec in specs:
            spec.hook.record.register(spec.module, spec.hook)
    except BaseException:
        for record in records:
            _remove_install(record, None)
        raise
    with LOCK:
        for record in records:
            if record.root is not None:
                _ROOTS[record.root] = weakref.ref(record)


def iter_hooks(model: nn.Module) -> Iterator[tuple[nn.Module, int, MaskpatchHook]]:
    """Yield ``(module, hook id, hook)`` for every maskpatch hook in ``model``'s modules."""
    for module in model.modules():
        for hooks in (module._forward_pre_hooks, module._forward_hooks):
            for key, hook in list(hooks.items()):
                if isinstance(hook, MaskpatchHook):
                    yield module, key, hook


def find_record(model: nn.Module) -> InstallRecord | None:
    """Return the record of the install found in ``model``, or None when it is not patched.

    O(hooks) for the module an install was made on (its record is known, and one of its hooks
    still in place); a scan of ``model``'s modules otherwise (a part or a container of it, a copy
    made by ``pickle`` or ``deepcopy``, an unpatched model).
    """
    ref = _ROOTS.get(model)
    record = None if ref is None else ref()
    if record is not None and not record.removed and _any_site_live(record):
        return record
    return next((hook.record for _, _, hook in iter_hooks(model)), None)


def _any_site_live(record: InstallRecord) -> bool:
    for site in record.sites:
        hooks = site.hooks_dict_ref()
        if hooks is not None and site.id in hooks:
            return True
    return False


def remove_hooks(model: nn.Module, record: InstallRecord | None = None) -> int:
    """Remove the install of ``record`` (every install found in ``model`` if None), whole; return how many hooks.

    An install is removed whole: its hooks on modules outside ``model`` too (a model that shares a
    module with ``model``, a PeftModel swapped out of it since), never a part of one, so that no
    model is left half repaired. Callers hold :data:`LOCK`.
    """
    if record is None:
        records = list({id(hook.record): hook.record for _, _, hook in iter_hooks(model)}.values())
    else:
        records = [record]
    return sum(_remove_install(found, model) for found in records)


def _remove_install(record: InstallRecord, scope: nn.Module | None) -> int:
    """Remove every hook of ``record``: through its sites (O(hooks)); a copy has none, so it is found in ``scope``."""
    removed = 0
    copied = not record.sites
    for site in record.sites:
        hooks = site.hooks_dict_ref()
        if hooks is not None and site.id in hooks:
            removed += 1
        site.remove()
    if scope is not None and copied:
        for module, key, hook in list(iter_hooks(scope)):
            if hook.record is record:
                for name in _PRE_DICTS if hook.pre else _POST_DICTS:
                    getattr(module, name).pop(key, None)
                removed += 1
    ref = None if record.root is None else _ROOTS.get(record.root)
    if ref is not None and ref() is record:
        del _ROOTS[record.root]  # type: ignore[arg-type]
    record.release()
    if removed:
        from .provenance import untrack_unpatched  # imported here: provenance imports this module

        untrack_unpatched()
    return removed


def install_state(record: InstallRecord, scope: nn.Module) -> str:
    """Return ``"active"`` (every hook of ``record`` in place), ``"incomplete"`` or ``"removed"``."""
    if record.removed:
        return "removed"
    if not record.sites:  # a copy: its hooks are known only by scanning
        return "active" if any(hook.record is record for _, _, hook in iter_hooks(scope)) else "removed"
    present = [hooks is not None and site.id in hooks for site in record.sites for hooks in (site.hooks_dict_ref(),)]
    if all(present):
        return "active"
    return "incomplete" if any(present) else "removed"


class PatchHandle:
    """The handle of one install; :meth:`remove` undoes it exactly.

    ``remove()`` is idempotent, and the handle is a context manager that removes on exit. After
    removal no maskpatch hook, attribute or wrapper is left on the model.
    """

    def __init__(self, model: nn.Module, record: InstallRecord) -> None:
        self._model = model
        self._record = record

    @property
    def _scope(self) -> nn.Module:
        # The whole install when known (a handle obtained through a part of the model reaches the
        # rest too); on a copy, the model the handle was made for.
        return self._record.root if self._record.root is not None else self._model

    @property
    def policy(self) -> Policy:
        """The repair policy of this install."""
        return self._record.policy

    @property
    def adapter(self) -> str:
        """The name of the registered adapter that made this install."""
        return self._record.adapter

    @property
    def active(self) -> bool:
        """Whether every hook of this install is still in place (an install missing some is not active)."""
        return install_state(self._record, self._scope) == "active"

    def remove(self) -> None:
        """Remove every hook of this install; a second call does nothing."""
        with LOCK:
            remove_hooks(self._scope, self._record)

    def __enter__(self) -> PatchHandle:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.remove()

    def __repr__(self) -> str:
        state = install_state(self._record, self._scope)
        return f"<PatchHandle adapter={self.adapter!r} policy={self.policy!r} {state}>"
