"""The keyword that carries the generation cache: ``past_key_values``, or ``cache`` since transformers 5.24.

transformers 5.24 renamed the cache keyword of ``generate``'s per-step inputs and of the models'
forwards from ``past_key_values`` to ``cache`` (``@deprecate_kwarg("past_key_values", "5.40.0",
new_name="cache")``); the old name is still accepted, with a ``FutureWarning``, until 5.40. PEFT
(every release through 0.21.2) still reads ``past_key_values`` in ``prepare_inputs_for_generation``.
Everything maskpatch knows about the two names is here:

* :func:`generation_cache_name`: the name the installed transformers' ``generate`` passes the
  cache under, learned from the function it calls every step;
* :func:`cache_name_in`: the name under which a given keyword dict holds a cache;
* :func:`with_cache_name`: a copy of a keyword dict with its cache moved to another name.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Mapping
from typing import Any

from ..errors import UnsupportedVersionError

__all__ = [
    "CACHE",
    "CACHE_NAMES",
    "LEGACY_CACHE",
    "PEFT_CACHE_NAME",
    "cache_name_in",
    "generation_cache_name",
    "with_cache_name",
]

CACHE = "cache"
LEGACY_CACHE = "past_key_values"
#: Every name a cache may go by, the current one first.
CACHE_NAMES = (CACHE, LEGACY_CACHE)
#: The name PEFT's ``prepare_inputs_for_generation`` reads and writes (peft 0.13 through 0.21.2).
#: maskpatch checks at every patched ``generate`` step that PEFT acted on the cache as expected.
PEFT_CACHE_NAME = LEGACY_CACHE


@functools.cache
def generation_cache_name() -> str:
    """Return the keyword the installed transformers' ``generate`` passes the cache under.

    ``cache`` (transformers 5.24 on) or ``past_key_values``, read from the signature of
    ``GenerationMixin.prepare_inputs_for_generation``, the function ``generate`` calls at every
    step. Raises :class:`~maskpatch.errors.UnsupportedVersionError` when it names neither, so
    that a transformers that moved the cache again is refused instead of being half repaired.
    """
    import transformers
    from transformers.generation.utils import GenerationMixin

    parameters = inspect.signature(GenerationMixin.prepare_inputs_for_generation).parameters
    for name in CACHE_NAMES:
        if name in parameters:
            return name
    raise UnsupportedVersionError(
        f"transformers {transformers.__version__}: expected GenerationMixin.prepare_inputs_for_generation to take "
        f"the cache as one of {list(CACHE_NAMES)}, but its parameters are {list(parameters)}; maskpatch cannot "
        "tell a generate step that reuses the cache from the first one"
    )


def cache_name_in(kwargs: Mapping[str, Any]) -> str | None:
    """Return the key under which ``kwargs`` holds a cache (a value that is not None), or None when none does.

    Raises :class:`~maskpatch.errors.UnsupportedVersionError` when both names hold different
    objects: then no one can tell which of the two caches the model will use.
    """
    found = [name for name in CACHE_NAMES if kwargs.get(name) is not None]
    if len(found) == 2 and kwargs[CACHE] is not kwargs[LEGACY_CACHE]:
        raise UnsupportedVersionError(
            f"expected one cache, under {CACHE!r} or {LEGACY_CACHE!r}, but got two different ones; transformers "
            f"{_version()} uses {CACHE!r} and ignores {LEGACY_CACHE!r} when both are given"
        )
    return found[0] if found else None


def with_cache_name(kwargs: Mapping[str, Any], name: str) -> dict[str, Any]:
    """Return a copy of ``kwargs`` whose cache (if any) is under ``name``, the other name removed.

    ``kwargs`` is not modified; without a cache the copy is ``kwargs`` without a ``None`` entry
    under the other name.
    """
    found = cache_name_in(kwargs)
    new = {key: value for key, value in kwargs.items() if key not in CACHE_NAMES}
    if found is not None:
        new[name] = kwargs[found]
    elif name in kwargs:
        new[name] = kwargs[name]
    return new


def _version() -> str:
    import transformers

    return str(transformers.__version__)
