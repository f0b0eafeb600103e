"""The generic path: ``maskpatch.apply(module, policy=..., prepended_tokens=M)`` without PEFT.

Invariants protected here, on a toy module that prepends M=3 learned memory tokens and returns a
tensor, a dict or a ``ModelOutput``:

* ``strip`` cuts exactly the M leading positions from the tensor, ``last_hidden_state``, every
  ``hidden_states[i]`` and both axes of every ``attentions[i]``; ``extend``/``ignore`` leave the
  output bit-identical;
* pooling the output with :func:`maskpatch.prepended_mask` equals pooling by hand over the
  positions the policy names, and a text alone pools like the same text in a padded batch;
* ``prepended_mask`` draws the literal masks of each policy, in both mask conventions;
* bad counts, a second install with another count, an output shorter than M and an output strip
  cannot cut are refused with maskpatch errors; ``remove`` leaves nothing behind; copies stay patched.
"""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from torch import Tensor, nn

import maskpatch
from maskpatch.adapters.generic import PrependedOutputHook

from helpers import assert_no_residue, policy_mask, policy_tokens, pool_by_hand, residue_snapshot

M = 3
D = 16
TOL = 1e-5


class MemoryEncoder(nn.Module):
    """Prepends ``count`` learned memory tokens to the embedded ids and runs one attention block.

    ``forward(ids, mask)`` takes a ``(B, N)`` mask (1 attends) and masks the padding itself; its
    outputs have ``count + N`` positions. ``output`` picks what it returns: ``tensor``, ``dict``
    (with hidden states and attention maps), ``model_output`` (a transformers ``BaseModelOutput``)
    or ``tuple``.
    """

    def __init__(self, count: int = M, output: str = "tensor") -> None:
        super().__init__()
        torch.manual_seed(0)
        self.count, self.output = count, output
        self.embed = nn.Embedding(100, D)
        self.memory = nn.Parameter(torch.randn(count, D))
        self.attn = nn.MultiheadAttention(D, 2, batch_first=True)
        self.ff = nn.Sequential(nn.Linear(D, 32), nn.GELU(), nn.Linear(32, D))

    def forward(self, ids: Tensor, mask: Tensor):
        x = torch.cat([self.memory.expand(ids.shape[0], -1, -1), self.embed(ids)], dim=1)
        padding = torch.cat([torch.zeros(ids.shape[0], self.count, dtype=torch.bool), mask == 0], dim=1)
        attended, weights = self.attn(x, x, x, key_padding_mask=padding, average_attn_weights=False)
        h = x + attended
        h = h + self.ff(h)
        if self.output == "tensor":
            return h
        if self.output == "tuple":
            return (h,)
        fields = {"last_hidden_state": h, "hidden_states": (x, h), "attentions": (weights,)}
        if self.output == "dict":
            return fields
        from transformers.modeling_outputs import BaseModelOutput

        return BaseModelOutput(**fields)


IDS = torch.tensor([[5, 6, 7, 0, 0], [8, 9, 10, 11, 12]])
MASK = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])


def hidden(output) -> Tensor:
    return output if isinstance(output, Tensor) else output["last_hidden_state"]


def run(module: nn.Module, ids: Tensor = IDS, mask: Tensor = MASK):
    with torch.no_grad():
        return module(ids, mask)


@pytest.mark.parametrize("output", ["tensor", "dict", "model_output"])
def test_strip_cuts_every_token_level_output(output):
    """strip: each token-level output loses exactly its M leading positions (on both axes for attentions)."""
    module = MemoryEncoder(output=output)
    before = run(module)
    with maskpatch.patched(module, policy="strip", prepended_tokens=M):
        after = run(module)
    assert type(after) is type(before)
    assert torch.equal(hidden(after), hidden(before)[:, M:])
    assert hidden(after).shape == (2, IDS.shape[1], D)
    if output != "tensor":
        assert all(
            torch.equal(a, b[:, M:]) for a, b in zip(after["hidden_states"], before["hidden_states"], strict=True)
        )
        assert all(
            torch.equal(a, b[..., M:, M:]) for a, b in zip(after["attentions"], before["attentions"], strict=True)
        )
        assert hidden(before).shape[1] == M + IDS.shape[1]  # the module's own output was not cut in place


@pytest.mark.parametrize("output", ["tensor", "dict", "model_output", "tuple"])
@pytest.mark.parametrize("policy", ["extend", "ignore"])
def test_extend_and_ignore_leave_the_output_bit_identical(policy, output):
    """extend/ignore keep M+N positions: the output is exactly the unpatched one."""
    module = MemoryEncoder(output=output)
    before = run(module)
    with maskpatch.patched(module, policy=policy, prepended_tokens=M):
        after = run(module)
    first = (lambda o: o[0]) if output == "tuple" else hidden
    assert torch.equal(first(after), first(before))


@pytest.mark.parametrize("policy", maskpatch.POLICIES)
def test_pooling_with_prepended_mask_equals_reference_and_is_batch_invariant(policy):
    """Mean pooling with the mask from prepended_mask covers the policy's positions, whatever the padding."""
    module = MemoryEncoder()
    expected = pool_by_hand(policy_tokens(run(module), M, policy), policy_mask(MASK, M, policy), "mean")

    def pool(ids: Tensor, mask: Tensor) -> Tensor:
        tokens = run(module, ids, mask)
        weights = maskpatch.prepended_mask(module, mask).unsqueeze(-1).to(tokens.dtype)
        return (tokens * weights).sum(1) / weights.sum(1)

    with maskpatch.patched(module, policy=policy, prepended_tokens=M):
        batch = pool(IDS, MASK)
        alone = pool(IDS[:1, :3], MASK[:1, :3])
    assert (batch - expected).abs().max() <= TOL
    assert (batch[:1] - alone).abs().max() <= TOL


def test_prepended_mask_draws_each_policy_in_each_convention():
    """Literal masks: M=2 attending (extend) or non-attending (ignore) columns in front; strip keeps the mask."""
    module = MemoryEncoder(count=2)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    padding = torch.tensor([[False, False, True], [False, False, False]])
    expected = {
        "extend": (torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]), torch.tensor([[0, 0, 0, 0, 1], [0, 0, 0, 0, 0]])),
        "ignore": (torch.tensor([[0, 0, 1, 1, 0], [0, 0, 1, 1, 1]]), torch.tensor([[1, 1, 0, 0, 1], [1, 1, 0, 0, 0]])),
        "strip": (mask, padding),
    }
    for policy, (ones, key_padding) in expected.items():
        with maskpatch.patched(module, policy=policy, prepended_tokens=2):
            got = maskpatch.prepended_mask(module, mask)
            got_padding = maskpatch.prepended_mask(module, padding, convention=maskpatch.MaskConvention.KEY_PADDING)
        assert got.dtype == mask.dtype and torch.equal(got, ones)
        assert got_padding.dtype == torch.bool and torch.equal(got_padding, key_padding.bool())
    assert torch.equal(mask, torch.tensor([[1, 1, 0], [1, 1, 1]]))  # the caller's mask is untouched


@pytest.mark.parametrize("count", [0, -1, True, 2.5, "4"])
def test_bad_prepended_tokens_are_refused_before_any_change(count):
    """A count that is not a positive int raises PolicyError (a ValueError) and installs nothing."""
    module = MemoryEncoder()
    with pytest.raises(maskpatch.PolicyError, match="positive int"):
        maskpatch.apply(module, prepended_tokens=count)
    with pytest.raises(ValueError):
        with maskpatch.patched(module, prepended_tokens=count):
            pass
    assert not maskpatch.is_patched(module)


def test_a_second_install_with_another_count_is_refused():
    """Same count: the existing handle comes back with a warning; another count: AlreadyPatchedError."""
    module = MemoryEncoder()
    handle = maskpatch.apply(module, policy="strip", prepended_tokens=M)
    with pytest.warns(maskpatch.MaskpatchWarning):
        again = maskpatch.apply(module, policy="strip", prepended_tokens=M)
    assert again.adapter == handle.adapter == "prepended-tokens"
    with pytest.raises(maskpatch.AlreadyPatchedError, match=f"prepended_tokens={M}"):
        maskpatch.apply(module, policy="strip", prepended_tokens=M + 1)
    with pytest.raises(maskpatch.AlreadyPatchedError):
        with maskpatch.patched(module, policy="strip", prepended_tokens=M + 1):
            pass
    handle.remove()
    assert not maskpatch.is_patched(module)


def test_output_shorter_than_the_count_raises_drift_error():
    """A count larger than the output's positions cannot be right: DriftError names both numbers."""
    module = MemoryEncoder()
    with maskpatch.patched(module, policy="extend", prepended_tokens=20):
        with pytest.raises(maskpatch.DriftError, match="with 25 positions on axis 1"):
            run(module)


def test_strip_refuses_an_output_it_cannot_cut():
    """strip on a tuple output raises UnsupportedModelError instead of returning uncut positions."""
    module = MemoryEncoder(output="tuple")
    with maskpatch.patched(module, policy="strip", prepended_tokens=M):
        with pytest.raises(maskpatch.UnsupportedModelError, match="tuple"):
            run(module)


def test_prepended_mask_needs_a_generic_install():
    """prepended_mask on a module without a prepended_tokens install raises UnsupportedModelError."""
    with pytest.raises(maskpatch.UnsupportedModelError, match="prepended_tokens"):
        maskpatch.prepended_mask(MemoryEncoder(), MASK)


def test_remove_is_exact_and_copies_stay_patched():
    """After remove() nothing of maskpatch is left; a deepcopy or pickle of a patched module strips too."""
    module = MemoryEncoder()
    state_before = set(module.__dict__)
    forward_before = module.forward
    residue = residue_snapshot(module)
    handle = maskpatch.apply(module, policy="strip", prepended_tokens=M)
    assert any(isinstance(h, PrependedOutputHook) for h in module._forward_hooks.values())

    for clone in (copy.deepcopy(module), pickle.loads(pickle.dumps(module))):
        assert maskpatch.is_patched(clone)
        assert run(clone).shape[1] == IDS.shape[1]
        assert maskpatch.remove(clone)
        assert run(clone).shape[1] == M + IDS.shape[1]

    handle.remove()
    handle.remove()  # idempotent
    assert not maskpatch.is_patched(module)
    assert_no_residue(residue, module)
    assert not module._forward_hooks and not module._forward_hooks_with_kwargs
    assert set(module.__dict__) == state_before
    assert module.forward == forward_before
    assert run(module).shape[1] == M + IDS.shape[1]


@pytest.mark.parametrize("policy", maskpatch.POLICIES)
def test_output_mask_is_the_one_helper_for_a_prepended_tokens_install(policy):
    """maskpatch.output_mask gives the same mask as prepended_mask on a prepended_tokens install."""
    module = MemoryEncoder()
    with maskpatch.patched(module, policy=policy, prepended_tokens=M):
        got = maskpatch.output_mask(module, MASK)
        assert torch.equal(got, maskpatch.prepended_mask(module, MASK))
    assert got.shape[1] == MASK.shape[1] + (0 if policy == "strip" else M)
