"""The built-in model-family adapters, registered ahead of any other the first time the registry is used.

Importing this package imports none of the libraries the adapters serve: each adapter looks for
its library in ``sys.modules`` when asked whether it matches a model.
"""

from __future__ import annotations

from ..registry import Adapter, register_adapter
from .generic import PrependedTokensAdapter
from .peft import PeftAdapter
from .pipelines import PipelineAdapter
from .sentence_transformers import SentenceTransformersAdapter
from .trainer import TrainerAdapter
from .x_transformers import XTransformersAdapter

__all__ = [
    "PeftAdapter",
    "PipelineAdapter",
    "PrependedTokensAdapter",
    "SentenceTransformersAdapter",
    "TrainerAdapter",
    "XTransformersAdapter",
    "builtin_adapters",
    "register_builtin_adapters",
]


def builtin_adapters() -> list[Adapter]:
    """Return new instances of maskpatch's own adapters, in the order the registry tries them."""
    # sentence-transformers first: a PeftModel inside a SentenceTransformer is left to it. Hosts
    # (a pipeline, a Trainer) are objects that call a PeftModel, not modules. The generic adapter
    # matches nothing: ``prepended_tokens=M`` selects it.
    return [
        SentenceTransformersAdapter(),
        PeftAdapter(),
        XTransformersAdapter(),
        PipelineAdapter(),
        TrainerAdapter(),
        PrependedTokensAdapter(),
    ]


def register_builtin_adapters() -> None:
    """Register (again) maskpatch's own adapters, replacing any of the same name (idempotent).

    The registry does this by itself the first time it is used; call it to put back a built-in
    adapter that was unregistered.
    """
    for adapter in builtin_adapters():
        register_adapter(adapter, replace=True)
