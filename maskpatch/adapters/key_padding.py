"""torch key-padding modules inside a module that prepends tokens (part of the generic path).

``nn.TransformerEncoder``, ``nn.TransformerEncoderLayer`` and ``nn.MultiheadAttention`` take a
``key_padding_mask`` in the ``KEY_PADDING`` convention (``True`` = ignore, ``False`` = attend) or
an additive float one (``0.0`` = attend). A module that prepends ``M`` register, memory or prompt
tokens in front of one of them and passes the caller's ``(B, N)`` mask along makes torch fail on
an ``N + M`` sequence. With ``maskpatch.apply(module, prepended_tokens=M)``, a pre-hook on each
outermost such module inside ``module`` (:class:`KeyPaddingMaskHook`) prepends ``M`` *attending*
entries (``False``, or ``0.0``) to a mask exactly ``M`` shorter than the sequence, before torch
sees it, so the nested-tensor fast path of ``nn.TransformerEncoder`` in eval mode gets the same
mask as the slow path. Inside the module the prepended tokens are attended under every policy,
as PEFT attends its virtual tokens; the policy decides only what the outputs and
:func:`maskpatch.prepended_mask` look like. A mask that already has the sequence's length, or any
other length (torch reports that itself), is passed on untouched.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ..conventions import MaskConvention
from ..drift import prefix_mask
from ..handle import HookSpec
from ..hooks import ForwardPreHook, InstallRecord

__all__ = ["KeyPaddingMaskHook", "key_padding_specs"]

#: module type -> ((position, name) of the sequence argument, (position, name) of the key-padding mask).
_SIGNATURES: dict[type[nn.Module], tuple[tuple[int, str], tuple[int, str]]] = {
    nn.TransformerEncoder: ((0, "src"), (2, "src_key_padding_mask")),
    nn.TransformerEncoderLayer: ((0, "src"), (2, "src_key_padding_mask")),
    nn.MultiheadAttention: ((1, "key"), (3, "key_padding_mask")),
}


def key_padding_specs(model: nn.Module, record: InstallRecord, count: int) -> list[HookSpec]:
    """Return a :class:`KeyPaddingMaskHook` for each outermost key-padding module in ``model`` (``model`` included).

    Modules inside one that is hooked already get the extended mask from it, so they need none.
    Changes nothing.
    """
    specs: list[HookSpec] = []
    todo = [model]
    while todo:
        module = todo.pop()
        signature = _SIGNATURES.get(type(module))
        if signature is None:
            todo.extend(reversed(list(module.children())))
            continue
        specs.append(HookSpec(module, KeyPaddingMaskHook(record, count, *signature, seq_dim=_seq_dim(module))))
    return specs


def _seq_dim(module: nn.Module) -> int:
    """The axis of the sequence in ``module``'s input: 1 when batch-first, 0 otherwise."""
    attention: Any = module
    if isinstance(module, nn.TransformerEncoder):
        attention = module.layers[0].self_attn if len(module.layers) else None
    elif isinstance(module, nn.TransformerEncoderLayer):
        attention = module.self_attn
    return 1 if getattr(attention, "batch_first", False) else 0


class KeyPaddingMaskHook(ForwardPreHook):
    """Pre-hook on a torch key-padding module: prepend ``count`` attending entries to a mask ``count`` too short.

    ``False`` for a boolean mask (``KEY_PADDING``: True ignores), ``0.0`` for an additive float one.
    The caller's mask is not modified: the module gets a new one, in new ``args``/``kwargs``.
    """

    def __init__(
        self, record: InstallRecord, count: int, sequence: tuple[int, str], mask: tuple[int, str], *, seq_dim: int
    ) -> None:
        super().__init__(record)
        self.count = count
        self.sequence = sequence
        self.mask = mask
        self.seq_dim = seq_dim

    def __call__(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        mask, sequence = _argument(args, kwargs, self.mask), _argument(args, kwargs, self.sequence)
        if not (isinstance(mask, Tensor) and isinstance(sequence, Tensor)) or mask.dim() != 2 or sequence.dim() != 3:
            return None  # no mask, or an unbatched call
        if mask.shape[1] + self.count != sequence.shape[self.seq_dim]:
            return None
        convention = MaskConvention.KEY_PADDING if mask.dtype == torch.bool else MaskConvention.ADDITIVE
        if convention is MaskConvention.ADDITIVE and not mask.dtype.is_floating_point:
            return None  # torch refuses an integer key_padding_mask itself
        extended = prefix_mask(mask, self.count, attend=True, convention=convention)
        return _replace(args, kwargs, self.mask, extended)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.record!r}, count={self.count}, mask={self.mask[1]!r})"


def _argument(args: tuple[Any, ...], kwargs: dict[str, Any], where: tuple[int, str]) -> Any:
    position, name = where
    return args[position] if len(args) > position else kwargs.get(name)


def _replace(
    args: tuple[Any, ...], kwargs: dict[str, Any], where: tuple[int, str], value: Tensor
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    position, name = where
    if len(args) > position:
        return (*args[:position], value, *args[position + 1 :]), kwargs
    return args, {**kwargs, name: value}
