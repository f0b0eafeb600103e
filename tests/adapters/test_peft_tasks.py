"""The PEFT task table: an unknown task class is refused loudly, never guessed at.

Invariant protected: silent wrong results are refused. Before the table, a PeftModel of a task
class maskpatch did not know was patched with encoder fields, so its own token-level outputs
(whatever they are) were neither checked nor cut. Now ``apply`` raises
:class:`UnsupportedModelError` naming the class and the supported ones, and installs nothing.
"""

from __future__ import annotations

import pytest
import torch
from test_peft_encoders import M, _mask, peft_model

import maskpatch
from maskpatch.errors import UnsupportedModelError

from helpers import assert_no_residue, residue_snapshot

pytestmark = [pytest.mark.filterwarnings("ignore:.*[Tt]oken type ids.*")]


def _unknown_task_model():
    """A prompt-tuned PeftModel whose class is a task class of its own (a forward of its own) that has no row."""
    from peft import PeftModel

    pm = peft_model("FEATURE_EXTRACTION")

    def forward(self, input_ids=None, attention_mask=None, **kwargs):  # prepends M virtual tokens, like every task
        return self.base_model(inputs_embeds=self.prompt_encoder["default"].embedding.weight.expand(1, -1, -1))

    pm.__class__ = type("PeftModelForNewTask", (PeftModel,), {"forward": forward})
    return pm


def test_unknown_task_class_is_refused_naming_it_and_the_supported_ones():
    pm = _unknown_task_model()
    before = residue_snapshot(pm)
    with pytest.raises(UnsupportedModelError) as raised:
        maskpatch.apply(pm)
    message = str(raised.value)
    assert "PeftModelForNewTask" in message
    assert "PeftModelForFeatureExtraction" in message and "PeftModelForCausalLM" in message
    assert not maskpatch.is_patched(pm)
    assert_no_residue(before, pm)


def test_subclass_of_a_known_task_class_uses_its_row():
    """A user's subclass of a supported task class is that task: patched, and the text-alone invariant holds."""
    from peft import PeftModelForFeatureExtraction

    pm = peft_model("FEATURE_EXTRACTION")
    pm.__class__ = type("MyFeatureExtraction", (PeftModelForFeatureExtraction,), {})
    alone = torch.tensor([[7, 8, 9, 10]])
    with torch.no_grad():
        reference = pm(input_ids=alone, attention_mask=_mask(alone)).last_hidden_state[:, M:]
    with maskpatch.patched(pm, policy="strip"), torch.no_grad():
        out = pm(input_ids=alone, attention_mask=_mask(alone)).last_hidden_state
    torch.testing.assert_close(out, reference, atol=1e-5, rtol=0)


def test_plain_peft_model_is_still_patched():
    """The plain PeftModel (no task type: LoRA and friends) keeps its row: apply works as before."""
    from peft import PeftModel

    pm = peft_model("FEATURE_EXTRACTION")
    pm.__class__ = PeftModel
    with maskpatch.patched(pm) as handle:
        assert handle.active


def test_positional_call_binds_like_the_keyword_call():
    """A positional call of a patched PeftModel is rewritten like the same call by keyword (the names are cached)."""
    pm = peft_model("FEATURE_EXTRACTION")
    batch = torch.tensor([[7, 8, 9, 10, 0], [11, 12, 13, 14, 15]])
    with maskpatch.patched(pm, policy="strip"), torch.no_grad():
        by_keyword = pm(input_ids=batch, attention_mask=_mask(batch)).last_hidden_state
        by_position = pm(batch, _mask(batch)).last_hidden_state
        with pytest.raises(TypeError, match="multiple values for argument 'input_ids'"):
            pm(batch, input_ids=batch)
    assert by_position.shape[1] == batch.shape[1]
    torch.testing.assert_close(by_position, by_keyword, atol=0, rtol=0)
