"""Whether a PeftModel's adapters are disabled now: ``_adapters_disabled`` exists from peft 0.18.

peft 0.13 - 0.17 keep no flag: inside ``disable_adapter()`` a prompt-learning model's ``forward``
is swapped, as an instance attribute, for its base model's ``forward`` (and LoRA-like tuners
disable their layers, which adds no positions either way). peft 0.18+ also sets
``_adapters_disabled``. Learned from the object: the flag when it has one, the swap otherwise.
"""

from __future__ import annotations

from typing import Any

__all__ = ["adapters_disabled"]


def adapters_disabled(peft_model: Any) -> bool:
    """Return whether ``peft_model``'s adapters are disabled now (inside ``disable_adapter()``)."""
    flag = peft_model.__dict__.get("_adapters_disabled")
    if flag is not None:
        return bool(flag)
    swapped = peft_model.__dict__.get("forward")
    return swapped is not None and getattr(swapped, "__self__", None) is peft_model.base_model
