"""torch key-padding modules behind prepended tokens: ``maskpatch.apply(module, prepended_tokens=M)``.

Invariants protected here, on toy modules that prepend M=3 learned register tokens and pass the
caller's ``(B, N)`` ``key_padding_mask`` (True = pad) on to an ``nn.TransformerEncoder``, an
``nn.TransformerEncoderLayer`` or an ``nn.MultiheadAttention``:

* under every policy the output equals the torch module run BY HAND on the prepended sequence with
  the mask extended by M ``False`` (attend) entries (``0.0`` for an additive float mask); ``strip``
  gives exactly ``[:, M:]`` of it. This holds in train mode and in eval mode under ``no_grad``,
  where ``nn.TransformerEncoder`` takes its nested-tensor fast path (padded rows come back as exact
  zeros, which the slow path never gives);
* batch invariance: a text alone equals its row in a padded batch, token by token and pooled with
  ``prepended_mask(..., convention=KEY_PADDING)``;
* unpatched, the same call fails in torch (the mask is M short); the caller's mask is not modified;
  only the outermost key-padding module is hooked; ``remove`` is exact.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

import maskpatch
from maskpatch import MaskConvention
from maskpatch.adapters.key_padding import KeyPaddingMaskHook

from helpers import state

M = 3
D = 16
TOL = 1e-5
POLICIES = ("extend", "ignore", "strip")

# Row 0 alone is [5, 6, 7]; in the batch it is right-padded to 5 tokens.
ALONE = torch.tensor([[5, 6, 7]])
BATCH = torch.tensor([[5, 6, 7, 0, 0], [8, 9, 10, 11, 12]])


def padding(ids: Tensor) -> Tensor:
    """The caller's key_padding_mask: True where the row is padding."""
    return ids == 0


class RegisterEncoder(nn.Module):
    """Prepends ``M`` register tokens and hands the caller's N-long key_padding_mask to ``inner`` unchanged.

    ``kind``: ``encoder`` (nn.TransformerEncoder, nested tensors on), ``layer``
    (nn.TransformerEncoderLayer) or ``mha`` (nn.MultiheadAttention, mask passed positionally).
    ``batch_first=False`` runs the inner module sequence-first.
    """

    def __init__(self, kind: str = "encoder", *, batch_first: bool = True) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.kind, self.batch_first = kind, batch_first
        self.embed = nn.Embedding(100, D)
        self.registers = nn.Parameter(torch.randn(M, D))
        if kind == "mha":
            self.inner: nn.Module = nn.MultiheadAttention(D, 2, batch_first=batch_first)
        else:
            layer = nn.TransformerEncoderLayer(D, 2, 32, dropout=0.0, batch_first=batch_first)
            self.inner = layer if kind == "layer" else nn.TransformerEncoder(layer, 2, enable_nested_tensor=True)

    def prepend(self, ids: Tensor) -> Tensor:
        return torch.cat([self.registers.expand(ids.shape[0], -1, -1), self.embed(ids)], dim=1)

    def run_inner(self, x: Tensor, mask: Tensor) -> Tensor:
        """The inner module on a batch-first ``x`` with ``mask`` (this is also the reference path)."""
        x = x if self.batch_first else x.transpose(0, 1)
        if self.kind == "mha":
            out = self.inner(x, x, x, mask, need_weights=False)[0]  # key_padding_mask positionally
        else:
            out = self.inner(x, src_key_padding_mask=mask)
        return out if self.batch_first else out.transpose(0, 1)

    def forward(self, ids: Tensor, key_padding_mask: Tensor) -> Tensor:
        return self.run_inner(self.prepend(ids), key_padding_mask)


def by_hand(module: RegisterEncoder, ids: Tensor, mask: Tensor) -> Tensor:
    """The reference: the module's own pieces on the prepended sequence, mask extended with M attending entries."""
    attend = torch.zeros(ids.shape[0], M, dtype=mask.dtype)  # False (bool) or 0.0 (additive): attend
    return module.run_inner(module.prepend(ids), torch.cat([attend, mask], dim=1))


def cut(tokens: Tensor, policy: str) -> Tensor:
    return tokens[:, M:] if policy == "strip" else tokens


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("kind", ["encoder", "layer", "mha"])
def test_output_equals_the_module_run_by_hand_on_the_prepended_sequence(kind, policy):
    """Train mode: patched output == by-hand output on the prepended sequence (strip: its [:, M:]); unpatched, torch fails."""
    module = RegisterEncoder(kind).train()
    mask = padding(BATCH)
    with pytest.raises((RuntimeError, AssertionError)):  # the N-long mask for an N + M sequence
        module(BATCH, mask)
    with maskpatch.patched(module, policy=policy, prepended_tokens=M):
        out = module(BATCH, mask)
    assert torch.equal(mask, padding(BATCH))  # the caller's mask is not modified
    assert torch.allclose(out, cut(by_hand(module, BATCH, mask), policy), atol=TOL)


@pytest.mark.parametrize("policy", POLICIES)
def test_eval_fast_path_of_transformer_encoder(policy):
    """Eval + no_grad: the nested-tensor fast path runs (pads are exact zeros) and equals the by-hand run."""
    module = RegisterEncoder("encoder").eval()
    mask = padding(BATCH)
    with torch.no_grad():
        reference = by_hand(module, BATCH, mask)
        with maskpatch.patched(module, policy=policy, prepended_tokens=M):
            out = module(BATCH, mask)
    assert torch.count_nonzero(reference[0, M + 3 :]) == 0  # the fast path zeroes padded rows
    assert torch.allclose(out, cut(reference, policy), atol=TOL)


@pytest.mark.parametrize("kind", ["encoder", "mha"])
def test_sequence_first_modules(kind):
    """batch_first=False: the sequence axis is 0, and the mask is still extended to M + N columns."""
    module = RegisterEncoder(kind, batch_first=False).eval()
    mask = padding(BATCH)
    with torch.no_grad(), maskpatch.patched(module, policy="extend", prepended_tokens=M):
        out = module(BATCH, mask)
    with torch.no_grad():
        assert torch.allclose(out, by_hand(module, BATCH, mask), atol=TOL)


def test_additive_float_mask_gets_zeros():
    """An additive float key_padding_mask (-inf = pad) gets M leading 0.0 entries."""
    module = RegisterEncoder("mha").eval()
    additive = torch.zeros(BATCH.shape, dtype=torch.float32).masked_fill(padding(BATCH), float("-inf"))
    with torch.no_grad(), maskpatch.patched(module, policy="strip", prepended_tokens=M):
        out = module(BATCH, additive)
    with torch.no_grad():
        assert torch.allclose(out, by_hand(module, BATCH, additive)[:, M:], atol=TOL)


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_batch_invariance_tokens_and_pooling(policy, mode):
    """A text alone equals its row in the padded batch: real tokens, and mean pooling with prepended_mask."""
    module = getattr(RegisterEncoder("encoder"), mode)()
    with torch.no_grad(), maskpatch.patched(module, policy=policy, prepended_tokens=M):
        alone = module(ALONE, padding(ALONE))
        batch = module(BATCH, padding(BATCH))
        pad_alone = maskpatch.prepended_mask(module, padding(ALONE), convention=MaskConvention.KEY_PADDING)
        pad_batch = maskpatch.prepended_mask(module, padding(BATCH), convention=MaskConvention.KEY_PADDING)
    width = alone.shape[1]
    assert torch.allclose(alone[0], batch[0, :width], atol=TOL)

    def pool(tokens: Tensor, pad: Tensor) -> Tensor:
        keep = (~pad).unsqueeze(-1).float()
        return (tokens * keep).sum(1) / keep.sum(1)

    assert torch.allclose(pool(alone, pad_alone)[0], pool(batch, pad_batch)[0], atol=TOL)
    expected_prefix = {"extend": False, "ignore": True}.get(policy)
    if expected_prefix is None:
        assert torch.equal(pad_batch, padding(BATCH))
    else:
        assert pad_batch[:, :M].eq(expected_prefix).all() and torch.equal(pad_batch[:, M:], padding(BATCH))


def test_only_the_outermost_key_padding_module_is_hooked_and_remove_is_exact():
    """One pre-hook on the TransformerEncoder (none on its layers or their attention); remove() restores every dict."""
    module = RegisterEncoder("encoder")
    before = state(module)
    handle = maskpatch.apply(module, policy="extend", prepended_tokens=M)
    hooked = [
        name
        for name, m in module.named_modules()
        for h in m._forward_pre_hooks.values()
        if isinstance(h, KeyPaddingMaskHook)
    ]
    assert hooked == ["inner"]
    handle.remove()
    assert state(module) == before


def test_mask_that_already_fits_is_left_alone():
    """A module that extends the mask itself (M + N columns) gets it through unchanged (the same tensor)."""
    module = RegisterEncoder("encoder")
    seen = []
    full = torch.cat([torch.zeros(2, M, dtype=torch.bool), padding(BATCH)], dim=1)
    with maskpatch.patched(module, policy="extend", prepended_tokens=M):
        assert any(isinstance(h, KeyPaddingMaskHook) for h in module.inner._forward_pre_hooks.values())
        # registered after maskpatch's pre-hook, so it sees what maskpatch passes on
        probe = module.inner.register_forward_pre_hook(
            lambda m, a, k: seen.append(k["src_key_padding_mask"]), with_kwargs=True
        )
        module.run_inner(module.prepend(BATCH), full)
    probe.remove()
    assert seen[0] is full
