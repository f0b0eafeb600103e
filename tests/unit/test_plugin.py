"""The public plugin surface, ``maskpatch.plugin``: what an adapter author imports.

Invariants protected: the plugin names are the very objects the rest of maskpatch uses (old import
paths keep working, and a hook built on the plugin bases is a MaskpatchHook that ``is_patched`` and
``remove`` see); a ForwardPreHook is registered as a pre-hook and a ForwardHook as a forward hook
(``always_call`` honoured), both with kwargs; their removal is exact; they pickle.
"""

from __future__ import annotations

import pickle

import pytest
import torch
from torch import nn

import maskpatch
import maskpatch.handle
import maskpatch.hooks
import maskpatch.registry
from maskpatch import plugin
from maskpatch.plugin import ForwardHook, ForwardPreHook, HookSpec, InstallRecord, MaskpatchHook

from helpers import state


def test_every_exported_name_exists_and_is_the_object_maskpatch_uses():
    """plugin.__all__ resolves, and re-exports are identical to their definitions (old paths keep working)."""
    assert all(hasattr(plugin, name) for name in plugin.__all__)
    assert plugin.HookSpec is maskpatch.handle.HookSpec
    assert plugin.InstallRecord is maskpatch.hooks.InstallRecord
    assert plugin.MaskpatchHook is maskpatch.hooks.MaskpatchHook
    assert plugin.ForwardPreHook is maskpatch.hooks.ForwardPreHook and plugin.ForwardHook is maskpatch.hooks.ForwardHook
    assert plugin.Adapter is maskpatch.registry.Adapter is maskpatch.Adapter
    assert plugin.register_adapter is maskpatch.register_adapter
    assert plugin.ENTRY_POINT_GROUP == "maskpatch.adapters"
    assert issubclass(ForwardPreHook, MaskpatchHook) and issubclass(ForwardHook, MaskpatchHook)
    assert ForwardPreHook.pre is True and ForwardHook.pre is False


class Doubler(nn.Module):
    def forward(self, x, *, scale=1.0):
        return x * 2 * scale


class ScalePreHook(ForwardPreHook):
    """Passes scale=10 (a new kwargs dict, the caller's left alone)."""

    def __call__(self, module, args, kwargs):
        return args, {**kwargs, "scale": 10.0}


class AddOneHook(ForwardHook):
    always_call = True

    def __call__(self, module, args, kwargs, output):
        return output + 1


class DoublerAdapter:
    name = "test-doubler"
    requires: dict[str, str] = {}
    optional: dict[str, str] = {}

    def matches(self, model: object) -> bool:
        return isinstance(model, Doubler)

    def plan(self, model: nn.Module, record: InstallRecord) -> list[HookSpec]:
        return [HookSpec(model, ScalePreHook(record)), HookSpec(model, AddOneHook(record))]


@pytest.fixture
def doubler_adapter():
    maskpatch.register_adapter(DoublerAdapter())
    try:
        yield
    finally:
        maskpatch.unregister_adapter("test-doubler")


def test_hooks_on_the_plugin_bases_are_registered_as_their_kind_and_removed_exactly(doubler_adapter):
    """The pre-hook changes the call's kwargs, the forward hook the output; is_patched sees them; remove is exact."""
    model, x = Doubler(), torch.ones(2)
    before = state(model)
    with maskpatch.patched(model) as handle:
        assert handle.adapter == "test-doubler" and maskpatch.is_patched(model)
        assert len(model._forward_pre_hooks_with_kwargs) == 1 and len(model._forward_hooks_with_kwargs) == 1
        assert len(model._forward_hooks_always_called) == 1  # AddOneHook.always_call
        kwargs = {"scale": 1.0}
        torch.testing.assert_close(model(x, **kwargs), torch.full((2,), 21.0))
        assert kwargs == {"scale": 1.0}
    assert state(model) == before and not maskpatch.is_patched(model)
    torch.testing.assert_close(model(x), torch.full((2,), 2.0))


def test_hooks_on_the_plugin_bases_pickle_with_their_record():
    """A hook is plain data: it survives pickle with its record (as a patched model must)."""
    hook = pickle.loads(pickle.dumps(AddOneHook(InstallRecord("strip", "test-doubler", pinned=False))))
    assert type(hook) is AddOneHook and hook.record.policy == "strip" and hook.record.adapter == "test-doubler"


@pytest.mark.parametrize(("base", "args"), [(ForwardPreHook, 3), (ForwardHook, 4)])
def test_a_subclass_without_call_says_what_to_implement(base, args):
    """Calling a hook that does not implement __call__ raises NotImplementedError naming the class."""
    incomplete = type("Incomplete", (base,), {})(InstallRecord("extend", "x", pinned=False))
    with pytest.raises(NotImplementedError, match="Incomplete must implement __call__"):
        incomplete(*([None] * args))
