"""remove() on an install's root and joins of a covered part go through the install record.

Invariants protected:
* ``maskpatch.remove(model)`` on the model ``apply`` was called on removes its install through
  the recorded hook sites: no walk of the model's modules (O(hooks), not O(modules)), and the undo
  stays exact (hook dicts, ``__dict__`` and the patched classes as before);
* ``apply(part)`` on a part of a patched model that the install covered joins it without building
  a plan (``Adapter.plan`` is never called); a part the install does not cover whole (a module put
  into it since, an install with a hook taken off) is still compared against a plan and refused;
* the fast path stays exact where two installs' trees meet: an install on a part made after the
  whole (a PeftModel added later, whose hooks come lazily), two models sharing a PeftModel, a host
  install on a PeftModel patched on its own, nested ``patched()`` blocks: ``remove(root)`` removes
  every install found in the root's tree, as a scan does (no model left half repaired).
"""

from __future__ import annotations

import warnings

import pytest
from torch import nn

import maskpatch
import maskpatch.handle
from maskpatch.adapters.peft import PeftAdapter
from maskpatch.adapters.sentence_transformers import SentenceTransformersAdapter
from maskpatch.hooks import MaskpatchHook
from tests.helpers import HOOK_DICTS, add_prompt_learning, assert_no_residue, residue_snapshot, st_model

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*[Tt]oken type ids.*"),
    pytest.mark.filterwarnings("ignore:.*already patched.*:maskpatch.MaskpatchWarning"),
]

M = 4


@pytest.fixture
def model(tiny_model_dir):
    return add_prompt_learning(st_model(tiny_model_dir("bert")), m=M).eval()  # encode() would set eval


def _no_scan(*args, **kwargs):
    raise AssertionError("the model's modules were scanned for hooks")


def _no_plan(self, model, record):
    raise AssertionError(f"{type(self).__name__}.plan was called to decide a join")


def _hooks(model: nn.Module) -> list[str]:
    """Every maskpatch hook left in ``model``'s hook dicts, read straight from torch's dicts."""
    return [
        f"{type(hook).__name__} on {type(module).__name__}"
        for module in model.modules()
        for name in HOOK_DICTS
        for hook in getattr(module, name).values()
        if isinstance(hook, MaskpatchHook)
    ]


def _encode(model, texts=("hello world", "a somewhat longer text here")):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return model.encode(list(texts), convert_to_tensor=True)


# --- remove(root): through the record ----------------------------------------------------------


@pytest.mark.parametrize("policy", ["extend", "ignore", "strip"])
def test_remove_on_the_root_walks_no_module_and_is_exact(model, monkeypatch, policy):
    """remove(model) on the model apply() patched: no module walk, and nothing of the install is left."""
    before = residue_snapshot(model)
    maskpatch.apply(model, policy=policy)
    _encode(model)  # lazily registered hooks too
    monkeypatch.setattr(maskpatch.handle, "iter_hooks", _no_scan)
    monkeypatch.setattr(nn.Module, "modules", _no_scan)
    monkeypatch.setattr(nn.Module, "named_modules", _no_scan)
    assert maskpatch.remove(model) is True
    monkeypatch.undo()
    assert_no_residue(before, model)
    assert not maskpatch.is_patched(model) and _hooks(model) == []
    assert maskpatch.remove(model) is False


def test_remove_on_a_part_still_removes_the_whole_install(model):
    """Not the root (a part of it): found by scanning, removed whole, from the root too."""
    handle = maskpatch.apply(model)
    assert maskpatch.remove(model[0]) is True
    assert not handle.active and not maskpatch.is_patched(model) and _hooks(model) == []


# --- joins: without a plan where the record decides -------------------------------------------


def test_apply_on_a_covered_part_joins_without_a_plan(model, monkeypatch):
    """apply(model) then apply(model[0]) / patched(model[0]): the existing install, decided from its record."""
    handle = maskpatch.apply(model)
    monkeypatch.setattr(SentenceTransformersAdapter, "plan", _no_plan)
    monkeypatch.setattr(PeftAdapter, "plan", _no_plan)
    with pytest.warns(maskpatch.MaskpatchWarning, match="already patched"):
        again = maskpatch.apply(model[0])
    assert again._record is handle._record
    with maskpatch.patched(model[0]) as inner:
        assert inner._record is handle._record
    assert handle.active  # the block joined an apply() install: it stays after the block
    monkeypatch.undo()
    again.remove()
    assert not maskpatch.is_patched(model) and not handle.active and _hooks(model) == []


def test_a_module_put_into_a_covered_part_since_is_compared_against_a_plan(model):
    """A Pooling added inside model[0] after apply(model) has no PoolingPromptHook: apply(model[0]) refuses."""
    from sentence_transformers.sentence_transformer.modules.pooling import Pooling

    handle = maskpatch.apply(model)
    model[0].add_module("late_pooling", Pooling(model[0].get_embedding_dimension()))
    with pytest.raises(maskpatch.AlreadyPatchedError, match="PoolingPromptHook on Pooling"):
        maskpatch.apply(model[0])
    handle.remove()
    assert _hooks(model) == []


def test_an_incomplete_install_is_compared_against_a_plan(model):
    """A hook taken off by other means: apply(model[0]) names it instead of joining a half install."""
    from maskpatch.adapters.sentence_transformers import TransformerOutputHook

    handle = maskpatch.apply(model)
    key = next(k for k, h in model[0]._forward_hooks.items() if isinstance(h, TransformerOutputHook))
    for name in HOOK_DICTS:
        getattr(model[0], name).pop(key, None)
    with pytest.raises(maskpatch.AlreadyPatchedError, match="TransformerOutputHook on Transformer"):
        maskpatch.apply(model[0])
    handle.remove()
    assert _hooks(model) == []


def test_apply_on_the_peft_model_of_a_patched_model_still_refuses(model):
    """The sentence-transformers install does not patch direct calls of its PeftModel: apply(peft_model) raises."""
    handle = maskpatch.apply(model)
    with pytest.raises(maskpatch.AlreadyPatchedError, match="PeftCallHook on PeftModel"):
        maskpatch.apply(model[0].model)
    handle.remove()
    assert _hooks(model) == []


# --- where two installs' trees meet: remove(root) stays exact ----------------------------------


def test_an_install_on_a_part_added_later_is_removed_with_the_root(tiny_model_dir):
    """apply(st) before its PeftModel exists, then apply(peft_model): remove(st) takes both off, as a scan does."""
    st = st_model(tiny_model_dir("bert"))
    maskpatch.apply(st)
    add_prompt_learning(st, m=M)  # the st install hooks it lazily, on its next forward
    inner = maskpatch.apply(st[0].model)  # no hook of the st install in it yet: its own install
    _encode(st)
    assert inner.active
    assert maskpatch.remove(st) is True
    assert _hooks(st) == [] and not inner.active and not maskpatch.is_patched(st[0].model)


def test_two_models_sharing_a_peft_model_added_after_apply_are_removed_whole(tiny_model_dir):
    """Two SentenceTransformers patched first, then given one PeftModel: the first install hooks it lazily,
    inside the second model too, so remove(second) removes both installs whole, as a scan does."""
    first = st_model(tiny_model_dir("bert"))
    second = st_model(tiny_model_dir("bert"))
    maskpatch.apply(first)
    maskpatch.apply(second)
    add_prompt_learning(first, m=M)
    second[0].model = first[0].model  # shared; neither install has a hook in it yet
    _encode(first)  # the first install registers its position hook on the shared base model
    assert maskpatch.remove(second) is True
    assert _hooks(second) == []
    assert not maskpatch.is_patched(second)
    assert not maskpatch.is_patched(first)  # removed whole: the first install reached into second
    assert maskpatch.remove(first) is False


def test_a_model_sharing_a_hookless_peft_model_with_a_patched_one_keeps_the_other(tiny_model_dir):
    """second patched after it shares first's PeftModel (which second's install hooks): remove(second)
    removes second's install only, as a scan does; first stays patched and active."""
    first = st_model(tiny_model_dir("bert"))
    second = st_model(tiny_model_dir("bert"))
    handle = maskpatch.apply(first)
    add_prompt_learning(first, m=M)
    second[0].model = first[0].model
    maskpatch.apply(second)  # its install holds the position hook of the shared base model
    _encode(first)
    assert maskpatch.remove(second) is True
    assert _hooks(second[1]) == [] and not any(
        h.record is not handle._record
        for m in first.modules()
        for h in m._forward_pre_hooks.values()
        if isinstance(h, MaskpatchHook)
    )
    assert handle.active and maskpatch.is_patched(first)
    handle.remove()
    assert _hooks(first) == [] and _hooks(second) == []


def test_a_host_install_on_a_peft_model_patched_on_its_own(model, monkeypatch):
    """apply(pm) then apply(pipeline(pm)): both are made on pm; remove(pm) takes both off, and after the
    pipeline's handle.remove() the PeftModel's own install is found again through its record."""
    import transformers

    pm = model[0].model
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe = transformers.pipeline("feature-extraction", model=pm, tokenizer=model.tokenizer, device="cpu")
    own = maskpatch.apply(pm)
    host = maskpatch.apply(pipe)
    host.remove()
    monkeypatch.setattr(maskpatch.handle, "iter_hooks", _no_scan)
    assert maskpatch.is_patched(pm) and own.active
    monkeypatch.undo()
    host = maskpatch.apply(pipe)
    assert maskpatch.remove(pm) is True
    assert _hooks(pm) == [] and not own.active and not host.active


def test_nested_patched_blocks_on_a_part_and_the_whole(model):
    """patched(model) around patched(model[0]): one install, removed by the outer block, exactly."""
    before = residue_snapshot(model)
    with maskpatch.patched(model) as outer:
        with maskpatch.patched(model[0]) as inner:
            assert inner._record is outer._record
        assert outer.active
    assert_no_residue(before, model)
    with maskpatch.patched(model[0], policy="ignore") as outer, maskpatch.patched(model, policy="ignore") as inner:
        assert inner._record is outer._record  # under ignore the part's install covers the whole
    assert_no_residue(before, model)
