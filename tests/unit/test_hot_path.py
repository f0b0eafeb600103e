"""The repair's hot path: no host-device sync, views for ``strip``, one allocation for ``extend``/``ignore``,
and a layout lookup cached per adapter state.

The hook objects are called directly, as torch calls them, on inputs captured from a real forward of a
prompt-tuned tiny BERT, under a ``TorchDispatchMode`` that records every aten op they dispatch. That
isolates maskpatch from sentence-transformers and transformers, which sync on their own (Pooling calls
``.item()`` on ``prompt_length``). Full forwards are compared patched vs. unpatched as well.
"""

from __future__ import annotations

import pickle
import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

import maskpatch
from maskpatch import POLICIES, layout
from maskpatch.handle import iter_hooks

from conftest import TEXTS
from helpers import add_prompt_learning, encode, st_model

M = 4
SYNC = torch.ops.aten._local_scalar_dense.default


class OpRecorder(TorchDispatchMode):
    """Records every aten op dispatched inside the mode: ``(op, flat tensor inputs, flat tensor outputs)``."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[Any, list[torch.Tensor], list[torch.Tensor]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = [t for t in tree_flatten((args, kwargs or {}))[0] if isinstance(t, torch.Tensor)]
        outputs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        self.calls.append((func, inputs, outputs))
        return out

    def count(self, op: Any) -> int:
        return sum(1 for func, _, _ in self.calls if func is op)


def _storage(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


@pytest.fixture(scope="module")
def tiny_bert(tiny_model_dir) -> str:
    return tiny_model_dir("bert")


def prompt_model(path: str, *, include_prompt: bool = True):
    return add_prompt_learning(st_model(path, include_prompt=include_prompt), m=M)


def features_for(model, *, prompt_length: bool = False) -> dict[str, Any]:
    features = dict(model.preprocess(TEXTS))
    if prompt_length:
        features["prompt_length"] = torch.tensor([2] * len(TEXTS))  # what ST passes when training
    return features


def capture(model, features: dict[str, Any]) -> dict[str, Any]:
    """Run one unpatched forward; record what maskpatch's hooks receive (Transformer call, base model call)."""
    seen: dict[str, Any] = {}
    pm = model[0].model
    h1 = model[0].register_forward_hook(
        lambda mod, args, kwargs, out: seen.update(t=(args, kwargs, dict(out))), with_kwargs=True
    )
    h2 = pm.base_model.register_forward_pre_hook(
        lambda mod, args, kwargs: seen.update(b=(args, dict(kwargs))), with_kwargs=True
    )
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model(dict(features))
    finally:
        h1.remove()
        h2.remove()
    return seen


def hook_calls(model, seen: dict[str, Any]) -> list[tuple[str, Callable[[], Any]]]:
    """Every maskpatch hook on ``model`` as ``(class name, call)``, called with the captured inputs."""
    t_args, t_kwargs, t_out = seen["t"]
    b_args, b_kwargs = seen["b"]
    base = model[0].model.base_model
    calls: list[tuple[str, Callable[[], Any]]] = []
    repaired = t_out
    for module, _, hook in iter_hooks(model):
        if module is model[0] and not hook.pre:
            repaired = hook(module, t_args, t_kwargs, dict(t_out)) or repaired
    for module, _, hook in iter_hooks(model):
        name = type(hook).__name__
        if module is model[0]:
            if hook.pre:
                calls.append((name, lambda h=hook, mod=module: h(mod, t_args, t_kwargs)))
            else:
                calls.append((name, lambda h=hook, mod=module: h(mod, t_args, t_kwargs, dict(t_out))))
        elif module is base:
            calls.append((name, lambda h=hook, mod=module: h(mod, b_args, dict(b_kwargs))))
        elif hook.pre:
            calls.append((name, lambda h=hook, mod=module, r=repaired: h(mod, (dict(r),), {})))
    return calls


def patched_and_warm(model, policy: str, features: dict[str, Any]) -> maskpatch.PatchHandle:
    handle = maskpatch.apply(model, policy=policy)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model(dict(features))  # the lazy position hook on the PEFT base model goes in
    return handle


def output_hook(model):
    return next(hook for module, _, hook in iter_hooks(model) if module is model[0] and not hook.pre)


# --- no host-device synchronisation ---------------------------------------------------------


@pytest.mark.parametrize("policy", POLICIES)
def test_hooks_dispatch_no_local_scalar_dense(tiny_bert, policy):
    """Every maskpatch hook, called as torch calls it, dispatches ops but never ``_local_scalar_dense``."""
    model = prompt_model(tiny_bert, include_prompt=False)
    features = features_for(model, prompt_length=True)
    seen = capture(model, features)
    with patched_and_warm(model, policy, features):
        calls = hook_calls(model, seen)
        names = {name for name, _ in calls}
        assert {"TransformerOutputHook", "PositionIdsHook"} <= names
        if policy == "extend":
            assert "PoolingPromptHook" in names
        with OpRecorder() as rec:
            for _, call in calls:
                call()
    assert rec.calls, "the hooks dispatched no op at all: the test did not exercise the repair"
    assert rec.count(SYNC) == 0, [str(func) for func, _, _ in rec.calls]


@pytest.mark.parametrize("policy", POLICIES)
def test_hooks_run_on_meta_tensors_so_they_never_read_values_on_the_host(tiny_bert, policy):
    """On meta tensors ``.item()``, ``.tolist()`` and ``bool(t)`` raise and ``.cpu()`` leaves meta: neither happens."""
    model = prompt_model(tiny_bert, include_prompt=False)
    features = features_for(model, prompt_length=True)
    seen = tree_map(lambda x: x.to("meta") if isinstance(x, torch.Tensor) else x, capture(model, features))
    with patched_and_warm(model, policy, features):
        results = [call() for _, call in hook_calls(model, seen)]
    tensors = [t for t in tree_flatten(results)[0] if isinstance(t, torch.Tensor)]
    assert tensors, "no hook returned a repaired tensor"
    assert {t.device.type for t in tensors} == {"meta"}


@pytest.mark.parametrize("include_prompt", [True, False])
@pytest.mark.parametrize("policy", POLICIES)
def test_patched_forward_syncs_no_more_often_than_the_unpatched_forward(tiny_bert, policy, include_prompt):
    """A whole patched forward dispatches no more ``_local_scalar_dense`` than the same forward unpatched."""
    model = prompt_model(tiny_bert, include_prompt=include_prompt)
    features = features_for(model, prompt_length=not include_prompt)

    def syncs() -> int:
        with OpRecorder() as rec, torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model(dict(features))
        return rec.count(SYNC)

    unpatched = syncs()
    with patched_and_warm(model, policy, features):
        patched = syncs()
    assert patched <= unpatched


# --- strip returns views; extend/ignore allocate only the repaired mask ---------------------


def test_strip_output_is_a_view_of_the_base_model_output(tiny_bert):
    """Under ``strip`` the token embeddings ST returns share the base model's storage, offset by M positions."""
    model = prompt_model(tiny_bert)
    features = features_for(model)
    hidden: list[torch.Tensor] = []
    grab = model[0].model.base_model.register_forward_hook(lambda mod, args, out: hidden.append(out.last_hidden_state))
    try:
        with maskpatch.patched(model, policy="strip"), torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = model[0](dict(features))
    finally:
        grab.remove()
    full, stripped = hidden[-1], out["token_embeddings"]
    assert stripped.shape[1] == features["attention_mask"].shape[1] == full.shape[1] - M
    assert _storage(stripped) == _storage(full)
    assert stripped.data_ptr() == full.data_ptr() + M * full.stride(1) * full.element_size()
    assert torch.equal(stripped, full[:, M:])


def test_strip_dispatches_only_views_for_the_output_and_every_layer(tiny_bert):
    """The ``strip`` output hook allocates nothing: every op it dispatches returns a view of its input."""
    model = prompt_model(tiny_bert)
    features = features_for(model)
    seen = capture(model, features)
    t_args, t_kwargs, t_out = seen["t"]
    tokens = t_out["token_embeddings"]
    t_out["all_layer_embeddings"] = (tokens.clone(), tokens.clone())
    with patched_and_warm(model, "strip", features):
        with OpRecorder() as rec:
            repaired = output_hook(model)(model[0], t_args, t_kwargs, dict(t_out))
    assert rec.calls
    for func, inputs, outputs in rec.calls:
        assert all(_storage(o) in {_storage(i) for i in inputs} for o in outputs), str(func)
    assert repaired["token_embeddings"]._base is tokens
    for layer, source in zip(repaired["all_layer_embeddings"], t_out["all_layer_embeddings"], strict=True):
        assert layer._base is source and layer.shape[1] == source.shape[1] - M


@pytest.mark.parametrize("policy", ["extend", "ignore"])
def test_extend_and_ignore_allocate_only_the_repaired_mask(tiny_bert, policy):
    """The output hook allocates one tensor, the (B, M + N) mask it returns, and never touches the embeddings."""
    model = prompt_model(tiny_bert)
    features = features_for(model)
    seen = capture(model, features)
    t_args, t_kwargs, t_out = seen["t"]
    mask, tokens = t_out["attention_mask"], t_out["token_embeddings"]
    with patched_and_warm(model, policy, features):
        with OpRecorder() as rec:
            repaired = output_hook(model)(model[0], t_args, t_kwargs, dict(t_out))
    allocated = [
        o for _, inputs, outputs in rec.calls for o in outputs if _storage(o) not in {_storage(i) for i in inputs}
    ]
    assert len(allocated) == 1
    assert allocated[0] is repaired["attention_mask"] or _storage(allocated[0]) == _storage(repaired["attention_mask"])
    assert repaired["attention_mask"].shape == (mask.shape[0], M + mask.shape[1])
    size = mask.shape[0] * (M + mask.shape[1]) * mask.element_size()
    assert repaired["attention_mask"].untyped_storage().nbytes() == size
    assert all(tokens is not i for _, inputs, _ in rec.calls for i in inputs)
    assert repaired["token_embeddings"] is tokens


# --- the layout lookup is cached per adapter state ------------------------------------------


@pytest.fixture
def counted_layout_reads(monkeypatch) -> list[str]:
    """A fresh layout cache, and a list that grows by one adapter name per uncached read of a config."""
    reads: list[str] = []
    uncached = layout._layout_of

    def counting(adapter: str, config: Any) -> layout.VirtualLayout:
        reads.append(adapter)
        return uncached(adapter, config)

    monkeypatch.setattr(layout, "_LAYOUTS", {})
    monkeypatch.setattr(layout, "_layout_of", counting)
    return reads


def _prompt_config(m: int, task: str = "FEATURE_EXTRACTION"):
    from peft import PromptTuningConfig, TaskType

    return PromptTuningConfig(task_type=TaskType[task], num_virtual_tokens=m)


def _two_adapter_peft(path: str, *, causal: bool = False):
    """A PEFT model with prompt-tuning adapters "a" (M=4, active) and "b" (M=6).

    ``causal`` builds a causal LM: PEFT's ``disable_adapter()`` for prompt learning needs the base
    model's ``prepare_inputs_for_generation``, which transformers 5 encoders no longer have.
    """
    from peft import get_peft_model
    from transformers import AutoModel, AutoModelForCausalLM

    task = "CAUSAL_LM" if causal else "FEATURE_EXTRACTION"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base = (AutoModelForCausalLM if causal else AutoModel).from_pretrained(path)
        pm = get_peft_model(base, _prompt_config(4, task), adapter_name="a")
        pm.add_adapter("b", _prompt_config(6, task))
    return pm, task


def test_layout_is_read_from_the_config_once_per_adapter_state(tiny_model_dir, counted_layout_reads):
    """Repeated lookups reuse the layout; set_adapter, disable_adapter and a re-added adapter take effect at once."""
    pm, task = _two_adapter_peft(tiny_model_dir("llama"), causal=True)
    lookup = maskpatch.active_layout

    assert [lookup(pm).num_virtual_tokens for _ in range(5)] == [4] * 5
    assert counted_layout_reads == ["a"]

    pm.set_adapter("b")
    assert [lookup(pm).num_virtual_tokens for _ in range(5)] == [6] * 5
    pm.set_adapter("a")
    assert lookup(pm).num_virtual_tokens == 4
    assert counted_layout_reads == ["a", "b"]

    with pm.disable_adapter():
        assert lookup(pm).num_virtual_tokens == 0
    assert lookup(pm).num_virtual_tokens == 4
    assert counted_layout_reads == ["a", "b"]

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm.delete_adapter("b")
        pm.add_adapter("b", _prompt_config(3, task))  # same name, new config object: not the stale 6
    pm.set_adapter("b")
    assert lookup(pm).num_virtual_tokens == 3
    assert counted_layout_reads == ["a", "b", "b"]


def test_patched_encode_reads_the_layout_once_and_follows_set_adapter(tiny_bert, counted_layout_reads):
    """Encodes through a patched model reuse one layout read; after set_adapter the repair uses the new M."""
    model = st_model(tiny_bert)
    model[0].model, _ = _two_adapter_peft(tiny_bert)
    with maskpatch.patched(model, policy="extend"):
        for _ in range(3):
            encode(model, TEXTS)
        assert counted_layout_reads == ["a"]
        model[0].model.set_adapter("b")
        out = encode(model, TEXTS)  # a stale M of 4 against a drift of 6 would raise DriftError
    assert out.shape[0] == len(TEXTS)
    assert counted_layout_reads == ["a", "b"]


def test_a_patched_model_with_a_warm_layout_cache_pickles_and_repairs_the_same(tiny_bert):
    """The cache lives in maskpatch, not on the model: a pickled copy is patched and encodes the same."""
    model = prompt_model(tiny_bert)
    maskpatch.apply(model, policy="extend")
    before = encode(model, TEXTS)
    copy = pickle.loads(pickle.dumps(model))
    assert maskpatch.is_patched(copy)
    assert torch.allclose(encode(copy, TEXTS), before, atol=1e-6)
