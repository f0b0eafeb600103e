"""Installing hooks, finding them again, and the handle that undoes one install exactly."""

from __future__ import annotations

import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from types import TracebackType

from torch import nn

from .drift import Policy
from .hooks import LOCK, InstallRecord, MaskpatchHook

__all__ = [
    "LOCK",
    "HookSpec",
    "PatchHandle",
    "covers",
    "find_record",
    "install",
    "install_state",
    "iter_hooks",
    "note_late_site",
    "own_install",
    "remove_hooks",
]

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

# The modules of each install's root tree when it was made: a part of the root among them was
# patched by that install (maskpatch.api decides a join from this, without a plan). Weak both ways.
# Keyed by ``id``, each with a weak reference that tells a module from a later one at the same address.
_COVERED: weakref.WeakKeyDictionary[InstallRecord, dict[int, weakref.ref[nn.Module]]] = weakref.WeakKeyDictionary()

# For each install, the other installs whose root's module tree shared a module with its root's
# tree when the later one was made (a host install on a PeftModel patched on its own, an install
# on a part of a patched model that carried none of its hooks, two models sharing a module). Hooks
# of one may then sit in the other's tree (or come there lazily), so removing by root alone would
# not be exact: ``remove_hooks`` scans while such a partner is live. Weak both ways.
_SHARING: weakref.WeakKeyDictionary[InstallRecord, weakref.WeakSet[InstallRecord]] = weakref.WeakKeyDictionary()


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
                _track_root(record, record.root)


def _track_root(record: InstallRecord, root: nn.Module) -> None:
    """Know ``record`` by its root: the modules it covers now, and the live installs whose trees share one."""
    tree = _tree(root)  # holds every module alive while their ids are compared below
    ids = _COVERED[record] = {id(module): weakref.ref(module) for module in tree}
    for other_root, ref in list(_ROOTS.items()):
        other = ref()
        if other is None or other is record or other.removed:
            continue
        if other_root is root or any(id(module) in ids for module in _tree(other_root)):
            _share(record, other, other_root)
    _ROOTS[root] = weakref.ref(record)
    record.tracked = True


def _share(record: InstallRecord, other: InstallRecord, other_root: nn.Module) -> None:
    """Remember that ``record`` and ``other`` (known by ``other_root``) share a module, both ways.

    Also with the live installs made on ``other_root`` itself that ``other`` displaced from
    :data:`_ROOTS` (a PeftModel's own install under a host install): they sit in that tree too.
    """
    same_root = [p for p in _SHARING.get(other, ()) if p.root is other_root and p is not record and not p.removed]
    for partner in (other, *same_root):
        _SHARING.setdefault(record, weakref.WeakSet()).add(partner)
        _SHARING.setdefault(partner, weakref.WeakSet()).add(record)


def note_late_site(record: InstallRecord, module: nn.Module) -> None:
    """Note a hook ``record`` registered on ``module`` after its install (during a forward; under :data:`LOCK`).

    Lazily registered hooks land on a module put into the root since (a PeftModel added after
    ``apply``); when another live install's root holds that module too, the two installs now
    share it (see :func:`own_install`). O(modules of the other live roots), once per such hook.
    """
    for other_root, ref in list(_ROOTS.items()):
        other = ref()
        if other is None or other is record or other.removed:
            continue
        if any(found is module for found in _tree(other_root)):
            _share(record, other, other_root)


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
    record = _root_record(model)
    if record is not None:
        return record
    return next((hook.record for _, _, hook in iter_hooks(model)), None)


def _root_record(model: nn.Module) -> InstallRecord | None:
    """Return the live install made on ``model`` itself with a hook still in place (O(1) + O(hooks)), else None."""
    ref = _ROOTS.get(model)
    record = None if ref is None else ref()
    if record is not None and not record.removed and _any_site_live(record):
        return record
    return None


def own_install(model: nn.Module) -> InstallRecord | None:
    """Return the install made on ``model`` when it is the only one in ``model``'s module tree, else None.

    O(hooks), no scan. Exact by this rule: ``apply`` keeps one install per module tree (a second
    ``apply`` on a part, a container or a model sharing a module joins the install it finds, or
    raises), and where two installs' trees shared a module when the later was made (a host install
    on a PeftModel patched on its own, an install on a part that carried none of the first one's
    hooks yet, two models sharing a module, a hook registered lazily on a module another install's
    root holds) both are remembered as sharing, and this returns None while the other is live.
    What it cannot see: a module that carries another install's hooks already, put into ``model``
    after ``apply(model)`` (``model[0].model = other_patched_peft_model``); then ``remove(model)``
    removes ``model``'s own install, as its ``handle.remove()`` does, and the other install stays
    whole. The rule: remove an install before moving its modules into another patched model.
    """
    record = _root_record(model)
    if record is None:
        return None
    partners = _SHARING.get(record)
    if partners is not None and any(not other.removed for other in partners):
        return None
    return record


def covers(record: InstallRecord, part: nn.Module) -> bool:
    """Return whether every module of ``part`` was in ``record``'s root tree when it was installed.

    O(modules of ``part``), no hook is inspected: with an adapter whose plan for a part is the plan
    for the whole restricted to that part, such a part needs no hook that ``record`` does not hold
    while the install is complete (see :func:`maskpatch.api.apply`). False on a copy.
    """
    covered = _COVERED.get(record)
    if covered is None:
        return False
    for module in _tree(part):
        ref = covered.get(id(module))
        if ref is None or ref() is not module:
            return False
    return True


def _tree(root: nn.Module) -> list[nn.Module]:
    """Return the modules ``root.modules()`` yields (each once), by a plain walk of ``_modules``.

    The same modules, without the name bookkeeping of ``named_modules`` (several times slower).
    """
    found: list[nn.Module] = []
    seen: set[int] = set()
    pending = [root]
    while pending:
        module = pending.pop()
        if id(module) in seen:
            continue
        seen.add(id(module))
        found.append(module)
        pending.extend(child for child in reversed(module._modules.values()) if child is not None)
    return found


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

    On the model an install was made on, that install is found through its record (O(hooks), see
    :func:`own_install` for the rule that makes this exact); elsewhere (a part or a container of an
    install's root, a copy made by ``pickle`` or ``deepcopy``) by scanning ``model``'s modules.
    """
    if record is None:
        own = own_install(model)  # the model an install was made on: through its sites, no scan
        if own is not None:
            records = [own]
        else:
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
    if record.root is not None:
        _forget_root(record, record.root)
    record.release()
    if removed:
        from .provenance import untrack_unpatched  # imported here: provenance imports this module

        untrack_unpatched()
    return removed


def _forget_root(record: InstallRecord, root: nn.Module) -> None:
    """Drop ``record`` from :data:`_ROOTS`; a live install made on the same root before it is known by it again."""
    ref = _ROOTS.get(root)
    if ref is not None and ref() is record:
        del _ROOTS[root]
        # A host install on a PeftModel patched on its own shares its root with that install.
        same_root = [other for other in _SHARING.get(record, ()) if other.root is root and not other.removed]
        if same_root:
            _ROOTS[root] = weakref.ref(same_root[-1])
    _COVERED.pop(record, None)


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
