"""The x-transformers family: ``TransformerWrapper`` (with ``Encoder`` or ``Decoder`` layers).

x-transformers masks with ``True`` = attend (the ``ONES`` convention) and puts positions of its own
in front of the caller's ``N`` tokens, padding the caller's ``N``-long mask with ``True`` itself:

* ``prepend_embeds`` (``P`` positions, per call): the logits or embeddings have ``P + N``
  positions; ``excise_prepend_embeds=True`` cuts them, but crashes with ``return_embeddings=True``
  (x-transformers 2.31, ``logits`` is unbound);
* ``num_memory_tokens`` (``K``) and ``num_cls_tokens`` (``C``): the main output is back to ``N``
  (memory tokens are unpacked, CLS tokens pooled), but the returned intermediates (``hiddens``,
  every attention map) keep ``K + C + P + N`` positions.

``maskpatch.apply(wrapper, policy=...)`` puts a pre-hook and an (always called) forward hook on each
``TransformerWrapper`` in the model. Under ``strip`` every token-level output loses its leading
positions: the logits/embeddings their ``P``, ``last_layer_hiddens`` and ``initial_embeds`` their
``P``, every ``hiddens[i]``/``layer_hiddens[i]``/``last_hidden`` and both position axes of every
attention map their ``K + C + P``. Under ``extend`` and ``ignore`` outputs are left as they are
and :func:`output_mask` gives the mask that lines up with them. ``excise_prepend_embeds=True`` is
honoured under every policy, also with ``return_embeddings=True``: maskpatch cuts the ``P``
positions itself. ``return_mems`` memories are a cache for the next segment and are never cut.
Calls with a ``cache`` (decoding) are left alone. An excess that is none of these raises
:class:`~maskpatch.errors.DriftError`.
"""

from __future__ import annotations

import copy
import dataclasses
import sys
from collections.abc import Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..conventions import MaskConvention
from ..drift import Policy, prefix_mask, strip_positions
from ..errors import DriftError, PolicyError, UnsupportedModelError
from ..handle import HookSpec, find_record
from ..hooks import ForwardHook, ForwardPreHook, InstallRecord

__all__ = ["XTransformersAdapter", "XtCallHook", "XtOutputHook", "output_mask"]

NAME = "x-transformers"
_ATTN_FIELDS = (("qk_similarities", (2, 3)), ("pre_softmax_attn", (2, 3)), ("post_softmax_attn", (2, 3)))


def _wrapper_class() -> type[nn.Module] | None:
    module = sys.modules.get("x_transformers.x_transformers")
    return None if module is None else module.TransformerWrapper


class XTransformersAdapter:
    """Patches every x-transformers ``TransformerWrapper`` inside the given model (see the module docstring)."""

    name = NAME
    requires = {"x-transformers": ">=2.31,<3", "torch": ">=2.4"}
    optional: dict[str, str] = {}
    #: A part of a model this adapter patched (``apply(model)`` then ``apply(model[0])``) is planned
    #: as within the whole, so joining it is decided from the install record (optional capability).
    plans_parts_exactly = True

    def matches(self, model: object) -> bool:
        cls = _wrapper_class()
        return cls is not None and isinstance(model, nn.Module) and any(isinstance(m, cls) for m in model.modules())

    def plan(self, model: nn.Module, record: InstallRecord) -> list[HookSpec]:
        cls = _wrapper_class()
        specs: list[HookSpec] = []
        for module in model.modules():
            if cls is not None and isinstance(module, cls):
                specs += [HookSpec(module, XtCallHook(record)), HookSpec(module, XtOutputHook(record))]
        return specs

    def output_mask(
        self, model: nn.Module, record: InstallRecord, attention_mask: Tensor, *, convention: MaskConvention
    ) -> Tensor:
        """Refuse: the prepended count is per call here (use this module's :func:`output_mask` with ``prepend``)."""
        raise PolicyError(
            "an x-transformers install prepends prepend_embeds per call: use "
            "maskpatch.adapters.x_transformers.output_mask(model, mask, prepend=prepend_embeds)"
        )


@dataclass(frozen=True)
class XtCall:
    """One call of a patched wrapper: ``n`` real tokens, ``p`` prepended embeds, ``front`` = K + C + P in the layers."""

    owner: nn.Module
    n: int
    p: int
    front: int
    excise: bool
    mems_returned: bool
    pooled: bool = False


# The wrapper calls in progress on this thread or task, innermost last (never stored on a module).
_CALLS: ContextVar[tuple[XtCall, ...]] = ContextVar("maskpatch_xt_calls", default=())


class XtCallHook(ForwardPreHook):
    """Pre-hook on ``TransformerWrapper``: note the call's layout; take ``excise_prepend_embeds`` out of its way."""

    def __call__(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if kwargs.get("cache") is not None:
            return None
        x = args[0] if args else kwargs.get("x")
        prepend = kwargs.get("prepend_embeds")
        n = int(x.shape[1]) if isinstance(x, Tensor) and x.dim() >= 2 else 0
        p = int(prepend.shape[1]) if isinstance(prepend, Tensor) else 0
        front = p + _layer_tokens(module)
        excise = bool(kwargs.get("excise_prepend_embeds")) and p > 0
        call = XtCall(module, n, p, front, excise, bool(kwargs.get("return_mems")), _pools(module))
        _CALLS.set((*_CALLS.get(), call))
        if excise:  # cut by maskpatch instead: x-transformers' own cut crashes with return_embeddings
            return args, {**kwargs, "excise_prepend_embeds": False}
        return None


class XtOutputHook(ForwardHook):
    """Forward hook on ``TransformerWrapper`` (always called): check, and cut under ``strip`` (or ``excise``)."""

    always_call = True

    def __call__(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> Any:
        calls = _CALLS.get()
        if not calls or calls[-1].owner is not module:
            return None
        call = calls[-1]
        _CALLS.set(calls[:-1])
        if output is None:  # the forward raised
            return None
        return _repair(output, call, self.record.policy, type(module).__name__)


def _pools(wrapper: nn.Module) -> bool:
    """Whether ``wrapper``'s main output is pooled (CLS tokens, or attention pooling of an encoder): no token axis."""
    if getattr(wrapper, "cls_token", None) is not None:
        return True
    layers = getattr(wrapper, "attn_layers", None)
    return getattr(wrapper, "attn_pool", None) is not None and not getattr(layers, "causal", False)


def _layer_tokens(wrapper: nn.Module) -> int:
    """K + C: the memory and CLS tokens ``wrapper`` puts in front inside its attention layers."""
    cls_tokens = (
        int(getattr(wrapper, "num_cls_tokens", 0) or 0) if getattr(wrapper, "cls_token", None) is not None else 0
    )
    return int(getattr(wrapper, "num_memory_tokens", 0) or 0) + cls_tokens


def _repair(output: Any, call: XtCall, policy: Policy, where: str) -> Any:
    """Return ``output`` with its token-level tensors cut as the policy says (the same object when nothing is cut)."""
    cut_main = call.p if policy == "strip" or call.excise else 0
    fix = _Fix(call, policy, where)
    if isinstance(output, Tensor):
        return fix.main(output, cut_main)
    if not isinstance(output, tuple) or len(output) != 2:
        return output
    first, second = output
    main = tuple(fix.main(t, cut_main) for t in first) if isinstance(first, tuple) else fix.main(first, cut_main)
    if _is_intermediates(second):
        second = fix.intermediates(second)
    elif isinstance(second, Tensor):  # return_logits_and_embeddings
        second = fix.main(second, cut_main)
    elif isinstance(second, list) and not call.mems_returned:  # return_attn: the attention maps
        second = [fix.tensor(a, (2, 3), "attention map") for a in second]
    return (main, second)


def _is_intermediates(value: object) -> bool:
    return type(value).__name__ == "LayerIntermediates" and dataclasses.is_dataclass(value)


class _Fix:
    """The cuts of one call's outputs (only ``strip`` cuts intermediates)."""

    def __init__(self, call: XtCall, policy: Policy, where: str) -> None:
        self.call, self.strip, self.where = call, policy == "strip", where

    def main(self, tensor: Any, cut: int) -> Any:
        if self.call.pooled or not isinstance(tensor, Tensor) or tensor.dim() < 2 or tensor.shape[1] <= self.call.n:
            return tensor
        excess = tensor.shape[1] - self.call.n
        if excess != self.call.p:
            self._refuse("output", tensor.shape[1], (self.call.p,))
        return strip_positions(tensor, cut) if cut else tensor

    def tensor(self, tensor: Any, dims: Sequence[int], what: str) -> Any:
        if not isinstance(tensor, Tensor) or not self.strip:
            return tensor
        for dim in dims:
            excess = tensor.shape[dim] - self.call.n
            if excess <= 0:
                continue
            if excess not in (self.call.p, self.call.front):
                self._refuse(what, tensor.shape[dim], (self.call.p, self.call.front))
            tensor = strip_positions(tensor, excess, dim=dim)
        return tensor

    def intermediates(self, inter: Any) -> Any:
        if not self.strip or self.call.front == 0:
            return inter
        new = copy.copy(inter)  # LayerIntermediates copies its attention intermediates too
        for name in ("hiddens", "layer_hiddens"):
            value = getattr(inter, name, None)
            if isinstance(value, list):
                setattr(new, name, [self.tensor(h, (1,), name) for h in value])
        for name in ("last_hidden", "last_layer_hiddens", "initial_embeds"):
            setattr(new, name, self.tensor(getattr(inter, name, None), (1,), name))
        if isinstance(inter.attn_intermediates, list):
            new.attn_intermediates = [self._attention(a) for a in inter.attn_intermediates]
        return new

    def _attention(self, inter: Any) -> Any:
        fields = {name: self.tensor(getattr(inter, name, None), dims, name) for name, dims in _ATTN_FIELDS}
        fields["values"] = self.tensor(getattr(inter, "values", None), (2,), "values")
        return dataclasses.replace(inter, **fields)

    def _refuse(self, what: str, size: int, expected: tuple[int, ...]) -> None:
        extra = " or ".join(str(self.call.n + e) for e in sorted(set(expected)))
        raise DriftError(
            f"{self.where} {what} has {size} positions for {self.call.n} input tokens, but {extra} were expected "
            f"({self.call.p} prepended embeds, {self.call.front - self.call.p} memory/CLS tokens); maskpatch does "
            "not repair an excess it cannot explain"
        )


def output_mask(
    model: nn.Module,
    mask: Tensor,
    *,
    prepend: int | Tensor = 0,
    prepend_mask: Tensor | None = None,
    intermediates: bool = False,
    convention: MaskConvention = MaskConvention.ONES,
) -> Tensor:
    """Return the mask (``ONES`` by default: True attends, x-transformers' convention) that lines up with a patched wrapper's output.

    ``mask`` is the caller's ``(B, N)`` mask; ``prepend`` the call's ``prepend_embeds`` (or their
    count ``P``) and ``prepend_mask`` the call's own ``prepend_mask``, if any. Under ``strip`` the
    result is ``mask``. Under ``extend`` the main output's mask gets ``P`` entries in front: the
    call's ``prepend_mask`` or attending ones, what x-transformers itself used; under ``ignore``
    ``P`` non-attending ones. With ``intermediates=True`` the mask lines up with ``hiddens`` and
    the attention maps instead: ``K + C`` (memory and CLS tokens) more entries in front, attending
    under ``extend``. ``mask`` is not modified. Raises
    :class:`~maskpatch.errors.UnsupportedModelError` when ``model`` has no x-transformers install.
    """
    record = find_record(model) if isinstance(model, nn.Module) else None
    if record is None or record.adapter != NAME:
        raise UnsupportedModelError(
            f"expected a model patched by maskpatch's {NAME!r} adapter, but {type(model).__name__} has no such install"
        )
    if mask.dim() != 2:
        raise PolicyError(f"expected a 2-D (batch, tokens) mask, but got shape {tuple(mask.shape)}")
    if record.policy == "strip":
        return mask
    p = int(prepend.shape[1]) if isinstance(prepend, Tensor) else int(prepend)
    attend = record.policy == "extend"
    if prepend_mask is not None and attend and p:
        front = prepend_mask.to(dtype=mask.dtype) if convention is MaskConvention.ONES else None
        if front is None:
            raise PolicyError("a prepend_mask (True = attend) can only be combined with a ONES-convention mask")
        result = torch.cat((front, mask), dim=1)
    else:
        result = prefix_mask(mask, p, attend=attend, convention=convention)
    if intermediates:
        wrapper = next(m for m in model.modules() if isinstance(m, _wrapper_class()))  # type: ignore[arg-type]
        result = prefix_mask(result, _layer_tokens(wrapper), attend=attend, convention=convention)
    return result
