"""The sentence-transformers family (being split by concern: see :mod:`.transformer`)."""

from __future__ import annotations

from .consumers import ScoringMaskInputHook, ScoringMaskOutputHook, consumer_specs
from .transformer import (
    InlineMaskGuardHook,
    PoolingPromptHook,
    SentenceTransformersAdapter,
    TransformerOutputHook,
    TransformerPositionHook,
    WeightedMeanOrderHook,
    WeightedMeanRestoreHook,
)

__all__ = [
    "InlineMaskGuardHook",
    "PoolingPromptHook",
    "ScoringMaskInputHook",
    "ScoringMaskOutputHook",
    "SentenceTransformersAdapter",
    "TransformerOutputHook",
    "TransformerPositionHook",
    "WeightedMeanOrderHook",
    "WeightedMeanRestoreHook",
    "consumer_specs",
]
