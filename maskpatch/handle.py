"""Installing hooks, finding them again, and the handle that undoes one install exactly."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from types import TracebackType

from torch import nn

from .drift import Policy
from .hooks import LOCK, InstallRecord, MaskpatchHook

__all__ = ["LOCK", "HookSpec", "PatchHandle", "find_record", "install", "iter_hooks", "remove_hooks"]

# The dicts torch keeps per hook kind, keyed by the same hook id.
_PRE_DICTS = ("_forward_pre_hooks", "_forward_pre_hooks_with_kwargs")
_POST_DICTS = ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called")


@dataclass(frozen=True)
class HookSpec:
    """One hook to register: ``hook`` on ``module``, a pre-hook when ``hook.pre``."""

    module: nn.Module
    hook: MaskpatchHook


def install(specs: Sequence[HookSpec]) -> None:
    """Register every hook of ``specs`` (all with ``with_kwargs=True``, honouring ``always_call``), or none of them."""
    done = []
    try:
        for spec in specs:
            if spec.hook.pre:
                done.append(spec.module.register_forward_pre_hook(spec.hook, with_kwargs=True))
            else:
                hook = spec.hook
                done.append(spec.module.register_forward_hook(hook, with_kwargs=True, always_call=hook.always_call))
    except BaseException:
        for handle in done:
            handle.remove()
        raise


def iter_hooks(model: nn.Module) -> Iterator[tuple[nn.Module, int, MaskpatchHook]]:
    """Yield ``(module, hook id, hook)`` for every maskpatch hook in ``model``'s modules."""
    for module in model.modules():
        for hooks in (module._forward_pre_hooks, module._forward_hooks):
            for key, hook in list(hooks.items()):
                if isinstance(hook, MaskpatchHook):
                    yield module, key, hook


def find_record(model: nn.Module) -> InstallRecord | None:
    """Return the record of the install found in ``model``, or None when it is not patched."""
    return next((hook.record for _, _, hook in iter_hooks(model)), None)


def remove_hooks(model: nn.Module, record: InstallRecord | None = None) -> int:
    """Remove the maskpatch hooks of ``record`` (of every install if None); return how many."""
    removed = 0
    for module, key, hook in list(iter_hooks(model)):
        if record is not None and hook.record is not record:
            continue
        for name in _PRE_DICTS if hook.pre else _POST_DICTS:
            getattr(module, name).pop(key, None)
        removed += 1
    if removed:
        from .provenance import untrack_unpatched  # imported here: provenance imports this module

        untrack_unpatched()
    return removed


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
        """Whether this install's hooks are still on the model."""
        return any(hook.record is self._record for _, _, hook in iter_hooks(self._scope))

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
        state = "active" if self.active else "removed"
        return f"<PatchHandle adapter={self.adapter!r} policy={self.policy!r} {state}>"
