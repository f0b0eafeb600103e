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

from .conventions import MaskConvention
from .drift import POLICIES, Policy, check_excess, prefix_mask, strip_positions
from .handle import HookSpec
from .hooks import ForwardHook, ForwardPreHook, InstallRecord, MaskpatchHook
from .hooks import PreHookResult as PreHookResult  # the return type of ForwardPreHook.__call__, importable as before
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
