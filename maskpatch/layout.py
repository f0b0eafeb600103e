"""The virtual-token layout, read from the *active* PEFT adapter at call time.

PEFT's prompt tuning, P-tuning and multitask prompt tuning prepend ``num_virtual_tokens``
positions to the encoder input. Prefix tuning and Cartridge feed their prompt through
``past_key_values`` and add no positions; LoRA and the other tuners add none either; and inside
``peft_model.disable_adapter()`` nothing is prepended. Adapters switch with ``set_adapter``, so
the adapter state is read on every call, never stored at ``apply`` time.

What a given adapter's config means is cached: the layout of one adapter config object is
computed once and reused while that config object is the active one (see :func:`active_layout`).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

from .compat.peft_disabled import adapters_disabled

__all__ = ["VirtualLayout", "active_layout", "is_peft_model"]

# PEFT types that prepend positions to the token sequence. Prefix tuning and Cartridge are
# prompt learning too, but extend the key/value cache instead of the sequence.
_POSITION_ADDING = frozenset({"PROMPT_TUNING", "P_TUNING", "MULTITASK_PROMPT_TUNING"})


@dataclass(frozen=True)
class VirtualLayout:
    """What the active adapter prepends: ``num_virtual_tokens`` positions (0 when none)."""

    adapter: str | None
    peft_type: str | None
    num_virtual_tokens: int

    @property
    def adds_positions(self) -> bool:
        """True when token-level outputs are ``num_virtual_tokens`` longer than the input."""
        return self.num_virtual_tokens > 0


NO_LAYOUT = VirtualLayout(adapter=None, peft_type=None, num_virtual_tokens=0)

# (id(config), adapter name) -> (config, layout). The entry holds the config itself, so the id
# cannot be reused by another object while the entry lives, and a hit is confirmed by identity.
# Bounded: a process that creates adapters without end drops the whole memo now and then. It is
# process-local and never pickled; models and hooks carry no cache.
_LAYOUTS: dict[tuple[int, str], tuple[object, VirtualLayout]] = {}
_MAX_LAYOUTS = 256


def is_peft_model(obj: object) -> bool:
    """Return whether ``obj`` is a ``peft.PeftModel``, without importing peft."""
    peft = sys.modules.get("peft")
    return peft is not None and isinstance(obj, peft.PeftModel)


def active_layout(model: Any) -> VirtualLayout:
    """Return the layout of ``model``'s active adapter now; :data:`NO_LAYOUT` if it adds no positions.

    ``model`` may be anything: objects that are not a ``PeftModel`` have no layout. The adapter
    state (whether adapters are disabled, ``active_adapter`` and the config object registered under it) is
    read on every call, so ``set_adapter``, ``add_adapter``, ``delete_adapter`` and
    ``disable_adapter()`` take effect at once; what that config means is computed once per config
    object. PEFT sizes an adapter's prompt when the adapter is added, so a config is not expected
    to change in place afterwards.
    """
    if not is_peft_model(model) or adapters_disabled(model):
        return NO_LAYOUT
    adapter = model.active_adapter
    config = model.peft_config[adapter]
    cached = _LAYOUTS.get((id(config), adapter))
    if cached is not None and cached[0] is config:
        return cached[1]
    return _remember(adapter, config)


def _remember(adapter: str, config: Any) -> VirtualLayout:
    layout = _layout_of(adapter, config)
    if len(_LAYOUTS) >= _MAX_LAYOUTS:
        _LAYOUTS.clear()
    _LAYOUTS[(id(config), adapter)] = (config, layout)
    return layout


def _layout_of(adapter: str, config: Any) -> VirtualLayout:
    """Return what adapter ``adapter`` with PEFT config ``config`` prepends (the uncached read)."""
    peft_type = str(getattr(config.peft_type, "value", config.peft_type))
    if peft_type not in _POSITION_ADDING:
        return VirtualLayout(adapter=adapter, peft_type=peft_type, num_virtual_tokens=0)
    return VirtualLayout(adapter=adapter, peft_type=peft_type, num_virtual_tokens=int(config.num_virtual_tokens))
