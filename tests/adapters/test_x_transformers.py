"""x-transformers: ``TransformerWrapper`` with ``Encoder`` or ``Decoder`` layers, ``prepend_embeds`` and memory tokens.

Invariants protected here (tiny random wrappers, dim 16, 2 layers; references are the UNPATCHED
wrapper's own outputs, cut by hand):

* ``strip``: logits/embeddings are exactly the unpatched ``[:, P:]``; ``hiddens[i]`` and both axes
  of every attention map lose ``K + P`` (memory tokens + prepended embeds), ``last_layer_hiddens``
  and ``initial_embeds`` lose ``P``; ``extend``/``ignore`` return the unpatched outputs bit for bit;
* the caller's ``N``-long mask is accepted under every policy, and ``output_mask`` draws the literal
  mask that lines up with the main output and with the intermediates;
* batch invariance: a text alone equals its row in a right-padded batch, token by token under
  ``strip`` and mean-pooled with ``output_mask`` under ``extend``/``ignore``;
* ``excise_prepend_embeds=True`` with ``return_embeddings=True`` crashes upstream and returns the
  unpatched embeddings' ``[:, P:]`` when patched;
* an unexplained excess raises ``DriftError``; ``remove`` is exact; ``maskpatch.output_mask``
  points x-transformers users to the per-call function.
"""

from __future__ import annotations

import pytest
import torch
import x_transformers
from torch import Tensor

import maskpatch
from maskpatch.adapters.x_transformers import output_mask

from helpers import state

P, K, D, N = 3, 2, 16, 5
TOL = 1e-5
POLICIES = ("extend", "ignore", "strip")

IDS = torch.tensor([[5, 6, 7, 0, 0], [8, 9, 10, 11, 12]])
MASK = IDS != 0  # x-transformers: True attends
ALONE = IDS[:1, :3]


def wrapper(layers: str = "encoder", *, memory: int = 0):
    torch.manual_seed(0)
    cls = x_transformers.Encoder if layers == "encoder" else x_transformers.Decoder
    return x_transformers.TransformerWrapper(
        num_tokens=50,
        max_seq_len=32,
        num_memory_tokens=memory,
        attn_layers=cls(dim=D, depth=2, heads=2),
    ).eval()


def prompt(batch: int = 2) -> Tensor:
    torch.manual_seed(1)
    return torch.randn(1, P, D).expand(batch, -1, -1)


def cut(t: Tensor, m: int, policy: str, dims: tuple[int, ...] = (1,)) -> Tensor:
    for dim in dims:
        t = t.narrow(dim, m, t.shape[dim] - m) if policy == "strip" else t
    return t


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("layers", ["encoder", "decoder"])
def test_prepend_embeds_outputs_and_intermediates_follow_the_policy(layers, policy):
    """Logits and every intermediate equal the unpatched ones, cut by hand under strip (P, or K + P inside the layers)."""
    model = wrapper(layers, memory=K)
    with torch.no_grad():
        ref, ref_inter = model(IDS, mask=MASK, prepend_embeds=prompt(), return_intermediates=True)
        with maskpatch.patched(model, policy=policy):
            out, inter = model(IDS, mask=MASK, prepend_embeds=prompt(), return_intermediates=True)
    assert ref.shape[1] == N + P and ref_inter.hiddens[0].shape[1] == N + P + K  # the drift, upstream
    assert torch.equal(out, cut(ref, P, policy))
    for got, want in zip(inter.hiddens, ref_inter.hiddens, strict=True):
        assert torch.equal(got, cut(want, K + P, policy))
    for got, want in zip(inter.attn_intermediates, ref_inter.attn_intermediates, strict=True):
        assert torch.equal(got.post_softmax_attn, cut(want.post_softmax_attn, K + P, policy, (2, 3)))
    assert torch.equal(inter.last_layer_hiddens, cut(ref_inter.last_layer_hiddens, P, policy))
    assert torch.equal(inter.initial_embeds, cut(ref_inter.initial_embeds, P, policy))
    assert torch.equal(inter.memory_tokens, ref_inter.memory_tokens)
    if policy == "strip":  # the unpatched intermediates were not modified in place
        assert ref_inter.hiddens[0].shape[1] == N + P + K


@pytest.mark.parametrize("policy", POLICIES)
def test_memory_tokens_alone_keep_the_main_output_and_cut_intermediates(policy):
    """No prepend: the main output is N long already (unchanged); hiddens and return_attn maps lose K under strip."""
    model = wrapper("decoder", memory=K)
    with torch.no_grad():
        ref, ref_maps = model(IDS, mask=MASK, return_attn=True)
        with maskpatch.patched(model, policy=policy):
            out, maps = model(IDS, mask=MASK, return_attn=True)
    assert torch.equal(out, ref) and ref.shape[1] == N
    for got, want in zip(maps, ref_maps, strict=True):
        assert torch.equal(got, cut(want, K, policy, (2, 3)))


def test_output_mask_draws_literal_masks():
    """output_mask: P leading True (extend) / False (ignore) / nothing (strip); intermediates get K + P."""
    model = wrapper(memory=K)
    expected = {
        "extend": torch.tensor([[1, 1, 1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1, 1, 1]], dtype=torch.bool),
        "ignore": torch.tensor([[0, 0, 0, 1, 1, 1, 0, 0], [0, 0, 0, 1, 1, 1, 1, 1]], dtype=torch.bool),
        "strip": MASK,
    }
    inner = {
        "extend": torch.tensor([[1, 1, 1, 1, 1, 1, 1, 1, 0, 0], [1] * 10], dtype=torch.bool),
        "ignore": torch.tensor([[0, 0, 0, 0, 0, 1, 1, 1, 0, 0], [0] * 5 + [1] * 5], dtype=torch.bool),
        "strip": MASK,
    }
    for policy in POLICIES:
        with maskpatch.patched(model, policy=policy):
            assert torch.equal(output_mask(model, MASK, prepend=prompt()), expected[policy])
            assert torch.equal(output_mask(model, MASK, prepend=P, intermediates=True), inner[policy])
            own = torch.tensor([[True, False, True]] * 2)  # the call's prepend_mask is what extend uses
            if policy == "extend":
                assert torch.equal(output_mask(model, MASK, prepend=P, prepend_mask=own)[:, :P], own)
            with pytest.raises(maskpatch.PolicyError, match="x-transformers"):
                maskpatch.output_mask(model, MASK)
    assert torch.equal(MASK, IDS != 0)
    with pytest.raises(maskpatch.UnsupportedModelError):
        output_mask(model, MASK, prepend=P)


@pytest.mark.parametrize("policy", POLICIES)
def test_batch_invariance_alone_and_in_a_padded_batch(policy):
    """Encoder embeddings: the text alone equals its row in the batch (real tokens under strip, pooled otherwise)."""
    model = wrapper("encoder")
    with torch.no_grad(), maskpatch.patched(model, policy=policy):
        alone = model(ALONE, mask=ALONE != 0, prepend_embeds=prompt(1), return_embeddings=True)
        batch = model(IDS, mask=MASK, prepend_embeds=prompt(), return_embeddings=True)
        mask_alone = output_mask(model, ALONE != 0, prepend=P)
        mask_batch = output_mask(model, MASK, prepend=P)

    def pool(tokens: Tensor, mask: Tensor) -> Tensor:
        keep = mask.unsqueeze(-1).float()
        return (tokens * keep).sum(1) / keep.sum(1)

    assert torch.allclose(pool(alone, mask_alone)[0], pool(batch, mask_batch)[0], atol=TOL)
    width = alone.shape[1]
    assert torch.allclose(alone[0], batch[0, :width], atol=TOL)
    assert alone.shape[1] == (3 if policy == "strip" else 3 + P)


@pytest.mark.parametrize("policy", POLICIES)
def test_excise_with_return_embeddings_works_when_patched(policy):
    """Upstream crashes (logits unbound); patched, it returns the unpatched embeddings' [:, P:] under every policy."""
    model = wrapper("encoder")
    with torch.no_grad():
        with pytest.raises((UnboundLocalError, NameError)):
            model(IDS, mask=MASK, prepend_embeds=prompt(), return_embeddings=True, excise_prepend_embeds=True)
        full = model(IDS, mask=MASK, prepend_embeds=prompt(), return_embeddings=True)
        with maskpatch.patched(model, policy=policy):
            out = model(IDS, mask=MASK, prepend_embeds=prompt(), return_embeddings=True, excise_prepend_embeds=True)
            logits = model(IDS, mask=MASK, prepend_embeds=prompt(), excise_prepend_embeds=True)
        ref_logits = model(IDS, mask=MASK, prepend_embeds=prompt(), excise_prepend_embeds=True)
    assert torch.equal(out, full[:, P:])
    assert torch.equal(logits, ref_logits) and logits.shape[1] == N


class _Widen:
    def __call__(self, module, args, output):
        return torch.cat([output, output[:, :1]], dim=1)


def test_unexplained_excess_raises_and_remove_is_exact():
    """A user's hook adding a position gives an excess of P + 1: DriftError; apply + remove leaves the model as it was."""
    model = wrapper("encoder")
    before = state(model)
    handle = maskpatch.apply(model, policy="strip")
    assert handle.adapter == "x-transformers"
    handle.remove()
    assert state(model) == before
    user = model.register_forward_hook(_Widen())
    try:
        with maskpatch.patched(model, policy="strip"), pytest.raises(maskpatch.DriftError, match="9 positions"):
            with torch.no_grad():
                model(IDS, mask=MASK, prepend_embeds=prompt())
    finally:
        user.remove()


def test_audit_records_prepend_drift_without_changing_the_output():
    """Audit mode at the wrapper: one finding (N + P vs N, explained by P prepended embeds), logits bit-identical."""
    model = wrapper("encoder")
    with torch.no_grad():
        ref = model(IDS, mask=MASK, prepend_embeds=prompt())
        with pytest.warns(maskpatch.DriftWarning), maskpatch.audit(model) as report:
            out = model(IDS, mask=MASK, prepend_embeds=prompt())
            model(IDS, mask=MASK)  # no prepend: no drift
    assert torch.equal(out, ref)
    (finding,) = report.findings
    assert (finding.output_length, finding.mask_length, finding.num_virtual_tokens) == (N + P, N, P)
    assert finding.explained and finding.adapter == "prepend_embeds"


def test_cls_token_output_is_pooled_and_left_alone_but_intermediates_are_cut():
    """With 6 CLS tokens (more than N) the pooled output is untouched; hiddens lose C + P under strip."""
    torch.manual_seed(0)
    model = x_transformers.TransformerWrapper(
        num_tokens=50,
        max_seq_len=32,
        use_cls_token=True,
        num_cls_tokens=6,
        attn_layers=x_transformers.Encoder(dim=D, depth=1, heads=2),
    ).eval()
    with torch.no_grad():
        ref, ref_inter = model(IDS, mask=MASK, prepend_embeds=prompt(), return_intermediates=True)
        with maskpatch.patched(model, policy="strip"):
            out, inter = model(IDS, mask=MASK, prepend_embeds=prompt(), return_intermediates=True)
    assert torch.equal(out, ref) and ref.shape[1] == 6
    assert torch.equal(inter.hiddens[0], ref_inter.hiddens[0][:, 6 + P :])
