"""The hot path does no work it does not need on every forward (issue 11, item 6). Nothing here is timed.

Invariants protected here:

* no message is formatted on a forward that raises and warns nothing: the ``Transformer`` output
  hook formats its drift message only for a drift it refuses, and the padding-limit hook formats
  its case only when it reports one (a right-padded T5 batch formats nothing; the first
  left-padded one still warns, naming the cause);
* the position-id hook looks up the generation cache (``cache_name_in``) only when the forward
  passes one: a sentence-transformers forward never does;
* the ``Transformer`` pre-hook that keeps a position hook on the PEFT base model finds a new PEFT
  model swapped in after it remembered the old one's hook, and a removed install's key is not
  trusted: the repair follows the model, not a stale memo.

The first three tests fail on the hot path before this change (it formatted the messages and
looked up the cache on every forward); the last guards the memo that replaced the scan.
"""

from __future__ import annotations

import warnings
from typing import Any

import pytest
import torch

import maskpatch
import maskpatch.hooks
from maskpatch import MaskpatchWarning
from maskpatch.handle import iter_hooks
from maskpatch.limits import PaddingLimitHook

from conftest import TEXTS
from helpers import add_prompt_learning, encode, st_model

M = 4
TOL = 1e-5


class CountingStr(str):
    """A ``str`` that counts how often it is formatted into a message (``repr``, ``str`` or an f-string)."""

    uses = 0

    def __repr__(self) -> str:
        CountingStr.uses += 1
        return super().__repr__()

    def __str__(self) -> str:
        CountingStr.uses += 1
        return super().__str__()

    def __format__(self, spec: str) -> str:
        CountingStr.uses += 1
        return super().__format__(spec)


@pytest.fixture
def counting() -> type[CountingStr]:
    CountingStr.uses = 0
    return CountingStr


def _forward(model, texts: list[str]) -> dict[str, Any]:
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return model(dict(model.preprocess(texts)))


@pytest.mark.parametrize("policy", maskpatch.POLICIES)
def test_the_output_hook_formats_no_message_on_a_repaired_forward(tiny_model_dir, counting, policy):
    """The drift message names the output key: it is built only for a drift that is refused."""
    model = add_prompt_learning(st_model(tiny_model_dir("bert")), m=M)
    model[0].module_output_name = counting("token_embeddings")
    with maskpatch.patched(model, policy=policy):
        out = _forward(model, TEXTS)
    width = out["token_embeddings"].shape[1]
    assert out["attention_mask"].shape[1] == width  # repaired (all three policies line the two up)
    assert counting.uses == 0


def test_the_padding_limit_hook_formats_its_case_only_when_it_reports(tiny_model_dir, counting):
    """A right-padded T5 batch formats no message; the first left-padded batch still warns with the cause."""
    model = add_prompt_learning(st_model(tiny_model_dir("t5"), padding_side="right"), m=M)
    with maskpatch.patched(model):
        _forward(model, TEXTS[:1])  # the lazy limit hook goes in with the first forward
        hooks = [hook for _, _, hook in iter_hooks(model) if isinstance(hook, PaddingLimitHook)]
        assert len(hooks) == 1 and hooks[0].reason is not None
        hooks[0].reason = counting(hooks[0].reason)
        _forward(model, TEXTS)
        assert counting.uses == 0
        model[0].tokenizer.padding_side = "left"
        try:
            with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                model(dict(model.preprocess(TEXTS)))
        finally:
            model[0].tokenizer.padding_side = "right"
    messages = [str(w.message) for w in caught if issubclass(w.category, MaskpatchWarning)]
    assert len(messages) == 1 and "'left-padding'" in messages[0] and "T5" in messages[0]
    assert counting.uses > 0  # the cause was formatted, into the warning


def test_position_ids_look_up_the_cache_only_when_one_is_passed(tiny_model_dir, monkeypatch):
    """A sentence-transformers forward passes no cache: the cache lookup (which can refuse two) does not run."""
    calls: list[object] = []
    original = maskpatch.hooks.cache_name_in

    def counted(kwargs: Any) -> Any:
        calls.append(kwargs)
        return original(kwargs)

    monkeypatch.setattr(maskpatch.hooks, "cache_name_in", counted)
    model = add_prompt_learning(st_model(tiny_model_dir("bert"), padding_side="left"), m=M)
    with maskpatch.patched(model):
        batch = encode(model, TEXTS)
        alone = encode(model, TEXTS[:1])
    assert (batch[0] - alone[0]).abs().max() < TOL  # the position ids still went in: batch invariant
    assert calls == []


def test_a_peft_model_swapped_in_after_warm_forwards_gets_its_own_position_hook(tiny_model_dir):
    """The Transformer pre-hook remembers the position hook it saw; a new PEFT model is still repaired."""
    model = add_prompt_learning(st_model(tiny_model_dir("bert"), padding_side="left"), m=M)
    second = add_prompt_learning(st_model(tiny_model_dir("bert")), m=M, seed=1)[0].model  # its own base model
    with maskpatch.patched(model, policy="extend"):
        encode(model, TEXTS)
        encode(model, TEXTS)  # the pre-hook now remembers the first PEFT model's position hook
        first = model[0].model
        model[0].model = second
        try:
            batch = encode(model, TEXTS)
            alone = encode(model, TEXTS[:1])
            held = [hook for _, _, hook in iter_hooks(second) if isinstance(hook, maskpatch.hooks.PositionIdsHook)]
        finally:
            model[0].model = first
    assert len(held) == 1 and held[0].peft_model is second
    assert (batch[0] - alone[0]).abs().max() < TOL  # left-padded and batch invariant: the new model's repair
