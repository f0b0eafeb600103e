"""Extra hooks for sentence-transformers modules that read more than ``attention_mask``.

The ``Transformer`` hook (:mod:`maskpatch.adapters.sentence_transformers.transformer`) repairs the features
dict once, for every module downstream: under ``extend``/``ignore`` the ``attention_mask`` gets
``M`` leading entries, under ``strip`` the token outputs lose their first ``M`` positions. That
is all most consumers need:

* ``SpladePooling`` (SparseEncoder) reads the MLM logits (the ``fill-mask`` task writes them to
  ``token_embeddings``) and ``attention_mask``: the ``Transformer`` hook covers it;
* the CrossEncoder's ``scores`` are 2-D, so there is no drift and nothing to repair;
* ``MultiVectorMask`` (the ColBERT-style multi-vector encoder) also reads ``input_ids`` and
  ``query_expansion_positions``, which keep the caller's ``N`` columns. Under ``extend`` and
  ``ignore`` its mask has ``M + N``, and ``torch.isin(input_ids, skiplist) & mask`` or
  ``mask | query_expansion_positions`` fails to broadcast. The two hooks here handle it.

``MultiVectorMask`` scores the real tokens by their ids (skiplist, allowlist, query expansion);
virtual tokens have no id, so the policy alone decides them: ``extend`` scores them, ``ignore``
does not, and ``strip`` has cut them already.
"""

from __future__ import annotations

from collections.abc import MutableMapping
from typing import Any

from torch import Tensor, nn

from ...compat.st_modules import multi_vector_mask_class
from ...drift import prefix_mask
from ...features import copy_features
from ...handle import HookSpec
from ...hooks import ForwardHook, ForwardPreHook, InstallRecord

__all__ = ["ScoringMaskInputHook", "ScoringMaskOutputHook", "consumer_specs"]


def consumer_specs(module: nn.Module, record: InstallRecord) -> list[HookSpec]:
    """Return the extra hooks ``module`` needs under ``record.policy`` (none for most modules).

    Called by :class:`~maskpatch.adapters.sentence_transformers.adapter.SentenceTransformersAdapter` for
    every module of the model; does not change ``module``.
    """
    scoring_mask = multi_vector_mask_class()  # None before sentence-transformers 5.8
    if scoring_mask is not None and isinstance(module, scoring_mask) and record.policy != "strip":
        return [HookSpec(module, ScoringMaskInputHook(record)), HookSpec(module, ScoringMaskOutputHook(record))]
    return []


def _virtual_count(features: Any) -> int:
    """Return how many leading ``attention_mask`` columns ``input_ids`` lacks (0 when aligned or unknown)."""
    if not isinstance(features, MutableMapping):
        return 0
    mask, ids, tokens = features.get("attention_mask"), features.get("input_ids"), features.get("token_embeddings")
    if not (isinstance(mask, Tensor) and isinstance(ids, Tensor) and isinstance(tokens, Tensor)):
        return 0
    if mask.dim() != 2 or ids.dim() != 2 or tokens.dim() != 3 or tokens.shape[1] != mask.shape[1]:
        return 0
    return max(mask.shape[1] - ids.shape[1], 0)


class ScoringMaskInputHook(ForwardPreHook):
    """Pre-hook on ``MultiVectorMask``: hand it the ``N`` real columns of ``attention_mask``.

    ``input_ids`` and ``query_expansion_positions`` describe the real tokens only, so the scoring
    mask is computed over those; :class:`ScoringMaskOutputHook` puts the virtual columns back. The
    caller's features dict is not modified: the module gets a shallow copy.
    """

    def __call__(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        features: Any = args[0] if args else None
        m = _virtual_count(features)
        if m == 0:
            return None
        mask = features["attention_mask"]
        real = copy_features(features)
        real["attention_mask"] = mask.narrow(1, m, mask.shape[1] - m)
        return (real, *args[1:]), kwargs


class ScoringMaskOutputHook(ForwardHook):
    """Forward hook on ``MultiVectorMask``: prepend the policy's virtual columns to the scoring mask.

    The scoring mask is boolean (``True`` scores the position): ``extend`` prepends ``True``
    (virtual tokens are scored), ``ignore`` prepends ``False``. The result has as many columns as
    ``token_embeddings``, which the multi-vector ``encode`` slices with it.
    """

    def __call__(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> Any:
        if not isinstance(output, MutableMapping):
            return None
        mask, tokens = output.get("attention_mask"), output.get("token_embeddings")
        if not (isinstance(mask, Tensor) and isinstance(tokens, Tensor)) or mask.dim() != 2 or tokens.dim() != 3:
            return None
        m = tokens.shape[1] - mask.shape[1]
        if m <= 0:
            return None
        repaired = copy_features(output)
        repaired["attention_mask"] = prefix_mask(mask, m, attend=self.record.policy == "extend")
        return repaired
