"""The hostile review's method, kept: bad inputs swept over the public API (grow this table with every bug found).

Invariant protected here, for every row: the call raises a :class:`maskpatch.MaskpatchError` whose
message names what was expected and what was found, and the model is left bit-identical: its
modules, their ``__dict__`` and hook dicts, the classes maskpatch touches (the residue check of
``tests/helpers.py``), and its outputs on a fixed batch. Rows run on an unpatched model, or on one
patched beforehand (``state``), which must then be exactly as patched before the bad call.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest
import torch
from test_hostile_findings import IDS, MASK, Prepends, prompt_tuned
from torch import nn

import maskpatch
from maskpatch.auto import autoenable

from helpers import add_prompt_learning, assert_no_residue, encode, residue_snapshot, st_model

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*not supported for parameter efficient tuning.*"),
    pytest.mark.filterwarnings("ignore:.*[Tt]oken type ids.*"),
    pytest.mark.filterwarnings("ignore::maskpatch.MaskpatchWarning"),
]

X = torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(0))
TEXTS = ["hello world", "a considerably longer sentence, so that the first one is padded"]


@dataclass(frozen=True)
class Case:
    """One bad call: on ``target`` (patched with ``state`` first, when given), ``call`` raises ``error``."""

    name: str
    target: str
    call: Callable[[Any], Any]
    error: type[maskpatch.MaskpatchError]
    expected: str
    found: str
    state: dict[str, Any] = field(default_factory=dict)


def forward(**kwargs: Any) -> Callable[[Any], Any]:
    def run(model: Any) -> Any:
        with torch.no_grad():
            return model(**{"input_ids": IDS, "attention_mask": MASK, **kwargs})

    return run


def patched_block(**options: Any) -> Callable[[Any], Any]:
    def run(model: Any) -> None:
        with maskpatch.patched(model, **options):
            pass

    return run


STRIP = {"policy": "strip"}
PREPENDED = {"policy": "strip", "prepended_tokens": 3}
P, U, A = maskpatch.PolicyError, maskpatch.UnsupportedModelError, maskpatch.AlreadyPatchedError

CASES = [
    # policies
    *(
        Case(
            f"apply-policy-{bad!r}",
            "pm",
            lambda m, bad=bad: maskpatch.apply(m, policy=bad),
            P,
            "expected a policy",
            repr(bad),
        )
        for bad in ("banana", None, 3, "EXTEND", ("extend",))
    ),
    Case("patched-policy", "st", patched_block(policy="banana"), P, "expected a policy", "'banana'"),
    # objects that are not models
    *(
        Case(
            f"apply-{type(bad).__name__}",
            "pm",
            lambda m, bad=bad: maskpatch.apply(bad),
            U,
            "expected a torch.nn.Module",
            found,
        )
        for bad, found in (("model", "str"), (None, "NoneType"), ({"a": 1}, "dict"), (3, "int"))
    ),
    Case("remove-str", "pm", lambda m: maskpatch.remove("model"), U, "expected a torch.nn.Module", "str"),
    Case("apply-linear", "pm", lambda m: maskpatch.apply(nn.Linear(2, 2)), U, "registered adapters", "Linear"),
    # prepended_tokens
    *(
        Case(
            f"count-{found}"[:24],
            "module",
            lambda m, bad=bad: maskpatch.apply(m, prepended_tokens=bad),
            P,
            "expected prepended_tokens to be a positive int",
            found,
        )
        for bad, found in (
            (0, "0"),
            (-1, "-1"),
            (True, "True"),
            (2.5, "2.5"),
            ("4", "'4'"),
            (10**30, str(10**30)),
            (10**100, "... (int)"),
        )
    ),
    # a second install that asks for something else
    Case("policy-change", "st", lambda m: maskpatch.apply(m, policy="extend"), A, "policy 'strip'", "'extend'", STRIP),
    Case(
        "count-change",
        "module",
        lambda m: maskpatch.apply(m, policy="strip", prepended_tokens=4),
        A,
        "prepended_tokens=3",
        "prepended_tokens=4",
        PREPENDED,
    ),
    Case(
        "count-on-st",
        "st",
        lambda m: maskpatch.apply(m, policy="strip", prepended_tokens=3),
        A,
        "prepended_tokens=3 was asked",
        "another adapter",
        STRIP,
    ),
    # masks for extend / ignore
    Case(
        "output-mask-unpatched",
        "pm",
        lambda m: maskpatch.output_mask(m, MASK),
        U,
        "expected a model patched",
        "is not patched",
    ),
    Case(
        "output-mask-str", "pm", lambda m: maskpatch.output_mask("model", MASK), U, "expected a torch.nn.Module", "str"
    ),
    *(
        Case(
            f"output-mask-{name}",
            "pm",
            lambda m, bad=bad: maskpatch.output_mask(m, bad),
            P,
            "expected attention_mask to be a torch.Tensor with 2 dimensions",
            found,
            STRIP,
        )
        for name, bad, found in (
            ("list", [[1, 1]], "list"),
            ("ndarray", np.ones((1, 2)), "numpy.ndarray"),
            ("none", None, "None"),
            ("1d", torch.ones(3), "shape (3,)"),
            ("3d", torch.ones(1, 2, 3), "shape (1, 2, 3)"),
        )
    ),
    Case(
        "prepended-mask-unpatched",
        "module",
        lambda m: maskpatch.prepended_mask(m, MASK),
        U,
        "expected a module patched",
        "has no such install",
    ),
    *(
        Case(
            f"prepended-mask-{name}",
            "module",
            lambda m, bad=bad: maskpatch.prepended_mask(m, bad),
            P,
            "expected mask to be a torch.Tensor with 2 dimensions",
            found,
            PREPENDED,
        )
        for name, bad, found in (("list", [[1, 1]], "list"), ("none", None, "None"), ("1d", torch.ones(3), "(3,)"))
    ),
    # forwards of a patched model with inputs it cannot take
    Case(
        "mask-4d",
        "pm",
        forward(attention_mask=torch.ones(2, 1, 7, 7)),
        P,
        "causal language models",
        "(2, 1, 7, 7)",
        STRIP,
    ),
    Case(
        "position-ids-text",
        "pm",
        forward(position_ids=[["a"]]),
        P,
        "expected position_ids to be a tensor",
        "list",
        STRIP,
    ),
    Case(
        "qa-list-start",
        "qa",
        forward(start_positions=[1, 2], end_positions=torch.tensor([3, 4])),
        P,
        "expected start_positions to be a torch.Tensor",
        "list",
        STRIP,
    ),
    Case(
        "qa-list-types",
        "qa",
        forward(token_type_ids=[[0] * 7] * 2),
        P,
        "expected token_type_ids to be a torch.Tensor",
        "list",
        STRIP,
    ),
    Case("mpt-no-task-ids", "mpt", forward(), P, "needs task_ids", "multitask prompt tuning adapter", STRIP),
    Case(
        "wrong-count",
        "module",
        lambda m: m(X[:, :, :]),
        maskpatch.DriftError,
        "7 positions",
        "(2, 8, 8)",
        {"policy": "strip", "prepended_tokens": 2},
    ),
    Case(
        "wrong-count-peft",
        "pm",
        forward(),
        maskpatch.DriftError,
        "9 positions",
        "(2, 11, 32)",
        {"policy": "strip", "prepended_tokens": 2},
    ),
    # auto-enable from code
    Case("enable-policy", "st", lambda m: autoenable.enable(policy="banana"), P, "expected a policy", "'banana'"),
    Case(
        "enable-adapters",
        "st",
        lambda m: autoenable.enable(disabled_adapters="nope"),
        P,
        "expected registered adapter names",
        "'nope'",
    ),
]


@pytest.fixture(scope="module")
def models(tiny_model_dir) -> dict[str, nn.Module]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return {
            "pm": prompt_tuned(),
            "qa": prompt_tuned("QUESTION_ANS"),
            "mpt": prompt_tuned(multitask=True),
            "module": Prepends(3),
            "st": add_prompt_learning(st_model(tiny_model_dir("bert"), include_prompt=False), m=4),
        }


def outputs(name: str, model: nn.Module) -> torch.Tensor:
    """The model's output on a fixed batch (what "bit-identical" compares)."""
    with torch.no_grad():
        if name == "st":
            return encode(model, TEXTS)
        if name == "module":
            return model(X) if not maskpatch.is_patched(model) else model(X[:, :5])
        kwargs = {"task_ids": torch.tensor([0, 2])} if name == "mpt" else {}
        out = model(input_ids=IDS, attention_mask=MASK, **kwargs)
        return out.start_logits if name == "qa" else out.last_hidden_state


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_bad_input_raises_a_named_error_and_leaves_the_model_bit_identical(models, case):
    """The call raises a MaskpatchError naming expected and found; modules, classes and outputs are unchanged."""
    model = models[case.target]
    handle = maskpatch.apply(model, **case.state) if case.state else None
    try:
        try:
            before_out = outputs(case.target, model)
        except maskpatch.DriftError:
            before_out = None  # the row's own state cannot run a forward (a wrong count): compared by residue only
        before = residue_snapshot(model)
        with pytest.raises(case.error) as info:
            case.call(model)
        assert isinstance(info.value, maskpatch.MaskpatchError)
        message = str(info.value)
        assert case.expected in message and case.found in message, message
        assert_no_residue(before, model)
        if before_out is not None:
            assert torch.equal(outputs(case.target, model), before_out)
        assert not autoenable.is_enabled()
    finally:
        if handle is not None:
            handle.remove()
    assert not maskpatch.is_patched(model)
