"""The one-way install path: an install is known through its record, not by scanning the model.

Invariants protected:
* ``is_patched``, ``output_mask``, ``handle.active`` and ``handle.remove()`` on the model ``apply``
  was called on go through the install record (torch's removable handles): they never walk the
  model's modules looking for hooks (O(hooks), not O(modules)); a copy made by ``deepcopy`` still
  is found by scanning, and removed;
* the record of the root does not keep a dropped model (and its install) alive.
"""

from __future__ import annotations

import copy
import gc
import warnings
import weakref

import pytest
import torch

import maskpatch
import maskpatch.handle

pytestmark = pytest.mark.filterwarnings("ignore:.*[Tt]oken type ids.*")

M = 4


def _prompt_tuned():
    import transformers
    from peft import PromptTuningConfig, TaskType, get_peft_model

    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64
    )
    config_p = PromptTuningConfig(task_type=TaskType.FEATURE_EXTRACTION, num_virtual_tokens=M)
    return get_peft_model(transformers.BertModel(config).eval(), config_p)


def _no_scan(*args, **kwargs):
    raise AssertionError("the model's modules were scanned for hooks")


def test_queries_on_the_original_go_through_the_record(monkeypatch):
    pm = _prompt_tuned()
    handle = maskpatch.apply(pm, policy="ignore")
    mask = torch.tensor([[1, 1, 0]])
    monkeypatch.setattr(maskpatch.handle, "iter_hooks", _no_scan)
    assert maskpatch.is_patched(pm)
    assert handle.active
    torch.testing.assert_close(maskpatch.output_mask(pm, mask), torch.tensor([[0, 0, 0, 0, 1, 1, 0]]))
    handle.remove()
    monkeypatch.undo()
    assert not maskpatch.is_patched(pm)


def test_a_deep_copy_is_found_by_scanning_and_removed():
    pm = _prompt_tuned()
    handle = maskpatch.apply(pm)
    twin = copy.deepcopy(pm)
    handle.remove()
    assert maskpatch.is_patched(twin) and not maskpatch.is_patched(pm)
    assert maskpatch.remove(twin)
    assert not maskpatch.is_patched(twin)


def test_a_dropped_model_and_its_install_are_collected():
    pm = _prompt_tuned()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        record = weakref.ref(maskpatch.apply(pm)._record)
    del pm
    gc.collect()
    assert record() is None, "something keeps a dropped model's install alive"
