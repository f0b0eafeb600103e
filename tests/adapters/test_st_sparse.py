"""SparseEncoder (SPLADE: fill-mask Transformer + SpladePooling) with a prompt-learning adapter.

Invariants protected here, on a tiny random BertForMaskedLM with MiniLM's tokenizer (M=4):

* without maskpatch, ``SparseEncoder.encode`` crashes (SpladePooling multiplies (B, N+M, V) MLM
  logits by an (B, N) mask);
* under every policy the sparse embedding equals one computed by hand: the PEFT model run by hand
  (prompt + word embeddings, extended mask, base MLM), then ``max``/``sum`` of
  ``log1p(relu(logits))`` over exactly the positions the policy names;
* the embedding of a text alone equals its embedding inside a padded batch (max abs diff <= 1e-5);
* prefix tuning (no token-level drift) comes out bit-identical to the unpatched model.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import Tensor

import maskpatch

from conftest import TEXTS, minilm_path
from helpers import add_prompt_learning, policy_mask

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*not supported for parameter efficient tuning.*"),
    pytest.mark.filterwarnings("ignore:.*token_type_ids.*"),
]

M = 4
TOL = 1e-5


@pytest.fixture(scope="module")
def mlm_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A tiny random BertForMaskedLM saved with MiniLM's tokenizer."""
    import transformers

    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=30522, hidden_size=32, num_attention_heads=4, intermediate_size=64, num_hidden_layers=2
    )
    path = tmp_path_factory.mktemp("mlm") / "bert-mlm"
    transformers.BertForMaskedLM(config).save_pretrained(path)
    transformers.AutoTokenizer.from_pretrained(minilm_path()).save_pretrained(path)
    return str(path)


def sparse_encoder(path: str, *, pooling: str = "max", kind: str = "prompt"):
    """A SparseEncoder (fill-mask Transformer + SpladePooling) of ``path`` with a ``kind`` adapter."""
    from sentence_transformers import SparseEncoder
    from sentence_transformers.base.modules.transformer import Transformer
    from sentence_transformers.sparse_encoder.modules import SpladePooling

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        transformer = Transformer(path, transformer_task="fill-mask")
    model = SparseEncoder(modules=[transformer, SpladePooling(pooling_strategy=pooling)], device="cpu")
    model = add_prompt_learning(model, kind=kind, m=M)
    model.eval()
    return model


def encode(model, texts: list[str]) -> Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return model.encode(texts, convert_to_tensor=True, convert_to_sparse_tensor=False, batch_size=len(texts))


def mlm_logits_by_hand(model, features) -> Tensor:
    """Run the PEFT MLM by hand: (B, M+N, V) logits; positions follow the extended mask."""
    pm = model[0].model
    ids, mask = features["input_ids"], features["attention_mask"]
    embeds = torch.cat([pm.get_prompt(batch_size=ids.shape[0]), pm.word_embeddings(ids)], dim=1)
    full = torch.cat([torch.ones(ids.shape[0], M, dtype=mask.dtype), mask], dim=1)
    positions = (full.long().cumsum(-1) - 1).clamp(min=0)  # a pad repeats the position before it
    with torch.no_grad():
        return pm.base_model(inputs_embeds=embeds, attention_mask=full, position_ids=positions).logits


def splade_by_hand(logits: Tensor, mask: Tensor, strategy: str) -> Tensor:
    """``strategy`` (max/sum) of log1p(relu(logits)) over the positions where ``mask`` is 1, row by row."""
    rows = []
    for b in range(logits.shape[0]):
        scores = torch.log1p(torch.relu(logits[b, mask[b].nonzero().flatten()]))
        rows.append(scores.max(0).values if strategy == "max" else scores.sum(0))
    return torch.stack(rows)


def test_unpatched_sparse_encoder_crashes_on_prompt_tuning(mlm_dir):
    """The problem exists: SpladePooling cannot combine N+M logits with the N-column mask."""
    model = sparse_encoder(mlm_dir)
    with pytest.raises(RuntimeError, match="must match the size"):
        encode(model, TEXTS)


@pytest.mark.parametrize("pooling", ["max", "sum"])
@pytest.mark.parametrize("policy", maskpatch.POLICIES)
def test_splade_equals_reference_and_is_batch_invariant(mlm_dir, policy, pooling):
    """Each policy pools exactly its positions of the PEFT MLM logits, whatever the padding."""
    model = sparse_encoder(mlm_dir, pooling=pooling)
    features = model.preprocess(TEXTS)
    logits = mlm_logits_by_hand(model, features)
    if policy == "strip":
        logits = logits[:, M:]
    expected = splade_by_hand(logits, policy_mask(features["attention_mask"], M, policy), pooling)

    with maskpatch.patched(model, policy=policy):
        assert maskpatch.is_patched(model)
        batch = encode(model, TEXTS)
        alone = torch.cat([encode(model, [text]) for text in TEXTS])
    assert not maskpatch.is_patched(model)

    assert batch.shape == (len(TEXTS), 30522)
    assert (batch - expected).abs().max() <= TOL
    assert (batch - alone).abs().max() <= TOL


def test_policies_differ_only_in_virtual_positions(mlm_dir):
    """extend pools the virtual tokens too, so its max-pooled weights are >= strip's; ignore equals strip."""
    model = sparse_encoder(mlm_dir)
    out = {}
    for policy in maskpatch.POLICIES:
        with maskpatch.patched(model, policy=policy):
            out[policy] = encode(model, TEXTS)
    assert (out["ignore"] - out["strip"]).abs().max() <= TOL
    assert bool((out["extend"] >= out["strip"] - TOL).all())
    assert (out["extend"] - out["strip"]).abs().max() > 1e-3


@pytest.mark.parametrize("policy", maskpatch.POLICIES)
def test_prefix_tuning_sparse_encoder_is_bit_identical(mlm_dir, policy):
    """Prefix tuning adds no positions: the patched SparseEncoder returns exactly what it did before."""
    model = sparse_encoder(mlm_dir, kind="prefix")
    before = encode(model, TEXTS)
    with maskpatch.patched(model, policy=policy):
        during = encode(model, TEXTS)
    assert torch.equal(before, during)
