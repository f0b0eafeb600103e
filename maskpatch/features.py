"""Pure repairs of a sentence-transformers features dict (the dict its modules pass along).

Each function returns a new dict and never modifies the caller's dict or tensors: gradient
caching and checkpointing forward the same dict twice and must get the same result twice.
"""

from __future__ import annotations

import copy
from collections.abc import MutableMapping
from typing import Any, TypeVar, cast

import torch
from torch import Tensor

from .drift import Policy, prefix_mask, strip_positions

__all__ = ["copy_features", "exclude_leading_tokens", "repair_features", "virtual_after_padding"]


Features = TypeVar("Features", bound=MutableMapping[str, Any])


def copy_features(features: Features) -> Features:
    """Return a shallow copy of ``features`` of the same type (``dict`` or ``BatchEncoding``)."""
    if isinstance(features, dict) and type(features) is dict:
        # dict.copy is what copy.copy calls for a dict, but torch.compile traces only this spelling.
        return cast(Features, features.copy())
    return copy.copy(features)


def repair_features(features: Features, key: str, m: int, policy: Policy) -> Features:
    """Return a copy of ``features`` whose ``key`` output and ``attention_mask`` line up again.

    ``features[key]`` has ``m`` more positions than ``features["attention_mask"]`` (``ONES``: 1
    attends). ``extend`` prepends ``m`` attending mask entries, ``ignore`` ``m`` non-attending
    ones, and ``strip`` cuts the first ``m`` positions (views, not copies) from ``features[key]``
    and from every layer of ``all_layer_embeddings``.
    """
    repaired = copy_features(features)
    if policy == "strip":
        repaired[key] = strip_positions(features[key], m)
        layers = features.get("all_layer_embeddings")
        if layers is not None:
            repaired["all_layer_embeddings"] = type(layers)(strip_positions(h, m) for h in layers)
    else:
        repaired["attention_mask"] = prefix_mask(features["attention_mask"], m, attend=policy == "extend")
    return repaired


def exclude_leading_tokens(mask: Tensor, count: Tensor | int) -> Tensor:
    """Return a copy of ``mask`` (``ONES``: 1 attends) with each row's first ``count`` attended tokens zeroed.

    Left padding is skipped: the count starts at each row's first attended position. This is what
    sentence-transformers' ``Pooling(include_prompt=False)`` does to leave the instruction prompt
    out, computed without reading values on the host::

        mask  0 0 1 1 1 1    count=2  ->  0 0 0 0 1 1
        mask  1 1 1 1 0 0    count=2  ->  0 0 1 1 0 0
    """
    first = (mask != 0).int().argmax(dim=1, keepdim=True)
    positions = torch.arange(mask.shape[1], device=mask.device).unsqueeze(0)
    if isinstance(count, Tensor):
        count = count.reshape(-1)[:1].to(mask.device).unsqueeze(1)
    return mask.masked_fill(positions < first + count, 0)


def virtual_after_padding(mask: Tensor, m: int) -> Tensor:
    """Return per row the column order that moves ``mask``'s ``m`` leading virtual entries past its left padding.

    ``mask`` (``ONES``: 1 attends) is ``(B, m + N)``: ``m`` virtual-token entries, then the text's
    ``N`` columns, left-padded or not. Gathering a row's columns in the returned order puts the
    pads first, then the virtual tokens, then the text, so that a pooling that counts positions
    from the first attended one (``weightedmean``) counts them as for the text alone. Right
    padding and unpadded rows keep their order. The result is ``torch.long``, ``(B, m + N)``::

        mask   1 1 | 0 0 1 1 1   (m = 2, 2 pads)   ->  order  2 3 0 1 4 5 6
        mask   1 1 | 1 1 1 0 0   (right padding)   ->  order  0 1 2 3 4 5 6
    """
    pads = (mask.narrow(1, m, mask.shape[1] - m) != 0).int().argmax(dim=1, keepdim=True)
    columns = torch.arange(mask.shape[1], device=mask.device).unsqueeze(0)
    return torch.where(columns < pads, columns + m, torch.where(columns < pads + m, columns - pads, columns))
