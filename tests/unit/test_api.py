"""The public API: apply / patched / is_patched / remove, their handles, exact undo and errors."""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys
import textwrap
import warnings
from typing import ClassVar

import pytest
import torch
from torch import nn

import maskpatch
from maskpatch import (
    AlreadyPatchedError,
    MaskpatchWarning,
    PatchHandle,
    PolicyError,
    UnsupportedModelError,
    UnsupportedVersionError,
    register_adapter,
    unregister_adapter,
)
from maskpatch.handle import HookSpec, iter_hooks
from maskpatch.hooks import InstallRecord, MaskpatchHook, PositionIdsHook

from conftest import TEXTS
from helpers import HOOK_DICTS, add_prompt_learning, assert_no_residue, encode, residue_snapshot, st_model


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    """A tiny BERT SentenceTransformer with an 4-token prompt-tuning adapter (unpatched between tests)."""
    return add_prompt_learning(st_model(tiny_model_dir("bert")), m=4)


@pytest.fixture(autouse=True)
def _unpatched_after(request):
    yield
    if "model" in request.fixturenames:
        maskpatch.remove(request.getfixturevalue("model"))


def _hook_count(model: nn.Module) -> int:
    return sum(1 for _ in iter_hooks(model))


def _state(model: nn.Module) -> list[tuple]:
    """Per module: its __dict__ keys and the contents of every forward-hook dict torch keeps."""
    return [(name, sorted(vars(m)), *(dict(getattr(m, d)) for d in HOOK_DICTS)) for name, m in model.named_modules()]


def _maskpatch_leftovers(model: nn.Module, keys: set[tuple[int, int]]) -> list[str]:
    """Every trace of maskpatch in ``model``: a MaskpatchHook in any hook dict, one of the hook ids
    ``keys`` (``(id(module), hook id)`` seen while patched) in any of the five dicts torch keeps, or
    an attribute whose value comes from maskpatch."""
    found = []
    for name, module in model.named_modules():
        for attr in HOOK_DICTS:
            hooks = getattr(module, attr)
            found += [f"{name}.{attr}[{key}]" for key in hooks if (id(module), key) in keys]
            found += [f"{name}.{attr}" for value in hooks.values() if isinstance(value, MaskpatchHook)]
        found += [f"{name}.{k}" for k, v in vars(module).items() if type(v).__module__.startswith("maskpatch")]
    return found


# --- apply and the handle -------------------------------------------------------------------


def test_apply_returns_an_active_handle_and_remove_unpatches(model):
    """apply() patches and returns a PatchHandle; handle.remove() unpatches; a second remove does nothing."""
    residue = residue_snapshot(model)
    handle = maskpatch.apply(model, policy="ignore")
    assert isinstance(handle, PatchHandle)
    assert maskpatch.is_patched(model)
    assert handle.active and handle.policy == "ignore" and handle.adapter == "sentence-transformers"
    assert "active" in repr(handle)
    handle.remove()
    assert not maskpatch.is_patched(model) and not handle.active
    handle.remove()  # idempotent
    assert not maskpatch.is_patched(model)
    assert maskpatch.remove(model) is False
    assert_no_residue(residue, model)


def test_apply_default_policy_is_extend(model):
    """Without a policy keyword, apply() uses extend."""
    assert maskpatch.apply(model).policy == "extend"


def test_handle_is_a_context_manager_that_removes_on_exit(model):
    """`with maskpatch.apply(model):` removes the install when the block ends, also on an exception."""
    with pytest.raises(ZeroDivisionError), maskpatch.apply(model) as handle:
        assert maskpatch.is_patched(model) and handle.active
        1 / 0  # noqa: B018
    assert not maskpatch.is_patched(model)


def test_second_apply_does_not_stack_and_warns(model):
    """A second apply() with the same policy installs nothing more, warns, and shares the first install."""
    first = maskpatch.apply(model, policy="strip")
    once = encode(model, TEXTS)  # also adds the lazy position hook
    count = _hook_count(model)
    with pytest.warns(MaskpatchWarning, match="already patched"):
        second = maskpatch.apply(model, policy="strip")
    assert _hook_count(model) == count
    assert torch.equal(encode(model, TEXTS), once)
    second.remove()
    assert not first.active and not maskpatch.is_patched(model)


def test_second_apply_with_another_policy_raises_and_keeps_the_first(model):
    """apply() with a different policy on a patched model raises AlreadyPatchedError; the first stays."""
    maskpatch.apply(model, policy="extend")
    count = _hook_count(model)
    with pytest.raises(AlreadyPatchedError, match=r"'extend'.*'ignore'"):
        maskpatch.apply(model, policy="ignore")
    assert _hook_count(model) == count
    assert all(hook.record.policy == "extend" for _, _, hook in iter_hooks(model))


def test_remove_function_undoes_an_apply(model):
    """maskpatch.remove(model) removes an install made by apply() and reports that it did."""
    residue = residue_snapshot(model)
    handle = maskpatch.apply(model)
    assert maskpatch.remove(model) is True
    assert not maskpatch.is_patched(model) and not handle.active
    assert_no_residue(residue, model)


# --- errors, checked before anything changes ------------------------------------------------


@pytest.mark.parametrize("policy", ["banana", None, "EXTEND"])
def test_unknown_policy_raises_before_anything_is_installed(model, policy):
    """apply() and patched() with an unknown policy raise PolicyError and leave the model unpatched."""
    before = _state(model)
    with pytest.raises(PolicyError):
        maskpatch.apply(model, policy=policy)
    with pytest.raises(PolicyError), maskpatch.patched(model, policy=policy):
        pass
    assert _state(model) == before


@pytest.mark.parametrize("target", [object(), "model", None])
def test_apply_on_a_non_module_raises_unsupported_model(target):
    """Anything that is not an nn.Module raises UnsupportedModelError (a TypeError) naming its type."""
    with pytest.raises(UnsupportedModelError, match=type(target).__qualname__) as info:
        maskpatch.apply(target)
    assert isinstance(info.value, TypeError)
    assert maskpatch.is_patched(target) is False


def test_apply_on_a_plain_module_raises_unsupported_model():
    """A plain torch module that no adapter handles raises UnsupportedModelError; nothing is installed."""
    linear = nn.Linear(2, 2)
    with pytest.raises(UnsupportedModelError, match=r"Linear.*registered adapters: .*sentence-transformers"):
        maskpatch.apply(linear)
    assert not maskpatch.is_patched(linear)
    assert not linear._forward_hooks and not linear._forward_pre_hooks


def test_out_of_range_version_raises_and_check_versions_false_bypasses(model, monkeypatch):
    """A library outside the adapter's range raises UnsupportedVersionError and installs nothing;
    check_versions=False patches anyway."""
    real = importlib.metadata.version
    monkeypatch.setattr(
        importlib.metadata, "version", lambda dist: "2.7.0" if dist == "sentence-transformers" else real(dist)
    )
    with pytest.raises(UnsupportedVersionError) as info:
        maskpatch.apply(model)
    message = str(info.value)
    assert "sentence-transformers>=3.0,<7" in message and "sentence-transformers==2.7.0" in message
    assert "check_versions=False" in message
    assert not maskpatch.is_patched(model)
    handle = maskpatch.apply(model, check_versions=False)
    assert handle.active


class _RefusesHooks(nn.Module):
    def register_forward_hook(self, *args, **kwargs):
        raise RuntimeError("this module refuses hooks")


class _Owner(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.good = nn.Linear(2, 2)
        self.bad = _RefusesHooks()


class _NoopHook(MaskpatchHook):
    def __call__(self, module, args, kwargs, output):
        return None


class _TwoHookAdapter:
    name = "test-two-hooks"
    requires: ClassVar[dict[str, str]] = {}
    optional: ClassVar[dict[str, str]] = {}

    def matches(self, model: object) -> bool:
        return isinstance(model, _Owner)

    def plan(self, model: nn.Module, record: InstallRecord) -> list[HookSpec]:
        return [HookSpec(model.good, _NoopHook(record)), HookSpec(model.bad, _NoopHook(record))]


def test_a_failing_install_rolls_back_every_hook_it_made():
    """When registering one hook fails, the hooks registered before it are removed: all or nothing."""
    register_adapter(_TwoHookAdapter())
    try:
        owner = _Owner()
        with pytest.raises(RuntimeError, match="refuses hooks"):
            maskpatch.apply(owner)
        assert not maskpatch.is_patched(owner)
        assert not owner.good._forward_hooks and not owner.good._forward_hooks_with_kwargs
    finally:
        unregister_adapter("test-two-hooks")


# --- patched() ------------------------------------------------------------------------------


def test_patched_patches_inside_and_removes_on_exit(model):
    """patched() patches for the body only; is_patched is false again after the block."""
    with maskpatch.patched(model, policy="ignore") as handle:
        assert maskpatch.is_patched(model) and handle.policy == "ignore"
    assert not maskpatch.is_patched(model) and not handle.active


def test_patched_removes_when_the_body_raises(model):
    """An exception in the body propagates and the install is removed."""
    with pytest.raises(KeyError), maskpatch.patched(model):
        raise KeyError("boom")
    assert not maskpatch.is_patched(model)


def test_nested_patched_blocks_share_one_install_removed_by_the_last(model):
    """An inner block joins the outer install (no stacking); only the outer exit removes it."""
    with maskpatch.patched(model, policy="strip"):
        count = _hook_count(model)
        with maskpatch.patched(model, policy="strip"):
            assert _hook_count(model) == count
        assert maskpatch.is_patched(model) and _hook_count(model) == count
        with pytest.raises(ValueError), maskpatch.patched(model, policy="strip"):
            raise ValueError("inner failure")
        assert maskpatch.is_patched(model)
    assert not maskpatch.is_patched(model)


def test_nested_patched_with_another_policy_raises_and_keeps_the_outer(model):
    """A nested block asking for another policy raises AlreadyPatchedError; the outer install survives."""
    with maskpatch.patched(model, policy="extend"):
        with pytest.raises(AlreadyPatchedError), maskpatch.patched(model, policy="strip"):
            pass
        assert maskpatch.is_patched(model)
    assert not maskpatch.is_patched(model)


def test_patched_inside_apply_leaves_the_apply_install_in_place(model):
    """A patched() block on a model patched by apply() joins it and does not remove it on exit."""
    handle = maskpatch.apply(model)
    with maskpatch.patched(model):
        pass
    assert handle.active and maskpatch.is_patched(model)


def test_apply_inside_patched_keeps_the_install_after_the_block(model):
    """apply() inside a patched() block pins the install: it survives the block's exit."""
    with maskpatch.patched(model), warnings.catch_warnings():
        warnings.simplefilter("ignore", MaskpatchWarning)
        handle = maskpatch.apply(model)
    assert handle.active and maskpatch.is_patched(model)


def test_is_patched_is_false_for_foreign_objects():
    """is_patched never raises: non-modules and unpatched modules are simply not patched."""
    assert maskpatch.is_patched(object()) is False  # type: ignore[arg-type]
    assert maskpatch.is_patched(nn.Linear(1, 1)) is False


# --- exact undo -----------------------------------------------------------------------------


@pytest.mark.parametrize("policy", maskpatch.POLICIES)
def test_remove_is_exact_including_the_lazily_added_position_hook(model, policy):
    """After remove(): no maskpatch hook in any hook dict, the same __dict__ keys and hook dicts as before,
    no forward rebound, and outputs bit-identical to the unpatched model's."""
    before_state = _state(model)
    before_out = encode(model, TEXTS)
    residue = residue_snapshot(model)
    handle = maskpatch.apply(model, policy=policy)
    patched_out = encode(model, TEXTS)
    base = model[0].model.base_model
    assert any(isinstance(h, PositionIdsHook) for h in base._forward_pre_hooks.values()), "lazy hook not added"
    assert not torch.equal(patched_out, before_out)  # the patch did act
    keys = {(id(module), key) for module, key, _ in iter_hooks(model)}
    assert len(keys) >= 3  # Transformer pre + post hooks and the lazily added PositionIdsHook
    handle.remove()
    assert _maskpatch_leftovers(model, keys) == []
    assert _state(model) == before_state
    assert_no_residue(residue, model)
    assert all("forward" not in vars(m) for m in model.modules())
    assert torch.equal(encode(model, TEXTS), before_out)


def test_remove_after_patched_block_is_exact(model):
    """A patched() block leaves the model exactly as before, lazily added hooks included."""
    before_state, residue = _state(model), residue_snapshot(model)
    with maskpatch.patched(model):
        encode(model, TEXTS)
    assert _state(model) == before_state
    assert_no_residue(residue, model)


# --- importing maskpatch --------------------------------------------------------------------

_BLOCKED_IMPORT = textwrap.dedent(
    """
    import importlib.abc, sys

    BLOCKED = ("sentence_transformers", "peft", "transformers")

    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ModuleNotFoundError(f"No module named {name!r} (blocked by the test)", name=name)
            return None

    sys.meta_path.insert(0, Block())
    import torch
    import maskpatch

    assert not any(m.split(".")[0] in BLOCKED for m in sys.modules), "a blocked library got imported"
    linear = torch.nn.Linear(2, 2)
    assert maskpatch.is_patched(linear) is False
    try:
        maskpatch.apply(linear)
    except maskpatch.UnsupportedModelError as exc:
        print("ERROR:", exc)
    else:
        raise SystemExit("apply on a plain module did not raise")
    """
)


def test_import_and_apply_work_without_sentence_transformers_or_peft():
    """With sentence-transformers, peft and transformers unimportable, `import maskpatch` works and
    apply() on a plain module raises UnsupportedModelError naming the type."""
    result = subprocess.run(
        [sys.executable, "-c", _BLOCKED_IMPORT], check=False, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "ERROR: no maskpatch adapter handles an object of type torch.nn.modules.linear.Linear" in result.stdout


def test_import_maskpatch_imports_no_model_library():
    """`import maskpatch` in a fresh interpreter imports neither sentence-transformers, peft nor transformers."""
    code = (
        "import sys, maskpatch; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('sentence_transformers', 'peft', 'transformers')))"
    )
    result = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
