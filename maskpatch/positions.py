"""How a base model numbers its positions: the one place that knows each architecture's numbering.

The rule (``docs/policies.md``): the position ids maskpatch passes a model are the ones the model
itself uses for the same text alone, unpadded, with the ``M`` virtual tokens in front. PEFT hands
the base model ``inputs_embeds`` and drops ``position_ids``, so that is the numbering the model
gives an ``M + N``-long ``inputs_embeds`` with no padding:

* most models count from 0 (BERT, ELECTRA, DistilBERT, GPT-2, and every rotary model: Llama,
  Qwen, Mistral, Gemma, ModernBERT);
* fairseq-style models (RoBERTa, XLM-RoBERTa, MPNet, CamemBERT, ...) count from
  ``padding_idx + 1`` of their embeddings module, read from the module itself (MPNet fixes it
  at 1 whatever the config's pad id says);
* models whose forward takes no ``position_ids`` (T5's relative bias, BLOOM's ALiBi, which it
  computes from the mask) are left to their own numbering.

Where no position ids can make a padded text equal to the text alone, the scheme names the limit
(:attr:`PositionScheme.left_padding_limit`, :attr:`PositionScheme.sliding_window`), and
:mod:`maskpatch.limits` warns when a batch runs into it. A scheme is computed once per install,
from the module tree and config, never per forward.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["PositionScheme", "position_scheme"]

# Architectures (``config.model_type``) whose attention depends on sequence indices that no
# position ids reach: left padding changes their result, whatever maskpatch passes.
_INDEX_RELATIVE = {
    "t5": "T5's relative attention bias counts the pads between tokens, and T5 takes no position ids",
    "mt5": "mT5's relative attention bias counts the pads between tokens, and mT5 takes no position ids",
    "umt5": "UMT5's relative attention bias counts the pads between tokens, and UMT5 takes no position ids",
    "longt5": "LongT5's relative attention bias counts the pads between tokens, and LongT5 takes no position ids",
    "mpnet": "MPNet's relative attention bias is computed from sequence indices, which count the pads",
    "deberta": "DeBERTa's relative attention is computed from sequence indices, which count the pads",
    "deberta-v2": "DeBERTa-v2's relative attention is computed from sequence indices, which count the pads",
}


@dataclass(frozen=True)
class PositionScheme:
    """What maskpatch needs to know about how one base model numbers positions (plain data).

    ``takes_position_ids``: its forward names ``position_ids``. ``first``: the id of the first of
    ``M + N`` unpadded positions (0, or ``padding_idx + 1`` for fairseq-style embeddings).
    ``left_padding_limit``: why left padding changes the result whatever the position ids (None
    when it does not). ``sliding_window``: the attention window of its sliding-window layers, in
    positions (None without one); a key further back than that from a query is not attended, so
    pads between two tokens can push them out of each other's window. ``source`` says, in words,
    where ``first`` came from (for docs and ``maskpatch doctor``).
    """

    takes_position_ids: bool
    first: int = 0
    left_padding_limit: str | None = None
    sliding_window: int | None = None
    source: str = "counted from 0"


# (type of the model, id(config)) -> (config, scheme): the scheme follows from the class and the
# config. The entry holds the config, so its id is not reused while the entry lives; bounded.
_SCHEMES: dict[tuple[type, int], tuple[object, PositionScheme]] = {}
_MAX_SCHEMES = 256


def position_scheme(base: nn.Module) -> PositionScheme:
    """Return the :class:`PositionScheme` of ``base`` (a transformers model, or any module).

    Reads ``base.forward``'s signature, ``base.config`` and the first embeddings module that
    numbers ``inputs_embeds`` itself (transformers' ``create_position_ids_from_inputs_embeds``).
    Computed once per model class and config object (one walk over the modules), then cached;
    a module without a config is walked each time. Changes nothing.
    """
    config = getattr(base, "config", None)
    key = (type(base), id(config))
    cached = _SCHEMES.get(key) if config is not None else None
    if cached is not None and cached[0] is config:
        return cached[1]
    scheme = _scheme_of(base, config)
    if config is not None:
        if len(_SCHEMES) >= _MAX_SCHEMES:
            _SCHEMES.clear()
        _SCHEMES[key] = (config, scheme)
    return scheme


def _scheme_of(base: nn.Module, config: object) -> PositionScheme:
    model_type = str(getattr(config, "model_type", "") or "")
    first, source = _first_position(base)
    return PositionScheme(
        takes_position_ids=_names_position_ids(base),
        first=first,
        left_padding_limit=_INDEX_RELATIVE.get(model_type),
        sliding_window=_sliding_window(config),
        source=source,
    )


def _first_position(base: nn.Module) -> tuple[int, str]:
    for module in base.modules():
        make = getattr(module, "create_position_ids_from_inputs_embeds", None)
        padding_idx = getattr(module, "padding_idx", None)
        if callable(make) and isinstance(padding_idx, int):
            # The module's own function, asked for one position: what it gives an unpadded input.
            probe = torch.zeros(1, 1, 1)
            takes_padding = len(inspect.signature(make).parameters) > 1
            ids = make(probe, padding_idx) if takes_padding else make(probe)
            first = int(ids.reshape(-1)[0])
            return first, f"from {type(module).__name__}.padding_idx + 1 = {first}"
    return 0, "counted from 0"


def _names_position_ids(module: nn.Module) -> bool:
    try:
        return "position_ids" in inspect.signature(module.forward).parameters
    except (TypeError, ValueError):
        return False


def _sliding_window(config: object) -> int | None:
    window = getattr(config, "sliding_window", None)
    if not isinstance(window, int) or isinstance(window, bool) or window <= 0:
        return None
    layer_types = getattr(config, "layer_types", None)
    if layer_types and not any("sliding" in str(kind) for kind in layer_types):
        return None  # a window in the config that no layer uses (Qwen2 without use_sliding_window)
    return window
