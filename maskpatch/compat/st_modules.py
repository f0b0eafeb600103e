"""Where sentence-transformers keeps its module classes: moved in 5.4, ``multi_vector_encoder`` new in 5.8.

* ``Transformer``: ``sentence_transformers.models.Transformer`` up to 5.3,
  ``sentence_transformers.base.modules.transformer`` from 5.4;
* ``Pooling``: ``sentence_transformers.models.Pooling`` up to 5.3,
  ``sentence_transformers.sentence_transformer.modules.pooling`` from 5.4;
* the model class: ``SentenceTransformer`` up to 5.3, ``sentence_transformers.base.model.BaseModel``
  (which every model class derives from) from 5.4;
* ``MultiVectorMask``: ``sentence_transformers.multi_vector_encoder.modules.multi_vector_mask``
  from 5.8, none before.

The paths are tried in order, newest first, and learned from what imports: no version number is
consulted, so a backport or a pre-release works as well. A class found under no known path
warns once and leaves that part of sentence-transformers unpatched; an import error never
escapes as ``ModuleNotFoundError``.
"""

from __future__ import annotations

import importlib
import sys
from dataclasses import dataclass

from torch import nn

from .once import warn_once
from .versions import installed_version

__all__ = ["STClasses", "multi_vector_mask_class", "st_classes", "st_model_classes"]

_TRANSFORMER = (
    ("sentence_transformers.base.modules.transformer", "Transformer"),
    ("sentence_transformers.models.Transformer", "Transformer"),
)
_POOLING = (
    ("sentence_transformers.sentence_transformer.modules.pooling", "Pooling"),
    ("sentence_transformers.models.Pooling", "Pooling"),
)
_MULTI_VECTOR_MASK = (("sentence_transformers.multi_vector_encoder.modules.multi_vector_mask", "MultiVectorMask"),)
_MODEL_CLASSES = (
    (("sentence_transformers.base.model", "BaseModel"),),
    (("sentence_transformers.SentenceTransformer", "SentenceTransformer"),),
)


@dataclass(frozen=True)
class STClasses:
    """The sentence-transformers classes maskpatch hooks into."""

    transformer: type[nn.Module]
    pooling: type[nn.Module]


def _find(candidates: tuple[tuple[str, str], ...], *, loaded_only: bool = False) -> type | None:
    """Return the first class ``module:attr`` of ``candidates`` that exists, or None (never raises ImportError)."""
    for module_name, attr in candidates:
        if loaded_only:
            module = sys.modules.get(module_name)
        else:
            try:
                module = importlib.import_module(module_name)
            except ImportError:
                continue
        found = getattr(module, attr, None)
        if isinstance(found, type):
            return found
    return None


def st_classes() -> STClasses | None:
    """Return the ``Transformer`` and ``Pooling`` classes of the imported sentence-transformers, or None.

    None when sentence-transformers has not been imported, and also (with a warning, once) when
    neither class is found where any supported release keeps it: models of that release are then
    left unpatched, and ``apply`` on one raises UnsupportedModelError.
    """
    if "sentence_transformers" not in sys.modules:
        return None
    transformer, pooling = _find(_TRANSFORMER), _find(_POOLING)
    if transformer is None or pooling is None:
        paths = ", ".join(f"{m}.{a}" for m, a in _TRANSFORMER + _POOLING)
        warn_once(
            "st-classes",
            f"maskpatch cannot find sentence-transformers' Transformer and Pooling classes in "
            f"sentence-transformers {installed_version('sentence-transformers')} (looked for {paths}); "
            "sentence-transformers models are left unpatched",
        )
        return None
    return STClasses(transformer, pooling)


def multi_vector_mask_class() -> type[nn.Module] | None:
    """Return sentence-transformers' ``MultiVectorMask`` (5.8+), or None where the release has none."""
    if "sentence_transformers" not in sys.modules:
        return None
    return _find(_MULTI_VECTOR_MASK)


def st_model_classes() -> list[type]:
    """Return the model classes whose construction auto-enable patches, among those already imported.

    5.4+: ``BaseModel`` (every model class derives from it); before: ``SentenceTransformer``
    (``SparseEncoder`` derives from it; the CrossEncoder of those releases is left to ``apply``).
    Looked up in ``sys.modules`` only, never imported (the caller runs while sentence-transformers
    itself is being imported).
    """
    base = _find(_MODEL_CLASSES[0], loaded_only=True)
    if base is not None:
        return [base]
    return [cls for group in _MODEL_CLASSES[1:] if (cls := _find(group, loaded_only=True)) is not None]
