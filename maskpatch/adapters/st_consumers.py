"""Moved to :mod:`maskpatch.adapters.sentence_transformers.consumers`; kept so old pickles load.

maskpatch 0.1.0 defined the ``MultiVectorMask`` hooks here, and a model patched and pickled with
it names them ``maskpatch.adapters.st_consumers.<Class>``. New code imports them from
:mod:`maskpatch.adapters.sentence_transformers`.
"""

from __future__ import annotations

from .sentence_transformers.consumers import ScoringMaskInputHook, ScoringMaskOutputHook, consumer_specs

__all__ = ["ScoringMaskInputHook", "ScoringMaskOutputHook", "consumer_specs"]
