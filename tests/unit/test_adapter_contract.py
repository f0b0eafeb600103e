"""ONE contract over every registered adapter, and the example plugin of docs/writing-an-adapter.md.

Invariants protected, per adapter (built-ins, the generic prepended-tokens one, x-transformers,
the pipeline and Trainer hosts, and the docs' third-party example):

* ``plan`` is pure: the model's modules (``__dict__``, hook dicts) and the classes maskpatch may
  touch are exactly as before (tests/helpers.py ``residue_snapshot``); its hooks are
  :class:`MaskpatchHook` instances of module-level classes bound to the record, on the model's own
  modules, and pickle; each is a :class:`ForwardPreHook` (``pre`` true) or a :class:`ForwardHook`;
* apply then remove leaves no residue, instance or class;
* behaviour: a text alone equals its row in a padded batch (batch invariance), and the outputs
  line up with the mask the adapter says goes with them (``maskpatch.output_mask``, or the host's
  own tokens); an adapter without the ``output_mask`` capability makes ``output_mask`` raise.

References are the model's own outputs for the text alone and in a batch, never maskpatch's
helpers. Adding an adapter means one row in :data:`CASES`: an adapter without one fails here.
"""

from __future__ import annotations

import pickle
import re
import sys
import types
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn

import maskpatch
from maskpatch.errors import PolicyError, UnsupportedModelError
from maskpatch.handle import HookSpec
from maskpatch.hooks import ForwardHook, ForwardPreHook, InstallRecord, MaskpatchHook
from maskpatch.registry import MaskAdapter, registered_adapters

from helpers import add_prompt_learning, assert_no_residue, residue_snapshot, st_model

pytestmark = [
    pytest.mark.filterwarnings("ignore::UserWarning"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),
]

M = 4
ALONE = torch.tensor([[7, 8, 9, 10]])
BATCH = torch.tensor([[7, 8, 9, 10, 0, 0], [11, 12, 13, 14, 15, 16]])
ATOL = 1e-5

#: (tokens alone, their mask, tokens of the padded batch, its mask): masks that line up with the tokens.
Lined = tuple[Tensor, Tensor, Tensor, Tensor]


@dataclass
class Case:
    """How to exercise one adapter: a sample it handles, apply's options, and the behaviour check."""

    sample: Callable[[Any, Path], object]
    behaviour: Callable[[object], Lined]
    options: dict[str, Any] = field(default_factory=dict)


def _mask(ids: Tensor) -> Tensor:
    return (ids != 0).long()


# --- samples ---------------------------------------------------------------------------------


def _st(tiny) -> nn.Module:
    return add_prompt_learning(st_model(tiny("bert"), include_prompt=False), m=M)


def _peft(tiny) -> nn.Module:
    return add_prompt_learning(st_model(tiny("bert")), m=M)[0].model.eval()


class Prepends(nn.Module):
    """A module that prepends ``m`` learned tokens and masks the caller's padding with torch's own layer."""

    def __init__(self, m: int = 3) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(50, 16)
        self.memory = nn.Parameter(torch.randn(m, 16))
        self.layer = nn.TransformerEncoderLayer(16, nhead=2, dim_feedforward=32, dropout=0.0, batch_first=True)

    def forward(self, ids: Tensor, mask: Tensor) -> Tensor:
        x = torch.cat([self.memory.expand(ids.shape[0], -1, -1), self.embed(ids)], dim=1)
        return self.layer(x, src_key_padding_mask=mask == 0)  # the caller's N-long mask: maskpatch extends it


def _xt(tiny) -> nn.Module:
    from x_transformers import Encoder, TransformerWrapper

    torch.manual_seed(0)
    layers = Encoder(dim=16, depth=1, heads=2)
    return TransformerWrapper(num_tokens=50, max_seq_len=32, num_memory_tokens=2, attn_layers=layers).eval()


def _pipeline(tiny, tmp_path) -> object:
    import transformers

    return transformers.pipeline("feature-extraction", model=_peft(tiny), tokenizer=tiny("bert"), device="cpu")


def _trainer(tiny, tmp_path) -> object:
    import transformers

    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), report_to=[], use_cpu=True, per_device_eval_batch_size=2
    )
    return transformers.Trainer(model=_peft(tiny), args=args)


# --- behaviour checks: run alone and in a padded batch, return tokens with the masks that line up


def _peft_behaviour(pm: Any) -> Lined:
    def run(ids: Tensor) -> tuple[Tensor, Tensor]:
        out = pm(input_ids=ids, attention_mask=_mask(ids)).last_hidden_state
        return out, maskpatch.output_mask(pm, _mask(ids))

    return (*run(ALONE), *run(BATCH))


def _st_behaviour(model: Any) -> Lined:
    def run(texts: list[str]) -> tuple[Tensor, Tensor]:
        features = model.tokenize(texts)
        out = model(dict(features))["token_embeddings"]
        return out, maskpatch.output_mask(model, features["attention_mask"])

    return (*run(["hello world"]), *run(["hello world", "a much longer sentence that needs padding"]))


def _generic_behaviour(module: Any) -> Lined:
    def run(ids: Tensor) -> tuple[Tensor, Tensor]:
        return module(ids, _mask(ids)), maskpatch.output_mask(module, _mask(ids))

    return (*run(ALONE), *run(BATCH))


def _xt_behaviour(model: Any) -> Lined:
    from maskpatch.adapters.x_transformers import output_mask as xt_mask

    with pytest.raises(PolicyError, match="per call"):  # the count is per call: the adapter says where to ask
        maskpatch.output_mask(model, _mask(ALONE))

    def run(ids: Tensor) -> tuple[Tensor, Tensor]:
        out = model(ids, mask=_mask(ids).bool(), return_embeddings=True)
        return out, xt_mask(model, _mask(ids))

    return (*run(ALONE), *run(BATCH))


def _pipeline_behaviour(pipe: Any) -> Lined:
    texts = ["hello world", "a much longer sentence that needs padding"]
    n = len(pipe.tokenizer(texts[0])["input_ids"])
    alone = torch.tensor(pipe(texts[0]))  # (1, N, H): the host's own tokens
    batch = torch.tensor(pipe(texts, batch_size=2)[0])[:, :n]
    ones = torch.ones(1, n, dtype=torch.long)
    assert alone.shape[1] == n, f"the pipeline's output has {alone.shape[1]} positions for {n} tokens"
    return alone, ones, batch, ones


def _trainer_behaviour(trainer: Any) -> Lined:
    def rows(ids: Tensor) -> list[dict[str, Tensor]]:
        return [{"input_ids": i, "attention_mask": _mask(i)} for i in ids]

    def predict(ids: Tensor) -> Tensor:
        predictions = trainer.predict(rows(ids)).predictions
        predictions = predictions[0] if isinstance(predictions, tuple) else predictions
        assert predictions.shape[1] == ids.shape[1], "evaluation outputs do not line up with the label positions"
        return torch.as_tensor(predictions)

    return predict(ALONE), _mask(ALONE), predict(BATCH), _mask(BATCH)


#: adapter name -> how to exercise it. An adapter registered without a row fails the contract.
CASES: dict[str, Case] = {
    "sentence-transformers": Case(lambda tiny, _: _st(tiny), _st_behaviour),
    "peft": Case(lambda tiny, _: _peft(tiny), _peft_behaviour),
    "x-transformers": Case(lambda tiny, _: _xt(tiny), _xt_behaviour),
    "pipeline": Case(_pipeline, _pipeline_behaviour),
    "trainer": Case(_trainer, _trainer_behaviour),
    "prepended-tokens": Case(lambda tiny, _: Prepends().eval(), _generic_behaviour, {"prepended_tokens": 3}),
}

PAGE = Path(__file__).resolve().parents[2] / "docs" / "writing-an-adapter.md"
EXAMPLE = "memory-encoder"


@pytest.fixture
def docs_example():
    """Run the docs page's example adapter (it registers itself); unregister it afterwards."""
    section = PAGE.read_text(encoding="utf-8").split("## Example", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, flags=re.DOTALL).group(1)
    module = types.ModuleType("contract_docs_example")  # importable while it runs, so its hooks pickle
    sys.modules[module.__name__] = module
    try:
        exec(compile(code, str(PAGE), "exec"), module.__dict__)
        yield module.__dict__
    finally:
        del sys.modules[module.__name__]
        if any(a.name == EXAMPLE for a in registered_adapters()):
            maskpatch.unregister_adapter(EXAMPLE)


def _docs_behaviour(model: Any) -> Lined:
    with pytest.raises(UnsupportedModelError, match="provides no output_mask"):  # no capability: said loudly
        maskpatch.output_mask(model, _mask(ALONE))

    def run(ids: Tensor) -> tuple[Tensor, Tensor]:
        out = model[0]({"input_ids": ids, "attention_mask": _mask(ids)})
        return out["token_embeddings"], out["attention_mask"]  # the family lines its own mask up

    return (*run(ALONE), *run(BATCH))


def _planner(adapter: Any, options: dict[str, Any]) -> Any:
    # An adapter selected by an option (prepended_tokens=M) plans as configured by it.
    return adapter.with_count(options["prepended_tokens"]) if "prepended_tokens" in options else adapter


def _check_contract(adapter: Any, sample: object, case: Case) -> None:
    model = adapter.model_of(sample) if hasattr(adapter, "model_of") else sample
    assert isinstance(model, nn.Module)
    # The first public name looked up on maskpatch guards adapter loads process-wide (class-level
    # wrappers, maskpatch.provenance): not residue of an install, so it happens before the snapshot
    # (else the first test of a fresh process fails).
    apply = maskpatch.apply
    before = residue_snapshot(model)
    record = InstallRecord("extend", adapter.name, pinned=True)

    specs = _planner(adapter, case.options).plan(sample, record)

    assert_no_residue(before, model)  # plan is pure: instance and class state unchanged
    assert specs and all(isinstance(spec, HookSpec) for spec in specs)
    submodules = {id(m) for m in model.modules()}
    for spec in specs:
        assert id(spec.module) in submodules
        assert isinstance(spec.hook, MaskpatchHook) and spec.hook.record is record
        # Typed by kind: register() picks torch's pre-hook or forward-hook registry from ``pre``.
        kind = ForwardPreHook if spec.hook.pre else ForwardHook
        assert isinstance(spec.hook, kind) and not isinstance(
            spec.hook, ForwardHook if spec.hook.pre else ForwardPreHook
        ), f"{type(spec.hook).__qualname__} (pre={spec.hook.pre}) should derive from {kind.__name__} alone"
        assert "<locals>" not in type(spec.hook).__qualname__
        assert type(pickle.loads(pickle.dumps(spec.hook))) is type(spec.hook)

    if getattr(adapter, "plans_parts_exactly", False):
        # The capability's promise: a part the adapter handles is planned as within the whole, so a
        # join on it can be decided from the install record (apply(model) then apply(model[0])).
        # Checked on the sample's own parts and on the sample as a part of a container.
        container = nn.ModuleList([model])
        pairs = [(model, child) for child in model.children() if adapter.matches(child)] + [(container, model)]
        for whole_model, part in pairs:
            whole = {(id(spec.module), type(spec.hook)) for spec in adapter.plan(whole_model, record)}
            planned = {(id(spec.module), type(spec.hook)) for spec in adapter.plan(part, record)}
            assert planned and planned <= whole, f"{adapter.name} plans {type(part).__name__} differently alone"
        assert_no_residue(before, model)

    handle = apply(sample, policy="extend", **case.options)
    assert maskpatch.is_patched(sample) and handle.active
    handle.remove()
    assert not maskpatch.is_patched(sample) and not handle.active
    assert_no_residue(before, model)  # install then remove: no residue

    with maskpatch.patched(sample, policy="extend", **case.options), torch.no_grad():
        alone, alone_mask, batch, batch_mask = case.behaviour(sample)
    assert not maskpatch.is_patched(sample)

    assert alone.shape[1] == alone_mask.shape[1] and batch.shape[1] == batch_mask.shape[1], (
        f"outputs do not line up with their mask: {tuple(alone.shape)} vs {tuple(alone_mask.shape)}, "
        f"{tuple(batch.shape)} vs {tuple(batch_mask.shape)}"
    )
    real_alone, real_row = alone[0][alone_mask[0].bool()], batch[0][batch_mask[0].bool()]
    assert real_alone.shape == real_row.shape
    torch.testing.assert_close(real_alone, real_row, atol=ATOL, rtol=0)  # a text alone equals its padded row


ADAPTERS = registered_adapters()


@pytest.mark.parametrize("adapter", ADAPTERS, ids=[a.name for a in ADAPTERS])
def test_registered_adapter_keeps_the_contract(adapter, tiny_model_dir, tmp_path):
    assert adapter.name in CASES, f"add a Case for adapter {adapter.name!r} to CASES in {__file__}"
    case = CASES[adapter.name]
    sample = case.sample(tiny_model_dir, tmp_path)
    selected_by_option = bool(case.options)
    assert adapter.matches(sample) is not selected_by_option  # an option-selected adapter is never guessed
    _check_contract(adapter, sample, case)


def test_docs_example_plugin_keeps_the_contract(docs_example):
    (adapter,) = [a for a in registered_adapters() if a.name == EXAMPLE]
    model = docs_example["model"]
    assert adapter.matches(model) and not isinstance(adapter, MaskAdapter)
    _check_contract(adapter, model, Case(lambda tiny, _: model, _docs_behaviour))
