"""The class-level wrappers an install with a hook on a PeftModel holds while it lives.

``peft_model.disable_adapter()`` crashes in PEFT 0.21 for prompt learning on a base model without
``prepare_inputs_for_generation`` (BERT and every other encoder). There is no hook point for it,
so maskpatch wraps ``PeftModel.disable_adapter`` with wrapt (on the class, so patched models still
pickle) while an install with a hook on a PeftModel lives: the first such install puts the
wrapper on, the removal of the last one takes it off (:func:`hold_disable_adapter_wrapper`). The
wrapper changes nothing for models maskpatch has not patched. For ``generate`` on transformers
5.24+ (the cache keyword renamed), the class-level wrapper of :mod:`maskpatch.adapters.peft_generation`
is held and released the same way.
"""

from __future__ import annotations

import contextlib
import sys
import threading
import weakref
from collections.abc import Iterator
from typing import Any

import wrapt

from ...compat.once import warn_once
from ...compat.versions import installed_version
from ...hooks import InstallRecord
from ..peft_generation import carries_maskpatch_hooks, ensure_generation_wrapper, remove_generation_wrapper

__all__ = [
    "ensure_disable_adapter_wrapper",
    "hold_disable_adapter_wrapper",
    "release_unheld_wrappers",
    "remove_disable_adapter_wrapper",
]

_WRAPPER_LOCK = threading.RLock()
# The installs that hold the class-level wrapper; the last one to go takes it off again. Weak:
# an install dropped with its model without remove() does not hold the wrapper forever.
_WRAPPER_HOLDERS: weakref.WeakSet[InstallRecord] = weakref.WeakSet()


def hold_disable_adapter_wrapper(record: InstallRecord) -> None:
    """Put the ``disable_adapter`` wrapper on (if peft is imported) for as long as ``record``'s install lives.

    Called when a hook that needs it is registered; the install's removal releases it, and the
    release of the last holder restores PEFT's own method exactly.
    """
    with _WRAPPER_LOCK:
        if record in _WRAPPER_HOLDERS or sys.modules.get("peft.peft_model") is None:
            return
        ensure_disable_adapter_wrapper()
        ensure_generation_wrapper()  # generate on transformers 5.24+: see adapters.peft_generation
        _WRAPPER_HOLDERS.add(record)
        record.releases.append(_release_disable_adapter_wrapper)


def _release_disable_adapter_wrapper(record: InstallRecord) -> None:
    with _WRAPPER_LOCK:
        _WRAPPER_HOLDERS.discard(record)
        release_unheld_wrappers()


def release_unheld_wrappers() -> bool:
    """Take the class-level PEFT wrappers off when no live install holds them; return whether it did.

    The removal of the last install does this by itself. An install whose model was garbage
    collected without ``remove()`` drops out of the holders silently, so its wrappers stay until
    the next removal or a call of this function.
    """
    with _WRAPPER_LOCK:
        if _WRAPPER_HOLDERS:
            return False
        removed = remove_disable_adapter_wrapper()
        return remove_generation_wrapper() or removed


def ensure_disable_adapter_wrapper() -> None:
    """Wrap ``peft.PeftModel.disable_adapter`` with :func:`_disable_adapter_wrapper` unless it is wrapped (idempotent).

    The wrapper sits on the class, never on an instance (instance-level wrapt proxies break
    ``pickle`` and ``copy.deepcopy``), and calls PEFT's method unchanged for every model that
    maskpatch has not patched. :func:`remove_disable_adapter_wrapper` takes it off again.
    """
    peft_model = sys.modules.get("peft.peft_model")
    if peft_model is None:
        return
    if "disable_adapter" not in getattr(peft_model, "PeftModel", object).__dict__:
        warn_once(
            "peft-disable-adapter",
            "maskpatch expected peft.peft_model.PeftModel to define disable_adapter, but it does not (peft "
            f"{installed_version('peft')}); disable_adapter() on a patched prompt-learning encoder is left unrepaired",
        )
        return
    with _WRAPPER_LOCK:
        if getattr(peft_model.PeftModel.__dict__["disable_adapter"], "_self_wrapper", None) is _disable_adapter_wrapper:
            return
        wrapt.wrap_function_wrapper(peft_model.PeftModel, "disable_adapter", _disable_adapter_wrapper)


def remove_disable_adapter_wrapper() -> bool:
    """Restore PEFT's own ``PeftModel.disable_adapter``; return whether the wrapper was there."""
    peft_model = sys.modules.get("peft.peft_model")
    if peft_model is None:
        return False
    with _WRAPPER_LOCK:
        current = peft_model.PeftModel.__dict__.get("disable_adapter")
        if getattr(current, "_self_wrapper", None) is not _disable_adapter_wrapper:
            return False
        type.__setattr__(peft_model.PeftModel, "disable_adapter", current.__wrapped__)
        return True


def _disable_adapter_wrapper(wrapped: Any, instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """wrapt wrapper of ``PeftModel.disable_adapter``: PEFT's method, made to work on patched encoders."""
    if instance is None or not _needs_generation_stub(instance):
        return wrapped(*args, **kwargs)
    return _disabled_without_generation(wrapped, instance, args, kwargs)


def _needs_generation_stub(peft_model: Any) -> bool:
    # Patched by this adapter (a hook on the PeftModel) or by the sentence-transformers one (a
    # position hook on its base model).
    return (
        carries_maskpatch_hooks(peft_model)
        and peft_model.peft_config[peft_model.active_adapter].is_prompt_learning
        and not hasattr(peft_model.base_model, "prepare_inputs_for_generation")
    )


def _generation_unsupported(*args: Any, **kwargs: Any) -> Any:
    """Stands in for ``prepare_inputs_for_generation`` of a base model that cannot generate."""
    raise NotImplementedError("this base model does not generate; it has no prepare_inputs_for_generation")


@contextlib.contextmanager
def _disabled_without_generation(
    wrapped: Any, peft_model: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> Iterator[Any]:
    """Run PEFT's ``disable_adapter`` with a stand-in for the ``prepare_inputs_for_generation`` it swaps.

    PEFT swaps ``forward`` and ``prepare_inputs_for_generation`` for the base model's; the base
    model of an encoder has no ``prepare_inputs_for_generation``, so PEFT crashes. The stand-in
    lives in the base model's ``__dict__`` for the duration of the block only, and both entries
    it leads PEFT to write are removed on exit.
    """
    base = peft_model.base_model
    base.__dict__["prepare_inputs_for_generation"] = _generation_unsupported
    try:
        with wrapped(*args, **kwargs) as value:
            yield value
    finally:
        for obj in (base, peft_model):
            if obj.__dict__.get("prepare_inputs_for_generation") is _generation_unsupported:
                del obj.__dict__["prepare_inputs_for_generation"]
