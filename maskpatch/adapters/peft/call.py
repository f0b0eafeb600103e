"""Rewriting one call of a patched PeftModel into one PEFT handles.

:func:`prepare_call` returns the :class:`PeftCall` that travels with the call (in the keyword
argument :data:`CALL_KEY`, which PEFT passes through to its base model) and the keyword arguments
PEFT gets instead: what PEFT would drop or mishandle (a custom 4-D mask, the caller's
``position_ids``, answer spans, cached encoder states) is taken out of its way here and given
back to the base model by :class:`~maskpatch.adapters.peft.hooks.PeftBaseHook`. What a task class
needs is read from its row (:mod:`maskpatch.adapters.peft.tasks`).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import Tensor, nn

from ...drift import check_excess
from ...errors import PolicyError
from ...inputs import require_tensor
from ...layout import VirtualLayout
from ...masks4d import prefix_labels
from .tasks import TaskRow

if TYPE_CHECKING:
    from .multitask import Route

__all__ = ["CALL_KEY", "PeftCall", "as_kwargs", "input_length", "prepare_call"]

#: The keyword argument that carries a :class:`PeftCall` from the PeftModel to its base model.
CALL_KEY = "maskpatch_peft_call"


@dataclass(frozen=True)
class PeftCall:
    """What one call of a patched PeftModel needs downstream (built per call, never stored).

    ``m`` virtual tokens in front of an ``n``-long input. The tensors are the caller's, taken out
    of PEFT's way and put back for the base model by :class:`~maskpatch.adapters.peft.hooks.PeftBaseHook`.
    """

    m: int
    n: int
    adapter: str
    position_ids: Tensor | None = None
    mask4d: Tensor | None = None
    token_type_ids: Tensor | None = None
    cached_encoder: bool = False
    restore_mask: bool = False
    encoder_mask: Tensor | None = None
    as_tuple: bool = False
    routed: bool = False
    route: Route | None = None
    start_positions: Tensor | None = None
    end_positions: Tensor | None = None


def as_kwargs(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    """Return the call's arguments as one new keyword dict (positional ones bound by name).

    The forward's parameter names are read once per function (:func:`_positional_names`), never
    per call; a forward taking ``*args`` is bound by :mod:`inspect` as before.
    """
    if not args:
        return dict(kwargs)
    forward = module.forward
    func = getattr(forward, "__func__", None)
    if func is not None and getattr(forward, "__self__", None) is module:
        names = _positional_names(func)
        names = None if names is None else names[1:]  # without self
    else:  # a forward set on the instance: read it now
        names = _positional_names.__wrapped__(forward)
    if names is None or len(args) > len(names):
        return _bind(forward, args, kwargs)
    flat = dict(zip(names, args, strict=False))
    for name in kwargs:
        if name in flat:
            raise TypeError(f"{type(module).__name__}.forward() got multiple values for argument {name!r}")
    flat.update(kwargs)
    return flat


@functools.lru_cache(maxsize=128)
def _positional_names(func: Callable[..., Any]) -> tuple[str, ...] | None:
    """Return the names of ``func``'s positional parameters in order; None when it takes ``*args``."""
    parameters = inspect.signature(func).parameters.values()
    if any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in parameters):
        return None
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return tuple(p.name for p in parameters if p.kind in positional)


def _bind(forward: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    """Bind the call with :mod:`inspect` (a forward taking ``*args``, or too many positional arguments)."""
    signature = inspect.signature(forward)
    flat: dict[str, Any] = {}
    for name, value in signature.bind_partial(*args, **kwargs).arguments.items():
        if signature.parameters[name].kind is inspect.Parameter.VAR_KEYWORD:
            flat.update(value)
        else:
            flat[name] = value
    return flat


def prepare_call(
    module: nn.Module, task: TaskRow, layout: VirtualLayout, kwargs: dict[str, Any]
) -> tuple[PeftCall, dict[str, Any]]:
    """Return the :class:`PeftCall` for one call and the keyword arguments PEFT gets instead (a new dict)."""
    m, new = layout.num_virtual_tokens, dict(kwargs)
    fields: dict[str, Any] = {"m": m, "n": input_length(new), "adapter": layout.adapter}
    if new.get("return_dict") is False:
        new["return_dict"], fields["as_tuple"] = True, True
    fields["position_ids"] = _position_ids(module, new.pop("position_ids", None), new)
    mask = new.get("attention_mask")
    if isinstance(mask, Tensor) and mask.dim() == 4:
        fields["mask4d"], new["attention_mask"] = _check_4d_call(module, task, mask, fields["n"]), None
    labels = new.get("labels")
    if task.shift_labels and labels is not None:
        labels = require_tensor(labels, name="labels", where=type(module).__name__)
        if labels.shape[1] != fields["n"] + m:
            new["labels"] = prefix_labels(labels, m)  # labels already M + N long were aligned by the caller
    if task.spans:
        fields.update(_take_spans(module, new))
        types = new.pop("token_type_ids", None)  # PEFT drops them silently here
        where = type(module).__name__
        fields["token_type_ids"] = None if types is None else require_tensor(types, name="token_type_ids", where=where)
    if layout.peft_type == "MULTITASK_PROMPT_TUNING":
        fields["routed"] = _require_task_ids(module, new)
    if new.get("encoder_outputs") is not None:
        fields.update(_cached_encoder(module, layout, new))
    return PeftCall(**fields), new


def input_length(kwargs: Mapping[str, Any]) -> int:
    """Return the caller's input length ``N`` (0 when the call names none)."""
    for key in ("input_ids", "inputs_embeds", "attention_mask"):
        value = kwargs.get(key)
        if isinstance(value, Tensor) and value.dim() >= 2:
            return int(value.shape[-1] if key == "attention_mask" else value.shape[1])
    encoder = kwargs.get("encoder_outputs")
    return int(encoder[0].shape[1]) if encoder is not None else 0


def _check_4d_call(module: nn.Module, task: TaskRow, mask: Tensor, n: int) -> Tensor:
    if not task.mask4d:
        raise PolicyError(
            f"{type(module).__name__}: maskpatch extends 4-D attention masks for causal language models "
            f"(PeftModelForCausalLM) only, but got a {tuple(mask.shape)} mask"
        )
    if mask.shape[-1] != n or mask.shape[-2] != n:
        raise PolicyError(
            f"{type(module).__name__}: expected a 4-D attention mask of shape (batch, heads, {n}, {n}) for "
            f"{n} input tokens, but got {tuple(mask.shape)}"
        )
    return mask


def _position_ids(module: nn.Module, value: object, kwargs: Mapping[str, Any]) -> Tensor | None:
    """The caller's ``position_ids`` as a tensor: a list or array (which PEFT accepts, and drops) too."""
    if value is None or isinstance(value, Tensor):
        return value
    like = next((v for k in ("input_ids", "inputs_embeds") if isinstance(v := kwargs.get(k), Tensor)), None)
    try:
        return torch.as_tensor(value, dtype=torch.long, device=None if like is None else like.device)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise PolicyError(
            f"{type(module).__name__}: expected position_ids to be a tensor, or a list or array of ints, but got "
            f"{type(value).__qualname__} ({exc})"
        ) from exc


def _take_spans(module: nn.Module, kwargs: dict[str, Any]) -> dict[str, Any]:
    """Take the answer-span positions out of PEFT's way: :class:`~maskpatch.adapters.peft.hooks.PeftOutputHook`
    computes the span loss.

    PEFT would hand them to the base model unshifted, and the base model's loss would put the
    virtual tokens in the span softmax (see :func:`~maskpatch.adapters.peft.output.span_loss`).
    """
    spans = {key: kwargs.pop(key, None) for key in ("start_positions", "end_positions")}
    return {
        key: None if value is None else require_tensor(value, name=key, where=type(module).__name__)
        for key, value in spans.items()
    }


def _require_task_ids(module: nn.Module, kwargs: Mapping[str, Any]) -> bool:
    if kwargs.get("task_ids") is None:
        raise PolicyError(
            f"{type(module).__name__}: the active adapter {module.active_adapter!r} is a multitask prompt tuning "
            "adapter, which needs task_ids; pass task_ids=... (one task index per row) to the call"
        )
    return True


def _cached_encoder(module: nn.Module, layout: VirtualLayout, kwargs: dict[str, Any]) -> dict[str, Any]:
    """Prepare a seq2seq call with precomputed ``encoder_outputs`` of ``N`` or ``N + M`` positions.

    ``N + M`` states (computed with the prompt) go with PEFT's extended mask; ``N`` states
    (computed without it, e.g. by ``peft_model.get_encoder()``) keep the caller's own mask.
    """
    states = kwargs["encoder_outputs"][0]
    mask = kwargs.get("attention_mask")
    if kwargs.get("input_ids") is None and kwargs.get("inputs_embeds") is None:
        weight = cast(nn.Embedding, module.word_embeddings).weight  # PEFT needs a batch size; the encoder will not run
        kwargs["inputs_embeds"] = weight.new_zeros(states.shape[0], 0, weight.shape[1])
    fields: dict[str, Any] = {"cached_encoder": True}
    if isinstance(mask, Tensor):
        where = (
            f"{type(module).__name__} encoder_outputs have {states.shape[1]} positions but attention_mask has "
            f"{mask.shape[1]}"
        )
        excess = check_excess(
            states.shape[1] - mask.shape[1], layout.num_virtual_tokens, where=where, adapter=layout.adapter
        )
        if excess == 0:
            kwargs["attention_mask"] = None
            fields.update(restore_mask=True, encoder_mask=mask)
        fields["n"] = int(mask.shape[1])
    return fields
