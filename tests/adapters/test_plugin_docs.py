"""The example adapter of docs/writing-an-adapter.md runs as written and keeps the adapter contract.

Invariants protected, for a third-party adapter built only from ``maskpatch.plugin``: batch
invariance (a text alone equals its row in a padded batch) and the policy's reference (computed by
hand from the unpatched module: extend pools the memory tokens, ignore and strip do not), under
every policy; ``plan`` changes nothing; ``remove`` leaves no residue; a deep copy of a patched model
stays patched.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import torch

import maskpatch
import maskpatch.plugin
from maskpatch.plugin import ForwardHook, InstallRecord

from helpers import state

PAGE = Path(__file__).resolve().parents[2] / "docs" / "writing-an-adapter.md"


def _example() -> str:
    section = PAGE.read_text(encoding="utf-8").split("## Example", 1)[1]
    return re.search(r"```python\n(.*?)```", section, flags=re.DOTALL).group(1)


@pytest.fixture
def example(capsys):
    """Run the page's example (its own asserts included); yield its namespace and what it printed."""
    namespace: dict = {"__name__": "plugin_docs_example"}
    try:
        exec(compile(_example(), str(PAGE), "exec"), namespace)
        yield namespace, capsys.readouterr().out
    finally:
        if any(a.name == "memory-encoder" for a in maskpatch.registered_adapters()):
            maskpatch.unregister_adapter("memory-encoder")


def test_docs_example_runs_and_prints_what_the_page_says(example):
    """The example's asserts hold (reference and batch invariance per policy); the drift it shows unpatched is real."""
    _, printed = example
    drift = float(re.search(r"unpatched: alone vs padded row differ by ([0-9.]+)", printed).group(1))
    assert drift > 0.1
    for policy in maskpatch.POLICIES:
        assert re.search(rf"^{policy}: alone vs padded row differ by ", printed, flags=re.MULTILINE)
    assert "unpatched: alone vs padded row differ by 0.852" in PAGE.read_text(encoding="utf-8")


def test_example_plan_is_pure_and_install_leaves_no_residue(example):
    """plan() changes neither the model nor its classes; apply then remove restores hook dicts and __dict__ exactly."""
    namespace, _ = example
    model = namespace["model"]
    (adapter,) = [a for a in maskpatch.plugin.registered_adapters() if a.name == "memory-encoder"]
    assert adapter.matches(model) and not adapter.matches(torch.nn.Linear(2, 2))
    before = state(model)
    classes = {cls: dict(vars(cls)) for cls in (type(model[0]), type(model[1]))}
    specs = adapter.plan(model, InstallRecord("extend", adapter.name, pinned=False))
    assert [type(s.hook) for s in specs] == [namespace["MemoryOutputHook"]] and specs[0].module is model[0]
    assert isinstance(specs[0].hook, ForwardHook)
    assert state(model) == before
    assert {cls: dict(vars(cls)) for cls in classes} == classes
    handle = maskpatch.apply(model, policy="strip")
    assert maskpatch.is_patched(model) and state(model) != before
    handle.remove()
    assert state(model) == before and not maskpatch.is_patched(model)


def test_example_copy_of_a_patched_model_stays_patched(example):
    """The example's hook is plain data: a deep copy of the patched model is patched and gives the same output."""
    namespace, _ = example
    model, batch = namespace["model"], namespace["batch"]
    with maskpatch.patched(model, policy="ignore"):
        twin = copy.deepcopy(model)
        with torch.no_grad():
            expected = model(batch)
    assert maskpatch.is_patched(twin) and not maskpatch.is_patched(model)
    with torch.no_grad():
        torch.testing.assert_close(twin(batch), expected, rtol=0, atol=0)
    assert maskpatch.remove(twin)


def test_example_hook_refuses_an_unexplained_excess(example):
    """An output longer than its mask by another amount than num_memory raises DriftError, never passes on."""
    namespace, _ = example
    module = namespace["model"][0]
    hook = namespace["MemoryOutputHook"](InstallRecord("strip", "memory-encoder", pinned=False))
    output = {"token_embeddings": torch.zeros(1, 4, 16), "attention_mask": torch.ones(1, 2, dtype=torch.long)}
    with pytest.raises(maskpatch.DriftError, match=r"expected token_embeddings 3 positions longer .* found 2"):
        hook(module, (), {}, output)
