"""Patched models across process boundaries: pickle, deepcopy, torch.save, saved files, spawn workers.

Invariants protected, on a prompt-tuned tiny BERT (M = 4) inside a SentenceTransformer and as a
bare PeftModel:

* a pickled, deep-copied or ``torch.save``/``torch.load(weights_only=False)``-ed patched model is
  still patched: ``is_patched`` is true, it gives the original's embeddings and is batch invariant;
* ``maskpatch.remove(copy)`` is exact: no maskpatch object, the same ``__dict__`` keys and hook
  dicts as an unpatched copy, and bit-identical outputs to it; the original stays patched;
* nothing of maskpatch reaches ``state_dict``, ``PeftModel.save_pretrained`` or
  ``SentenceTransformer.save``: the saved files are byte-identical to an unpatched model's (but
  the model card's example similarities, which the patched model computes correctly);
* sentence-transformers' multi-process encoding (two spawned CPU workers, which receive the
  pickled model) returns the embeddings of single-process encoding.
"""

from __future__ import annotations

import copy
import io
import pickle
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

import maskpatch
from maskpatch.hooks import MaskpatchHook

from helpers import add_prompt_learning, encode, st_model, state

pytestmark = [
    pytest.mark.slow,
    pytest.mark.filterwarnings("ignore:.*not supported for parameter efficient tuning.*"),
    pytest.mark.filterwarnings("ignore:.*token_type_ids.*"),
]

M = 4
TEXTS = [
    "hello world",
    "a considerably longer sentence, so that the first one gets padded in a batch",
    "short one",
    "three words here",
]


def torch_roundtrip(model: nn.Module) -> nn.Module:
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


COPIES: dict[str, Callable[[nn.Module], nn.Module]] = {
    "pickle": lambda model: pickle.loads(pickle.dumps(model)),
    "deepcopy": copy.deepcopy,
    "torch.save": torch_roundtrip,
}


def maskpatch_objects(model: nn.Module) -> list[str]:
    """Every maskpatch object in any hook dict or ``__dict__`` of any module of ``model``."""
    found = []
    for name, module in model.named_modules():
        for attr in ("_forward_pre_hooks", "_forward_hooks"):
            found += [f"{name}.{attr}" for h in getattr(module, attr).values() if isinstance(h, MaskpatchHook)]
        found += [f"{name}.{k}" for k, v in vars(module).items() if type(v).__module__.startswith("maskpatch")]
    return found


@pytest.fixture
def st(tiny_model_dir):
    """A SentenceTransformer (tiny BERT, mean pooling) with a prompt-tuning adapter, unpatched."""
    return add_prompt_learning(st_model(tiny_model_dir("bert")), m=M)


def batch_gap(model: nn.Module) -> float:
    """Max abs difference of each text encoded alone vs. in the padded batch."""
    batch = encode(model, TEXTS)
    alone = torch.cat([encode(model, [text]) for text in TEXTS])
    return float((batch - alone).abs().max())


# --- copies of a patched SentenceTransformer ----------------------------------------------------


@pytest.mark.parametrize("how", COPIES)
@pytest.mark.parametrize("policy", maskpatch.POLICIES)
def test_copy_of_a_patched_st_model_is_patched_and_remove_is_exact(st, how, policy):
    """The copy is patched and repairs like the original; maskpatch.remove(copy) is exact; the original is untouched."""
    unpatched_copy = copy.deepcopy(st)
    unpatched_out = encode(unpatched_copy, TEXTS)
    before = state(unpatched_copy)
    handle = maskpatch.apply(st, policy=policy)
    original_out = encode(st, TEXTS)  # also adds the lazy position hook, which the copy must carry

    clone = COPIES[how](st)
    assert maskpatch.is_patched(clone)
    assert torch.allclose(encode(clone, TEXTS), original_out, atol=1e-6, rtol=0)
    assert batch_gap(clone) <= 1e-5

    assert maskpatch.remove(clone) is True
    assert maskpatch_objects(clone) == []
    assert state(clone) == before
    assert torch.equal(encode(clone, TEXTS), unpatched_out)
    assert maskpatch.remove(clone) is False  # idempotent

    assert maskpatch.is_patched(st) and handle.active  # the copy's removal left the original alone
    assert torch.equal(encode(st, TEXTS), original_out)
    handle.remove()


def test_copy_made_inside_patched_block_stays_patched_after_the_block(st):
    """A copy taken inside a patched() block lives on patched; the block's exit unpatches only the original."""
    with maskpatch.patched(st, policy="strip"):
        clone = copy.deepcopy(st)
    assert not maskpatch.is_patched(st)
    assert maskpatch.is_patched(clone)
    assert batch_gap(clone) <= 1e-5


# --- copies of a patched bare PeftModel -----------------------------------------------------------


@pytest.mark.parametrize("how", COPIES)
def test_copy_of_a_patched_peft_model_is_patched_and_remove_is_exact(st, how):
    """A bare PeftModel patched with strip: the copy cuts the virtual positions too; remove(copy) is exact."""
    pm = st[0].model
    batch = st.preprocess(TEXTS)
    batch.pop("token_type_ids", None)
    with torch.no_grad():
        unpatched = pm(**batch).last_hidden_state
    before = state(copy.deepcopy(pm))
    maskpatch.apply(pm, policy="strip")
    with torch.no_grad():
        original = pm(**batch).last_hidden_state
    clone = COPIES[how](pm)
    assert maskpatch.is_patched(clone)
    with torch.no_grad():
        cut = clone(**batch).last_hidden_state
    assert cut.shape[1] == batch["attention_mask"].shape[1] == unpatched.shape[1] - M
    assert torch.equal(cut, original)
    maskpatch.remove(clone)
    assert maskpatch_objects(clone) == [] and state(clone) == before
    with torch.no_grad():
        assert torch.equal(clone(**batch).last_hidden_state, unpatched)


# --- nothing of maskpatch in saved weights or files ------------------------------------------------


def files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_state_dict_and_saved_files_hold_nothing_of_maskpatch(st, tmp_path):
    """state_dict, save_pretrained (adapter dir) and ST save are the same, byte for byte, patched or not.

    The one addition a patched save makes is the ``maskpatch.json`` sidecar beside the adapter
    (the policy it was saved under, docs/cost.md); every file PEFT and sentence-transformers write
    is unchanged.
    """
    encode(st, TEXTS)
    plain_state = st.state_dict()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        st[0].model.save_pretrained(tmp_path / "adapter-plain")
        st.save(str(tmp_path / "st-plain"))

    maskpatch.apply(st)
    encode(st, TEXTS)  # every lazy hook is in place
    patched_state = st.state_dict()
    assert list(patched_state) == list(plain_state)
    assert all(torch.equal(patched_state[k], plain_state[k]) for k in plain_state)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        st[0].model.save_pretrained(tmp_path / "adapter-patched")
        st.save(str(tmp_path / "st-patched"))

    for kind in ("adapter", "st"):
        plain, patched = files(tmp_path / f"{kind}-plain"), files(tmp_path / f"{kind}-patched")
        assert patched.keys() == plain.keys() | {"maskpatch.json"}
        assert "adapter_config.json" in str(list(patched))
        for name in plain:
            assert b"maskpatch" not in patched[name], f"{kind}: {name} mentions maskpatch"
            # The generated model card shows similarities the model computes: those are meant to change.
            if name != "README.md":
                assert patched[name] == plain[name], f"{kind}: {name} differs"


# --- pickles written before the sentence-transformers adapter became a package -------------------

#: ``pickle.dumps([...], protocol=2)`` (the protocol ``torch.save`` writes) of one instance of each
#: sentence-transformers hook class, written by maskpatch 0.1.0, where the classes lived in the
#: modules ``maskpatch.adapters.sentence_transformers`` and ``maskpatch.adapters.st_consumers``.
HOOKS_PICKLED_BY_0_1_0 = (
    b"\x80\x02]q\x00("
    b"cmaskpatch.adapters.sentence_transformers\nTransformerPositionHook\nq\x01)\x81q\x02}q\x03X\x06"
    b"\x00\x00\x00recordq\x04"
    b"cmaskpatch.hooks\nInstallRecord\nq\x05)\x81q\x06}q\x07(X\x06\x00\x00\x00policyq\x08X\x06\x00\x00"
    b"\x00extendq\tX\x07\x00\x00\x00adapterq\nX\x15\x00\x00\x00sentence-transformersq\x0bX\x06\x00\x00"
    b"\x00pinnedq\x0c\x88X\x08\x00\x00\x00contextsq\rK\x00X\x04\x00\x00\x00rootq\x0eNX\x06\x00\x00\x00s"
    b"trictq\x0f\x89X\x08\x00\x00\x00reportedq\x10c__builtin__\nset\nq\x11]q\x12\x85q\x13Rq\x14X\x05"
    b"\x00\x00\x00sitesq\x15]q\x16X\x08\x00\x00\x00releasesq\x17]q\x18X\x07\x00\x00\x00removedq\x19\x89"
    b"X\x05\x00\x00\x00ownerq\x1aNubsb"
    b"cmaskpatch.adapters.sentence_transformers\nTransformerOutputHook\nq\x1b)\x81q\x1c}q\x1d(h\x04h"
    b"\x06X\x0c\x00\x00\x00sees_poolingq\x1e\x89X\x06\x00\x00\x00inlineq\x1f\x88ub"
    b'cmaskpatch.adapters.sentence_transformers\nInlineMaskGuardHook\nq )\x81q!}q"h\x04h\x06sb'
    b"cmaskpatch.adapters.sentence_transformers\nPoolingPromptHook\nq#)\x81q$}q%h\x04h\x06sb"
    b"cmaskpatch.adapters.sentence_transformers\nWeightedMeanOrderHook\nq&)\x81q'}q(h\x04h\x06sb"
    b"cmaskpatch.adapters.sentence_transformers\nWeightedMeanRestoreHook\nq))\x81q*}q+h\x04h\x06sb"
    b"cmaskpatch.adapters.st_consumers\nScoringMaskInputHook\nq,)\x81q-}q.h\x04h\x06sb"
    b"cmaskpatch.adapters.st_consumers\nScoringMaskOutputHook\nq/)\x81q0}q1h\x04h\x06sbe."
)

#: The classes those pickles name, in their order, as they are now.
OLD_PICKLE_CLASSES = (
    "maskpatch.adapters.sentence_transformers.transformer.TransformerPositionHook",
    "maskpatch.adapters.sentence_transformers.transformer.TransformerOutputHook",
    "maskpatch.adapters.sentence_transformers.transformer.InlineMaskGuardHook",
    "maskpatch.adapters.sentence_transformers.pooling.PoolingPromptHook",
    "maskpatch.adapters.sentence_transformers.pooling.WeightedMeanOrderHook",
    "maskpatch.adapters.sentence_transformers.pooling.WeightedMeanRestoreHook",
    "maskpatch.adapters.sentence_transformers.consumers.ScoringMaskInputHook",
    "maskpatch.adapters.sentence_transformers.consumers.ScoringMaskOutputHook",
)


def test_hooks_pickled_by_0_1_0_unpickle_from_their_old_module_paths():
    """Hooks pickled when the sentence-transformers adapter was one module load as today's classes, with their state."""
    hooks = pickle.loads(HOOKS_PICKLED_BY_0_1_0)
    assert [f"{type(h).__module__}.{type(h).__qualname__}" for h in hooks] == list(OLD_PICKLE_CLASSES)
    assert len({id(h.record) for h in hooks}) == 1
    assert hooks[0].record.policy == "extend" and hooks[0].record.adapter == "sentence-transformers"
    assert (hooks[1].sees_pooling, hooks[1].inline) == (False, True)


def test_patched_st_model_pickled_under_the_old_module_paths_is_still_patched(tiny_model_dir):
    """A patched model whose pickle names the hooks by their 0.1.0 paths loads patched and repairs like the original.

    The pickle is written now and its class paths rewritten to the old ones (protocol 2 names a
    class as text, ``c<module>\\n<name>\\n``), as a model pickled by 0.1.0 names them.
    """
    model = add_prompt_learning(st_model(tiny_model_dir("bert"), pooling="weightedmean", padding_side="left"), m=M)
    maskpatch.apply(model, policy="extend")
    original_out = encode(model, TEXTS)
    data = pickle.dumps(model, protocol=2)
    for new in (b"transformer", b"pooling"):
        module = b"maskpatch.adapters.sentence_transformers." + new + b"\n"
        assert module in data, module
        data = data.replace(module, b"maskpatch.adapters.sentence_transformers\n")

    clone = pickle.loads(data)
    assert maskpatch.is_patched(clone)
    assert torch.allclose(encode(clone, TEXTS), original_out, atol=1e-6, rtol=0)
    assert batch_gap(clone) <= 1e-5


# --- multi-process encoding -------------------------------------------------------------------------


def test_multi_process_encoding_matches_one_process(st):
    """Two spawned CPU workers (the model is pickled into each) give the single-process embeddings.

    ``strip``: an unpatched worker would pool the virtual tokens too (Pooling falls back to an
    all-ones mask), so only workers that received the hooks give these embeddings.
    """
    maskpatch.apply(st, policy="strip")
    one = encode(st, TEXTS)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        many = st.encode(TEXTS, device=["cpu", "cpu"], batch_size=len(TEXTS), convert_to_tensor=True)
    assert many.shape == one.shape
    assert torch.allclose(many.cpu(), one, atol=1e-5, rtol=0), float((many.cpu() - one).abs().max())
    assert maskpatch.is_patched(st)
