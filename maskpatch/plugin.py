"""What an adapter author needs: the adapter contract, the hook types, the registry.

An adapter teaches maskpatch one model family. It is a small object with a ``name``, the library
versions it was tested with, ``matches(model)`` and ``plan(model, record)``; the plan lists the
hooks (:class:`HookSpec`: a module and a hook object) that line the family's token-level outputs
and masks up again under the install's policy. maskpatch registers them all or none, and
``handle.remove()`` takes them off exactly, so an adapter writes no install or undo code.

Hooks derive from :class:`ForwardPreHook` or :class:`ForwardHook` (both :class:`MaskpatchHook`,
which is how ``is_patched`` and ``remove`` recognise them), are instances of module-level classes
and hold plain data (the :class:`InstallRecord`, counts, names), so a patched model survives
``pickle`` and ``copy.deepcopy``. ``docs/writing-an-adapter.md`` walks through a complete adapter.

The pure mask functions an adapter applies the policy with are re-exported here
(:func:`prefix_mask`, :func:`strip_positions`, :func:`check_excess`), as are the registry functions.
"""

from __future__ import annotations

from typing import Any, ClassVar

from torch import nn

from .conventions import MaskConvention
from .drift import POLICIES, Policy, check_excess, prefix_mask, strip_positions
from .handle import HookSpec
from .hooks import InstallRecord, MaskpatchHook
from .registry import ENTRY_POINT_GROUP, Adapter, register_adapter, registered_adapters, unregister_adapter

__all__ = [
    "ENTRY_POINT_GROUP",
    "POLICIES",
    "Adapter",
    "ForwardHook",
    "ForwardPreHook",
    "HookSpec",
    "InstallRecord",
    "MaskConvention",
    "MaskpatchHook",
    "Policy",
    "check_excess",
    "prefix_mask",
    "register_adapter",
    "registered_adapters",
    "strip_positions",
    "unregister_adapter",
]

#: What a forward pre-hook returns to replace the call's arguments (None keeps them).
PreHookResult = tuple[tuple[Any, ...], dict[str, Any]] | None


class ForwardPreHook(MaskpatchHook):
    """Base class of a forward pre-hook: runs before ``module.forward``, may replace its arguments.

    maskpatch registers it with ``register_forward_pre_hook(hook, with_kwargs=True)``. Subclasses
    implement :meth:`__call__`; they read the policy from ``self.record.policy`` at call time and
    return new ``(args, kwargs)`` (never changing the caller's tensors or dicts in place), or None
    to leave the call as it is.
    """

    pre: ClassVar[bool] = True

    def __call__(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> PreHookResult:
        """Return replacement ``(args, kwargs)`` for ``module``'s forward, or None to keep them."""
        raise NotImplementedError(f"{type(self).__qualname__} must implement __call__(module, args, kwargs)")


class ForwardHook(MaskpatchHook):
    """Base class of a forward hook: runs after ``module.forward``, may replace its output.

    maskpatch registers it with ``register_forward_hook(hook, with_kwargs=True,
    always_call=cls.always_call)``. Subclasses implement :meth:`__call__`; they read the policy from
    ``self.record.policy`` at call time and return a new output (never the caller's dict changed in
    place), or None to leave the output as it is.
    """

    pre: ClassVar[bool] = False

    def __call__(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> Any:
        """Return a replacement for ``output``, or None to keep it."""
        raise NotImplementedError(f"{type(self).__qualname__} must implement __call__(module, args, kwargs, output)")
