"""``PoolingRealColumnsHook``: under ``ignore``, a Pooling that reads positions by column sees the real columns only.

sentence-transformers before 6.2 (weightedmean's weights), before 5.5 (cls takes column 0) and
before 5.3 (``include_prompt=False`` cuts the first columns) read positions by column. There
maskpatch hands ``Pooling`` a copy of the features cut to the ``N`` real columns and puts the
``M + N`` back in its output. The compat subset checks the repair on those releases; here, on the
pinned 6.2 (whose Pooling follows the mask), the hook is forced on to protect what it must not
change:

* every pooling mode under ``ignore`` still gives the hand reference (the text alone, pooled by
  hand over its real tokens from the unpatched PEFT model), alone and in a padded batch;
* ``include_prompt=False`` still cuts the instruction from the real tokens;
* the features that leave ``Pooling`` carry all ``M + N`` columns (``ignore``'s contract) and no
  private key, and the caller's mask is not modified.
"""

from __future__ import annotations

import pytest
import torch

import maskpatch
import maskpatch.adapters.sentence_transformers.adapter as st_adapter
from maskpatch.adapters.sentence_transformers import PoolingRealColumnsHook
from maskpatch.handle import iter_hooks

from conftest import TEXTS
from helpers import add_prompt_learning, encode, exclude_instruction, peft_token_embeddings, pool_by_hand, st_model

M = 4
ATOL = 1e-5
MODES = ("mean", "max", "cls", "lasttoken", "mean_sqrt_len_tokens", "weightedmean")


@pytest.fixture
def by_column(monkeypatch):
    """Plan as on sentence-transformers < 6.2."""
    monkeypatch.setattr(st_adapter, "pooling_reads_by_column", lambda: True)


@pytest.mark.parametrize("mode", MODES)
def test_every_mode_under_ignore_gives_the_hand_reference(tiny_model_dir, by_column, mode):
    model = add_prompt_learning(st_model(tiny_model_dir("bert"), pooling=mode), m=M)
    with maskpatch.patched(model, policy="ignore"):
        assert any(isinstance(hook, PoolingRealColumnsHook) for _, _, hook in iter_hooks(model))
        batch = encode(model, TEXTS)
        alone = [encode(model, [text])[0] for text in TEXTS]
    for i, text in enumerate(TEXTS):
        features = dict(model.preprocess([text]))
        tokens = peft_token_embeddings(model, features, position_ids=True)[:, M:]
        expected = pool_by_hand(tokens, features["attention_mask"], mode)[0]
        torch.testing.assert_close(alone[i], expected, atol=ATOL, rtol=0)
        torch.testing.assert_close(batch[i], expected, atol=ATOL, rtol=0)


def test_the_instruction_is_cut_from_the_real_tokens(tiny_model_dir, by_column):
    model = add_prompt_learning(st_model(tiny_model_dir("bert"), include_prompt=False), m=M)
    prompt = "query: "
    with maskpatch.patched(model, policy="ignore"):
        got = encode(model, TEXTS[:2], prompt=prompt)
    for i, text in enumerate(TEXTS[:2]):
        features = dict(model.preprocess([prompt + text]))
        count = len(model.tokenizer(prompt, add_special_tokens=False)["input_ids"]) + 1  # [CLS] + the prompt
        tokens = peft_token_embeddings(model, features, position_ids=True)[:, M:]
        expected = pool_by_hand(tokens, exclude_instruction(features["attention_mask"], count), "mean")[0]
        torch.testing.assert_close(got[i], expected, atol=ATOL, rtol=0)


def test_pooling_output_carries_every_column_and_the_callers_dict_is_untouched(tiny_model_dir, by_column):
    model = add_prompt_learning(st_model(tiny_model_dir("bert"), pooling="cls"), m=M)
    features = dict(model.preprocess(TEXTS))
    mask = features["attention_mask"].clone()
    with maskpatch.patched(model, policy="ignore"), torch.no_grad():
        out = model(features)
    n = features["input_ids"].shape[1]
    assert out["token_embeddings"].shape[1] == M + n
    assert torch.equal(out["attention_mask"][:, :M], torch.zeros(len(TEXTS), M, dtype=out["attention_mask"].dtype))
    assert not [key for key in out if str(key).startswith("maskpatch_")]
    assert torch.equal(features["attention_mask"], mask)  # the caller's mask, not the Pooling's cut view
