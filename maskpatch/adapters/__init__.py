"""The built-in model-family adapters, registered when :mod:`maskpatch` is imported.

Importing this package imports none of the libraries the adapters serve: each adapter looks for
its library in ``sys.modules`` when asked whether it matches a model.
"""

from __future__ import annotations

from ..registry import register_adapter
from .peft import PeftAdapter
from .pipelines import PipelineAdapter
from .sentence_transformers import SentenceTransformersAdapter
from .trainer import TrainerAdapter
from .x_transformers import XTransformersAdapter

__all__ = [
    "PeftAdapter",
    "PipelineAdapter",
    "SentenceTransformersAdapter",
    "TrainerAdapter",
    "XTransformersAdapter",
    "register_builtin_adapters",
]


def register_builtin_adapters() -> None:
    """Register maskpatch's own adapters (idempotent)."""
    register_adapter(SentenceTransformersAdapter(), replace=True)
    register_adapter(PeftAdapter(), replace=True)  # after sentence-transformers: a PeftModel called directly
    register_adapter(XTransformersAdapter(), replace=True)
    register_adapter(PipelineAdapter(), replace=True)  # hosts: objects that call a PeftModel (not modules)
    register_adapter(TrainerAdapter(), replace=True)
