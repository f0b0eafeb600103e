"""The sentence-transformers family: SentenceTransformer and every model built from its modules.

sentence-transformers calls ``self.model.forward(...)`` directly, so hooks on the PeftModel never
fire. The repair therefore sits on the ``Transformer`` input module, whose output dict holds the
token embeddings and the caller's mask together:

* a forward hook measures the drift and repairs the dict for every consumer downstream
  (``Pooling``, ``encode(output_value="token_embeddings")``, ``all_layer_embeddings``);
* a forward pre-hook makes sure the PEFT base model gets position ids that skip padding
  (:class:`maskpatch.hooks.PositionIdsHook`), also for an adapter set after ``apply``;
* under ``extend``, a pre-hook on ``Pooling(include_prompt=False)`` moves the prompt exclusion
  past the virtual tokens, onto the instruction, and on a ``weightedmean`` ``Pooling`` a pre-hook
  and a forward hook move the virtual tokens past any left padding for the weights (and back);
* on sentence-transformers 3.3 - 6.1, which extend the mask inline themselves, a pre-hook hands
  the ``Transformer`` a copy of the features dict, and the output hook measures the drift against
  the caller's mask (:mod:`maskpatch.compat.st_inline_mask`);
* modules that read token-level keys besides the mask (``MultiVectorMask``) get their own pair.

Where sentence-transformers keeps these classes, and under which attribute the ``Transformer``
holds its model, differs between releases: :mod:`maskpatch.compat` knows. The package is split
by the module each hook sits on:

* :mod:`~maskpatch.adapters.sentence_transformers.adapter`: :class:`SentenceTransformersAdapter`
  (``matches``, ``plan``: which module gets which hook);
* :mod:`~maskpatch.adapters.sentence_transformers.transformer`: the hooks on ``Transformer``;
* :mod:`~maskpatch.adapters.sentence_transformers.pooling`: the hooks on ``Pooling``;
* :mod:`~maskpatch.adapters.sentence_transformers.consumers`: the hooks on other modules that
  read the features (``MultiVectorMask``).

Every name is re-exported here: ``from maskpatch.adapters.sentence_transformers import ...``
keeps working, and a model pickled when the hook classes lived in this one module (maskpatch
0.1.0, which names them ``maskpatch.adapters.sentence_transformers.<Class>``) still unpickles.
"""

from __future__ import annotations

from .adapter import SentenceTransformersAdapter
from .consumers import ScoringMaskInputHook, ScoringMaskOutputHook, consumer_specs
from .pooling import (
    PoolingPromptHook,
    PoolingRealColumnsHook,
    WeightedMeanOrderHook,
    WeightedMeanRestoreHook,
    is_weighted_mean,
)
from .transformer import InlineMaskGuardHook, TransformerOutputHook, TransformerPositionHook

__all__ = [
    "InlineMaskGuardHook",
    "PoolingPromptHook",
    "PoolingRealColumnsHook",
    "ScoringMaskInputHook",
    "ScoringMaskOutputHook",
    "SentenceTransformersAdapter",
    "TransformerOutputHook",
    "TransformerPositionHook",
    "WeightedMeanOrderHook",
    "WeightedMeanRestoreHook",
    "consumer_specs",
    "is_weighted_mean",
]
