"""The hooks on a sentence-transformers ``Pooling`` module.

Under ``extend``:

* :class:`PoolingPromptHook`: ``Pooling(include_prompt=False)`` excludes the instruction, not the
  virtual tokens in front of it;
* :class:`WeightedMeanOrderHook` and :class:`WeightedMeanRestoreHook`: a ``weightedmean``
  ``Pooling`` sees the virtual tokens after any left padding, so the weights of the real tokens
  are the ones they get for the text alone, and its output carries the caller's order again.

Under ``ignore``, on sentence-transformers before 6.2, whose ``Pooling`` reads some positions by
column rather than through the mask:

* :class:`PoolingRealColumnsHook` (with :class:`WeightedMeanRestoreHook`): ``Pooling`` sees only
  the real columns, so ``weightedmean`` weighs them as for the text alone, ``cls`` takes the
  first real token and an instruction is cut from the real tokens; its output carries all the
  columns again.

Otherwise (``strip``; ``ignore`` on 6.2+) the ``Transformer`` hook's repair is all ``Pooling`` needs.
"""

from __future__ import annotations

from collections.abc import MutableMapping
from typing import Any

import torch
from torch import Tensor, nn

from ...drift import strip_positions
from ...features import copy_features, exclude_leading_tokens, virtual_after_padding
from ...hooks import ForwardHook, ForwardPreHook

__all__ = [
    "PoolingPromptHook",
    "PoolingRealColumnsHook",
    "WeightedMeanOrderHook",
    "WeightedMeanRestoreHook",
    "is_weighted_mean",
]


class PoolingPromptHook(ForwardPreHook):
    """Pre-hook on ``Pooling`` under ``extend``: exclude the instruction, not the virtual tokens.

    ``Pooling(include_prompt=False)`` zeroes the first ``prompt_length`` attended positions. With
    ``m`` attending virtual-token entries in front, those would be the virtual tokens. This hook
    hands Pooling a mask with the instruction already excluded after the first ``m`` columns, and
    no ``prompt_length``, in a copy of the features dict.
    """

    def __call__(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        features = args[0] if args else None
        if getattr(module, "include_prompt", True) or not isinstance(features, MutableMapping):
            return None
        mask, ids, count = features.get("attention_mask"), features.get("input_ids"), features.get("prompt_length")
        if count is None or not isinstance(mask, Tensor) or not isinstance(ids, Tensor):
            return None
        m = mask.shape[1] - ids.shape[1]
        if m <= 0:
            return None
        real = exclude_leading_tokens(mask.narrow(1, m, mask.shape[1] - m), count)
        repaired = copy_features(features)
        del repaired["prompt_length"]
        repaired["attention_mask"] = torch.cat((mask.narrow(1, 0, m), real), dim=1)
        if is_weighted_mean(module):
            # WeightedMeanOrderHook must see where the padding is, not where the instruction was cut.
            repaired[_PADDING_MASK] = mask
        return (repaired, *args[1:]), kwargs


def is_weighted_mean(pooling: nn.Module) -> bool:
    """Return whether ``pooling`` pools by ``weightedmean`` (alone or among other modes)."""
    # sentence-transformers 6.x: ``pooling_mode`` (a name or names); before: one flag per mode.
    if getattr(pooling, "pooling_mode_weightedmean_tokens", False):
        return True
    mode = getattr(pooling, "pooling_mode", ())
    return "weightedmean" in ((mode,) if isinstance(mode, str) else tuple(mode))


# Private keys, only ever in maskpatch's own copies of a features dict, popped again by
# WeightedMeanRestoreHook: the features WeightedMeanOrderHook reordered or PoolingRealColumnsHook
# cut, and the padding mask PoolingPromptHook had before it cut the instruction out.
_ORIGINAL = "maskpatch_weightedmean_original"
_PADDING_MASK = "maskpatch_padding_mask"


def _prepended_columns(args: tuple[Any, ...]) -> tuple[MutableMapping[str, Any], Tensor, Tensor, int] | None:
    """``(features, token_embeddings, attention_mask, M)`` when ``Pooling``'s features carry ``M > 0`` leading columns.

    ``M`` is the mask's width beyond ``input_ids``; None when the features are not a dict of
    ``(B, L, D)`` token embeddings with a ``(B, L)`` mask that is wider than the ids.
    """
    features = args[0] if args else None
    if not isinstance(features, MutableMapping):
        return None
    tokens, mask, ids = features.get("token_embeddings"), features.get("attention_mask"), features.get("input_ids")
    if not (isinstance(tokens, Tensor) and isinstance(mask, Tensor) and isinstance(ids, Tensor)):
        return None
    m = mask.shape[1] - ids.shape[1]
    if m <= 0 or mask.dim() != 2 or tokens.dim() != 3 or tokens.shape[1] != mask.shape[1]:
        return None
    return features, tokens, mask, m


class WeightedMeanOrderHook(ForwardPreHook):
    """Pre-hook on a ``weightedmean`` ``Pooling`` under ``extend``: the virtual tokens after the left padding.

    ``Pooling`` weighs the attended positions by their column counted from the first attended one.
    Under ``extend`` that is the first virtual token, so with left padding the pads between the
    virtual and the real tokens would shift every real token's weight. This hook hands ``Pooling``
    a copy of the features with the columns reordered (pads, virtual tokens, text): each position
    then gets the weight it gets for the text alone. Every other mode is order independent or picks
    the same position (``cls``: the first virtual token; ``lasttoken``: the last text token).
    :class:`WeightedMeanRestoreHook` puts the caller's order back in ``Pooling``'s output.
    """

    def __call__(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        found = _prepended_columns(args)
        if found is None:
            return None
        features, tokens, mask, m = found
        order = virtual_after_padding(features.get(_PADDING_MASK, mask), m)
        reordered = copy_features(features)
        reordered.pop(_PADDING_MASK, None)
        reordered["token_embeddings"] = tokens.gather(1, order.unsqueeze(-1).expand_as(tokens))
        reordered["attention_mask"] = mask.gather(1, order)
        reordered[_ORIGINAL] = (tokens, mask)
        return (reordered, *args[1:]), kwargs


class PoolingRealColumnsHook(ForwardPreHook):
    """Pre-hook on ``Pooling`` under ``ignore``, on sentence-transformers before 6.2: pool the real columns only.

    Under ``ignore`` the ``M`` virtual-token columns are in the mask as "do not attend". Those
    releases' ``Pooling`` reads some positions by column index instead of through the mask:
    ``weightedmean`` weighs column ``j`` by ``j + 1`` (before 6.2), ``cls`` takes column 0
    (before 5.5) and ``include_prompt=False`` zeroes the first ``prompt_length`` columns (before
    5.3). The ``M`` excluded columns in front would shift every real token's weight, make ``cls``
    take virtual token 0 and cut the virtual tokens instead of the instruction. This hook hands
    ``Pooling`` a copy of the features whose token embeddings and mask are views of the ``N`` real
    columns; the modes that read the mask (mean, max, lasttoken, ...) pool exactly what they pool
    over the whole width. :class:`WeightedMeanRestoreHook` puts every column back in ``Pooling``'s
    output, so what follows sees the ``M + N`` columns of ``ignore``.
    """

    def __call__(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        found = _prepended_columns(args)
        if found is None:
            return None
        features, tokens, mask, m = found
        cut = copy_features(features)
        cut["token_embeddings"] = strip_positions(tokens, m)
        cut["attention_mask"] = strip_positions(mask, m)
        cut[_ORIGINAL] = (tokens, mask)
        return (cut, *args[1:]), kwargs


class WeightedMeanRestoreHook(ForwardHook):
    """Forward hook on the same ``Pooling``: the features it returns carry the caller's columns, in order, again.

    It undoes what :class:`WeightedMeanOrderHook` or :class:`PoolingRealColumnsHook` handed ``Pooling``.
    """

    def __call__(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> Any:
        if not isinstance(output, MutableMapping):
            return None
        # The dict is maskpatch's own copy (Pooling returns what it was given), so it is changed in place.
        if _ORIGINAL in output:
            output["token_embeddings"], output["attention_mask"] = output.pop(_ORIGINAL)
        output.pop(_PADDING_MASK, None)
        return None
