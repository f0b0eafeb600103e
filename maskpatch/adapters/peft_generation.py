"""``generate`` of a patched PeftModel on every transformers: PEFT's step preparation sees the cache under its name.

PEFT's ``prepare_inputs_for_generation`` (``PeftModelForCausalLM`` and ``PeftModelForSeq2SeqLM``,
peft 0.21.2) reads and writes the cache as ``past_key_values``. Since transformers 5.24
``generate`` passes it as ``cache``, so PEFT takes every step for the first: it prepends the
prompt again (prompt tuning, P-tuning, multitask prompt tuning) or puts a fresh prefix under
``past_key_values``, which the model ignores because it also gets ``cache`` (prefix tuning,
Cartridge). Nothing fails; the generated text is wrong and depends on the padding.

maskpatch wraps both classes' ``prepare_inputs_for_generation`` once per process with wrapt (on
the class, never an instance, so patched models still pickle). For a model maskpatch has patched,
:func:`_prepare_wrapper` runs PEFT's method on a :class:`_PeftView` of the model, whose base
model's preparation hands the cache to PEFT under PEFT's name; PEFT's result goes back to
transformers under transformers' name (both names from :mod:`maskpatch.compat.generation`). At
every step that reuses a filled cache it checks what PEFT did: PEFT must keep that cache and must
not prepend the prompt again; otherwise it raises :class:`~maskpatch.errors.UnsupportedVersionError`
instead of generating a wrong answer. For every model maskpatch has not patched (and while an
adapter is disabled, when PEFT swaps the method out) PEFT's method runs unchanged.
"""

from __future__ import annotations

import functools
import sys
import threading
from collections.abc import Callable, Mapping
from typing import Any

import wrapt
from torch import nn

from ..compat.generation import PEFT_CACHE_NAME, cache_name_in, generation_cache_name, with_cache_name
from ..errors import UnsupportedVersionError
from ..hooks import MaskpatchHook
from ..layout import active_layout

__all__ = [
    "GENERATING_CLASSES",
    "carries_maskpatch_hooks",
    "ensure_generation_wrapper",
    "generates_with_peft",
    "remove_generation_wrapper",
]

#: The PEFT classes whose ``prepare_inputs_for_generation`` reads the cache.
GENERATING_CLASSES = ("PeftModelForCausalLM", "PeftModelForSeq2SeqLM")

_LOCK = threading.Lock()


def carries_maskpatch_hooks(peft_model: Any) -> bool:
    """Return whether ``peft_model`` or its base model carries a maskpatch pre-hook (patched by any adapter)."""
    return any(
        isinstance(hook, MaskpatchHook)
        for module in (peft_model, peft_model.base_model)
        for hook in module._forward_pre_hooks.values()
    )


def generates_with_peft(peft_model: Any) -> bool:
    """Return whether ``peft_model`` is one of :data:`GENERATING_CLASSES` (or a subclass)."""
    return any(cls.__name__ in GENERATING_CLASSES for cls in type(peft_model).__mro__)


def ensure_generation_wrapper() -> None:
    """Wrap ``prepare_inputs_for_generation`` of :data:`GENERATING_CLASSES` unless wrapped (idempotent).

    Also learns the installed transformers' cache name now, so that a transformers that names
    it neither way is refused when the model is patched (:func:`generation_cache_name` raises).
    :func:`remove_generation_wrapper` takes the wrappers off again.
    """
    generation_cache_name()
    peft_model = sys.modules.get("peft.peft_model")
    if peft_model is None:
        return
    with _LOCK:
        for cls in (getattr(peft_model, name) for name in GENERATING_CLASSES):
            if not _is_wrapped(cls.__dict__["prepare_inputs_for_generation"]):
                wrapt.wrap_function_wrapper(cls, "prepare_inputs_for_generation", _prepare_wrapper)


def remove_generation_wrapper() -> bool:
    """Restore PEFT's own ``prepare_inputs_for_generation``; return whether a wrapper was there."""
    peft_model = sys.modules.get("peft.peft_model")
    if peft_model is None:
        return False
    removed = False
    with _LOCK:
        for cls in (getattr(peft_model, name) for name in GENERATING_CLASSES):
            current = cls.__dict__["prepare_inputs_for_generation"]
            if _is_wrapped(current):
                type.__setattr__(cls, "prepare_inputs_for_generation", current.__wrapped__)
                removed = True
    return removed


def _is_wrapped(attribute: Any) -> bool:
    return getattr(attribute, "_self_wrapper", None) is _prepare_wrapper


def _prepare_wrapper(wrapped: Any, instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """wrapt wrapper of PEFT's ``prepare_inputs_for_generation`` (see the module docstring)."""
    if not isinstance(instance, nn.Module) or not carries_maskpatch_hooks(instance):
        return wrapped(*args, **kwargs)
    name = generation_cache_name()
    given = cache_name_in(kwargs)
    own: Callable[..., Mapping[str, Any]] = instance.base_model_prepare_inputs_for_generation  # type: ignore[assignment]
    base_prepare = functools.partial(_base_prepare_for_peft, own)
    prepared = wrapped.__func__(_PeftView(instance, base_prepare), *args, **kwargs)
    prepared = with_cache_name(prepared, name)
    _check_step(instance, None if given is None else kwargs[given], prepared, name)
    return prepared


class _PeftView(wrapt.ObjectProxy):  # type: ignore[type-arg]
    """The PeftModel as PEFT's ``prepare_inputs_for_generation`` sees it: its base preparation is replaced.

    Lives for one call; the model itself is not changed.
    """

    def __init__(self, peft_model: nn.Module, base_prepare: Callable[..., dict[str, Any]]) -> None:
        super().__init__(peft_model)
        self._self_base_prepare = base_prepare

    @property
    def base_model_prepare_inputs_for_generation(self) -> Callable[..., dict[str, Any]]:
        return self._self_base_prepare


def _base_prepare_for_peft(base_prepare: Callable[..., Mapping[str, Any]], *args: Any, **kwargs: Any) -> dict[str, Any]:
    """Run the base model's ``prepare_inputs_for_generation``; return its inputs with the cache under PEFT's name.

    Raises :class:`~maskpatch.errors.UnsupportedVersionError` when a cache went in and none came out.
    """
    prepared = base_prepare(*args, **kwargs)
    if cache_name_in(kwargs) is not None and cache_name_in(prepared) is None:
        raise UnsupportedVersionError(
            f"{_versions()}: expected the base model's prepare_inputs_for_generation to pass on the "
            f"cache it was given, under {generation_cache_name()!r}, but it returned only {sorted(prepared)}"
        )
    return with_cache_name(prepared, PEFT_CACHE_NAME)


def _check_step(peft_model: nn.Module, given: Any, prepared: Mapping[str, Any], name: str) -> None:
    """Raise unless PEFT kept a filled cache as it was and did not prepend the prompt again.

    A step with an empty cache (or none) is the first: PEFT injects the prompt or the prefix there.
    """
    if not _holds_tokens(given):
        return
    where = f"{type(peft_model).__name__}.prepare_inputs_for_generation ({_versions()})"
    if prepared.get(name) is not given:
        raise UnsupportedVersionError(
            f"{where}: expected a step after the first to keep its cache, but it was replaced"
        )
    if active_layout(peft_model).adds_positions and prepared.get("inputs_embeds") is not None:
        raise UnsupportedVersionError(
            f"{where}: expected a step after the first to pass only the new tokens, but the prompt was prepended again"
        )


def _holds_tokens(cache: Any) -> bool:
    """Return whether ``cache`` holds past tokens: a filled transformers ``Cache`` (or legacy tuple)."""
    if cache is None:
        return False
    seq_length = getattr(cache, "get_seq_length", None)
    if seq_length is not None:
        return bool(seq_length() > 0)
    return len(cache) > 0 and cache[0][0].shape[-2] > 0


def _versions() -> str:
    import peft
    import transformers

    return f"transformers {transformers.__version__}, peft {peft.__version__}"
