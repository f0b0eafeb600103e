"""The multi-vector (ColBERT-style) encoder with a prompt-learning adapter.

Invariants protected here, on a tiny random BERT with MiniLM's tokenizer (M=4), a token-level
projection, a ``MultiVectorMask`` with a punctuation skiplist and query expansion:

* without maskpatch, ``encode_query``/``encode_document`` crash (the MVE encode slicing indexes
  (N+M) token vectors with an N-long mask);
* under every policy each text's token vectors equal ones computed by hand: the PEFT model run by
  hand, the projection, the scoring mask computed by hand over the real tokens (attention mask,
  expansion positions for queries, skiplist for documents), and the policy's rule for the virtual
  tokens (``extend`` scores them, ``ignore`` drops them, ``strip`` cuts them), then L2 normalised;
* a text alone gives the same vectors as inside a padded batch (max abs diff <= 1e-5);
* prefix tuning (no token-level drift) comes out bit-identical to the unpatched model.
"""

from __future__ import annotations

import copy
import string
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

import maskpatch

from helpers import add_prompt_learning, peft_token_embeddings

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*not supported for parameter efficient tuning.*"),
    pytest.mark.filterwarnings("ignore:.*token_type_ids.*"),
]

M = 4
TOL = 1e-5
EXPANSION = 16
QUERIES = ["hello, world!", "what is the capital of france?", "short"]
DOCUMENTS = [
    "Paris is the capital of France.",
    "hi!",
    "a considerably longer document, with commas; semicolons and a full stop at the end.",
]


def multi_vector_encoder(path: str, *, kind: str = "prompt", attend: bool = False):
    """A MultiVectorEncoder: Transformer (query expansion), Dense(32->16), MultiVectorMask(punctuation), Normalize."""
    from sentence_transformers import MultiVectorEncoder
    from sentence_transformers.base.modules import Dense, Normalize
    from sentence_transformers.base.modules.transformer import Transformer
    from sentence_transformers.multi_vector_encoder.modules import MultiVectorMask

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        transformer = Transformer(path, query_expansion={"strategy": "fixed", "attend": attend, "length": EXPANSION})
        modules = [
            transformer,
            Dense(32, 16, bias=False, activation_function=torch.nn.Identity(), module_input_name="token_embeddings"),
            MultiVectorMask(skiplist_words=list(string.punctuation)),
            Normalize(module_input_name="token_embeddings"),
        ]
        model = MultiVectorEncoder(modules=modules, device="cpu")
    model = add_prompt_learning(model, kind=kind, m=M)
    model.eval()
    return model


def encode(model, texts: list[str], task: str) -> list[Tensor]:
    method = model.encode_query if task == "query" else model.encode_document
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return method(texts, batch_size=len(texts))


def skiplist_ids(model) -> Tensor:
    """The token ids of the punctuation skiplist, looked up in the tokenizer by hand."""
    tokenizer = model.tokenizer
    ids = [tokenizer.convert_tokens_to_ids(p) for p in string.punctuation]
    return torch.tensor([i for i in ids if i != tokenizer.unk_token_id])


def vectors_by_hand(model, texts: list[str], task: str, policy: str) -> list[Tensor]:
    """Each text's scored token vectors, computed without sentence-transformers' modules or maskpatch."""
    features = model.preprocess(texts, task=task)
    tokens = peft_token_embeddings(model, features, position_ids=True)  # (B, M+N, 32)
    with torch.no_grad():
        tokens = tokens @ model[1].linear.weight.T  # the projection, by hand
    ids, mask = features["input_ids"], features["attention_mask"].bool()
    if task == "query":
        scored = mask | features["query_expansion_positions"].bool()
    else:
        scored = mask & ~torch.isin(ids, skiplist_ids(model))
    if policy == "strip":
        tokens = tokens[:, M:]
    else:
        virtual = torch.full((len(texts), M), policy == "extend")
        scored = torch.cat([virtual, scored], dim=1)
    return [F.normalize(t[s], dim=-1) for t, s in zip(tokens, scored, strict=True)]


def max_abs_diff(a: list[Tensor], b: list[Tensor]) -> float:
    assert [x.shape for x in a] == [y.shape for y in b]
    return max(float((x - y).abs().max()) if x.numel() else 0.0 for x, y in zip(a, b, strict=True))


@pytest.fixture(scope="module")
def bert_dir(tiny_model_dir) -> str:
    return tiny_model_dir("bert")


@pytest.mark.parametrize("task", ["query", "document"])
def test_unpatched_multi_vector_encoder_crashes_on_prompt_tuning(bert_dir, task):
    """The problem exists: the encode slicing cannot index N+M token vectors with an N-long mask."""
    model = multi_vector_encoder(bert_dir)
    with pytest.raises(IndexError, match="does not match the shape"):
        encode(model, QUERIES if task == "query" else DOCUMENTS, task)


@pytest.mark.parametrize("attend", [False, True])
@pytest.mark.parametrize("task", ["query", "document"])
@pytest.mark.parametrize("policy", maskpatch.POLICIES)
def test_multi_vector_equals_reference_and_is_batch_invariant(bert_dir, policy, task, attend):
    """Skiplist and query expansion apply to the real tokens; the policy alone decides the virtual ones."""
    model = multi_vector_encoder(bert_dir, attend=attend)
    texts = QUERIES if task == "query" else DOCUMENTS
    expected = vectors_by_hand(model, texts, task, policy)

    with maskpatch.patched(model, policy=policy):
        batch = encode(model, texts, task)
        alone = [encode(model, [text], task)[0] for text in texts]

    assert max_abs_diff(batch, expected) <= TOL
    assert max_abs_diff(batch, alone) <= TOL
    real = len(vectors_by_hand(model, texts[:1], task, "strip")[0])
    assert len(batch[0]) == real + (M if policy == "extend" else 0)


def test_multi_vector_mask_sees_the_caller_features_unchanged(bert_dir):
    """maskpatch hands MultiVectorMask a copy: the dict the projection returned keeps its (M+N) mask."""
    model = multi_vector_encoder(bert_dir)
    seen: list[int] = []
    probe = model[1].register_forward_hook(lambda mod, args, out: seen.append(out["attention_mask"].shape[1]))
    try:
        with maskpatch.patched(model, policy="extend"):
            features = model.preprocess(DOCUMENTS, task="document")
            with torch.no_grad():
                out = model(dict(features), task="document")
    finally:
        probe.remove()
    n = features["input_ids"].shape[1]
    assert seen == [n + M]
    assert out["attention_mask"].shape == (len(DOCUMENTS), n + M)
    assert out["input_ids"].shape == (len(DOCUMENTS), n)


@pytest.mark.parametrize("task", ["query", "document"])
def test_prefix_tuning_multi_vector_is_bit_identical(bert_dir, task):
    """Prefix tuning adds no positions: the patched encoder returns exactly what it did before."""
    model = multi_vector_encoder(bert_dir, kind="prefix")
    texts = QUERIES if task == "query" else DOCUMENTS
    before = encode(model, texts, task)
    with maskpatch.patched(model, policy="extend"):
        during = encode(model, texts, task)
    assert all(torch.equal(x, y) for x, y in zip(before, during, strict=True))


@pytest.mark.parametrize("policy", ["extend", "ignore"])
def test_allowlist_restricts_the_real_tokens_and_the_policy_decides_the_virtual_ones(bert_dir, policy):
    """keep_only_token_ids keeps only listed real tokens (documents); virtual tokens follow the policy."""
    model = multi_vector_encoder(bert_dir)
    keep = model.tokenizer.convert_tokens_to_ids(["paris", "france", "hi"])
    model[2].keep_only_token_ids = keep
    features = model.preprocess(DOCUMENTS, task="document")
    tokens = peft_token_embeddings(model, features, position_ids=True)
    with torch.no_grad():
        tokens = tokens @ model[1].linear.weight.T
    ids, mask = features["input_ids"], features["attention_mask"].bool()
    scored = mask & ~torch.isin(ids, skiplist_ids(model)) & torch.isin(ids, torch.tensor(keep))
    scored = torch.cat([torch.full((len(DOCUMENTS), M), policy == "extend"), scored], dim=1)
    expected = [F.normalize(t[s], dim=-1) for t, s in zip(tokens, scored, strict=True)]

    with maskpatch.patched(model, policy=policy):
        batch = encode(model, DOCUMENTS, "document")
    assert max_abs_diff(batch, expected) <= TOL
    virtual = M if policy == "extend" else 0
    assert [len(v) for v in batch] == [2 + virtual, 1 + virtual, virtual]  # paris france / hi / nothing listed


def test_a_deep_copy_of_the_patched_encoder_stays_patched(bert_dir):
    """The MultiVectorMask hooks are plain objects: a deepcopy encodes like the original (and is unpatched apart)."""
    model = multi_vector_encoder(bert_dir)
    handle = maskpatch.apply(model, policy="extend")
    clone = copy.deepcopy(model)
    handle.remove()
    assert maskpatch.is_patched(clone) and not maskpatch.is_patched(model)
    expected = vectors_by_hand(model, DOCUMENTS, "document", "extend")
    assert max_abs_diff(encode(clone, DOCUMENTS, "document"), expected) <= TOL
    with pytest.raises(IndexError):
        encode(model, DOCUMENTS, "document")
