"""The PEFT family: a ``PeftModel`` the user calls directly (``peft_model(**batch)``).

PEFT prompt tuning, P-tuning and multitask prompt tuning prepend ``M`` virtual tokens inside the
PeftModel's forward. Called directly, ``peft_model(...)`` goes through ``nn.Module.__call__``, so
forward hooks on the PeftModel fire. This adapter registers, on one PeftModel:

* :class:`PeftCallHook`, a pre-hook on the PeftModel: it reads the active adapter's layout, and
  rewrites the call into one PEFT handles: token-classification labels get ``M`` leading
  ``-100``, answer-span positions are taken out of PEFT's way (the span loss is computed over
  the real positions by :class:`PeftOutputHook`, :func:`span_loss`), a custom 4-D mask and the caller's
  ``position_ids`` (which PEFT rejects or drops) are taken out of PEFT's way, cached seq2seq
  ``encoder_outputs`` keep the mask that matches their length, and multitask ``task_ids`` are
  routed to the prompt encoder. What the base model must get back travels with the call, in one
  private keyword argument that PEFT passes through;
* :class:`PeftBaseHook`, a pre-hook on ``peft_model.base_model`` (the model PEFT calls): it puts
  the extended 4-D mask, the shifted position ids, ... back into the call;
* :class:`maskpatch.hooks.PositionIdsHook` on the base model: position ids that skip padding
  (virtual tokens ``0..M-1``, real tokens from ``M``), also in every ``generate`` step;
* :class:`PeftOutputHook`, a forward hook on the PeftModel: it measures the drift of every
  token-level output, raises :class:`~maskpatch.errors.DriftError` on an excess it cannot
  explain, and under ``strip`` cuts the ``M`` virtual positions (views);
* :class:`TaskIdsHook`, a pre-hook on each multitask prompt encoder.

Under ``extend`` and ``ignore`` the outputs keep their ``N + M`` positions; :func:`output_mask`
returns the mask that lines up with them. The computation itself is the same under every policy
(PEFT's model attends the virtual tokens), so losses do not depend on the policy.

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
import copy
import dataclasses
import inspect
import sys
import threading
import weakref
from collections.abc import Iterator, Mapping, MutableMapping
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, cast

import torch
import torch.nn.functional as F
import wrapt
from torch import Tensor, nn

from ..conventions import MaskConvention
from ..drift import Policy, check_excess, prefix_mask, strip_positions
from ..errors import PolicyError, UnsupportedModelError
from ..handle import HookSpec, find_record
from ..hooks import LOCK, InstallRecord, MaskpatchHook, accepts_position_ids, position_hook_for
from ..inputs import require_module, require_tensor
from ..layout import NO_LAYOUT, VirtualLayout, active_layout, is_peft_model
from ..limits import limit_hook_for
from ..masks4d import extend_4d_mask, prefix_labels, shift_position_ids
from ..positions import position_scheme
from .generic import installed_count, prepended_mask
from ..compat.generation import generation_cache_name
from .peft_generation import (
    carries_maskpatch_hooks,
    ensure_generation_wrapper,
    generates_with_peft,
    remove_generation_wrapper,
)

__all__ = [
    "CALL_KEY",
    "PeftAdapter",
    "PeftBaseHook",
    "PeftCall",
    "PeftCallHook",
    "PeftOutputHook",
    "TaskIdsHook",
    "drop_routes",
    "ensure_disable_adapter_wrapper",
    "hold_disable_adapter_wrapper",
    "output_mask",
    "remove_disable_adapter_wrapper",
    "span_loss",
]

#: The keyword argument that carries a :class:`PeftCall` from the PeftModel to its base model.
CALL_KEY = "maskpatch_peft_call"

# Token-level fields of a ModelOutput, and the axes that have one entry per input position.
_SEQ, _ATTN = (1,), (2, 3)
_ENCODER_FIELDS = (("last_hidden_state", _SEQ), ("hidden_states", _SEQ), ("attentions", _ATTN))
_FIELDS: dict[str, tuple[tuple[str, tuple[int, ...]], ...]] = {
    "PeftModelForFeatureExtraction": _ENCODER_FIELDS,
    "PeftModelForTokenClassification": (("logits", _SEQ), *_ENCODER_FIELDS[1:]),
    "PeftModelForQuestionAnswering": (("start_logits", _SEQ), ("end_logits", _SEQ), *_ENCODER_FIELDS[1:]),
    "PeftModelForSequenceClassification": _ENCODER_FIELDS[1:],
    "PeftModelForCausalLM": (("logits", _SEQ), *_ENCODER_FIELDS[1:]),
    "PeftModelForSeq2SeqLM": (
        ("encoder_last_hidden_state", _SEQ),
        ("encoder_hidden_states", _SEQ),
        ("encoder_attentions", _ATTN),
        ("cross_attentions", (3,)),  # decoder queries, encoder keys: only the keys carry virtual tokens
    ),
}


def _kind(peft_model: nn.Module) -> str:
    """Return the name of the PEFT task class of ``peft_model`` (``"PeftModel"`` for the plain one)."""
    return next((cls.__name__ for cls in type(peft_model).__mro__ if cls.__name__ in _FIELDS), "PeftModel")


class PeftAdapter:
    """Patches a ``peft.PeftModel`` that the user calls directly (see the module docstring)."""

    name = "peft"
    requires = {"peft": ">=0.21,<0.22", "transformers": ">=5,<6", "torch": ">=2.4"}
    optional: dict[str, str] = {}

    def matches(self, model: object) -> bool:
        return is_peft_model(model)

    def plan(self, model: nn.Module, record: InstallRecord) -> list[HookSpec]:
        base = model.base_model
        if not isinstance(base, nn.Module):
            raise UnsupportedModelError(f"expected the PeftModel's base_model to be a torch module, but got {base!r}")
        specs = [
            HookSpec(model, PeftCallHook(record)),
            HookSpec(model, PeftOutputHook(record)),
            HookSpec(base, PeftBaseHook(record, first=position_scheme(base).first)),  # before PositionIdsHook
        ]
        positions = position_hook_for(model, record)
        if positions is not None:
            specs.append(HookSpec(base, positions))
        limits = limit_hook_for(model, record)  # reports what no position ids can repair (left-padded T5, ...)
        if limits is not None:
            specs.append(HookSpec(base, limits))
        specs.extend(HookSpec(encoder, TaskIdsHook(record)) for encoder in _task_encoders(model))
        if generates_with_peft(model):
            generation_cache_name()  # refuses, at apply, a transformers that names the cache neither way
        return specs  # the disable_adapter() wrapper goes in with PeftCallHook (attached), not here


@dataclass(frozen=True)
class PeftCall:
    """What one call of a patched PeftModel needs downstream (built per call, never stored).

    ``m`` virtual tokens in front of an ``n``-long input. The tensors are the caller's, taken out
    of PEFT's way and put back for the base model by :class:`PeftBaseHook`.
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
    route: _Route | None = None
    start_positions: Tensor | None = None
    end_positions: Tensor | None = None


class PeftCallHook(MaskpatchHook):
    """Pre-hook on the PeftModel: rewrite the caller's call into one PEFT handles (module doc)."""

    pre = True

    def attached(self) -> None:
        hold_disable_adapter_wrapper(self.record)

    def __call__(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        layout = active_layout(module)
        if self.record.removed or not layout.adds_positions:
            return None  # removed while this forward was starting: act as the unpatched model
        kind = _kind(module)
        call, new = _prepare_call(module, kind, layout, _as_kwargs(module, args, kwargs))
        if call.routed:
            route = _Route(module, new.pop("task_ids"), self.record)
            _ensure_task_ids_hook(module, self.record)
            _push_route(route)
            with LOCK:
                if drop_routes not in self.record.releases:
                    self.record.releases.append(drop_routes)
            call = dataclasses.replace(call, route=route)
        new[CALL_KEY] = call
        return (), new


class PeftBaseHook(MaskpatchHook):
    """Pre-hook on ``peft_model.base_model``: give back what :class:`PeftCallHook` took out of PEFT's way.

    ``first`` is the base model's own first position (:mod:`maskpatch.positions`): the caller's
    position ids are in the model's numbering, and the virtual tokens take its first ``M``.
    """

    pre = True

    def __init__(self, record: InstallRecord, *, first: int = 0) -> None:
        super().__init__(record)
        self.first = first

    def __call__(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if CALL_KEY not in kwargs:
            return None
        call = kwargs[CALL_KEY]
        new = {key: value for key, value in kwargs.items() if key != CALL_KEY}
        if call.mask4d is not None:
            new["attention_mask"] = extend_4d_mask(call.mask4d, call.m)
        if call.position_ids is not None and accepts_position_ids(module):  # T5 takes none; PEFT dropped them too
            new["position_ids"] = shift_position_ids(call.position_ids, call.m, first=self.first)
        if call.token_type_ids is not None:
            new["token_type_ids"] = prefix_labels(call.token_type_ids, call.m, ignore_index=0)
        if call.cached_encoder:
            new.pop("inputs_embeds", None)  # the encoder does not run: only its cached states are used
        if call.restore_mask:
            new["attention_mask"] = call.encoder_mask
        return args, new


class PeftOutputHook(MaskpatchHook):
    """Forward hook on the PeftModel (always called): check every token-level output, cut it under ``strip``."""

    always_call = True

    def __call__(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> Any:
        call = kwargs.get(CALL_KEY)
        if not isinstance(call, PeftCall):
            return None
        if call.route is not None:
            _pop_route(call.route)
        if output is None:  # the forward raised; torch runs this hook on the way out
            return None
        repaired = repair_output(output, call, self.record.policy, kind=_kind(module), where=type(module).__name__)
        if call.start_positions is not None and call.end_positions is not None:
            repaired = _with_span_loss(repaired, output, call)
        return repaired.to_tuple() if call.as_tuple else repaired


class TaskIdsHook(MaskpatchHook):
    """Pre-hook on a multitask prompt encoder: the caller's ``task_ids`` where PEFT passes none.

    ``PeftModelForFeatureExtraction`` and ``...ForQuestionAnswering`` call ``get_prompt`` without
    ``task_ids``, which a multitask prompt encoder refuses. :class:`PeftCallHook` routes the
    caller's ``task_ids`` here through a context variable (per thread and task, never on a module).
    """

    pre = True

    def __call__(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        route = _current_route()
        if route is None or not any(module is enc for enc in _task_encoders(route.owner)):
            return None
        bound = dict(zip(("indices", "task_ids"), args, strict=False)) | kwargs
        if bound.get("task_ids") is not None:
            return None
        return (), {**bound, "task_ids": route.task_ids}


@dataclass(frozen=True, eq=False)
class _Route:
    owner: nn.Module
    task_ids: Tensor
    record: InstallRecord


# The task ids of the PeftModel calls in progress on this thread or task, innermost last. The
# context variable holds weak references only: a route lives as long as the call's PeftCall (in
# the call's keyword arguments), so a call whose output hook never ran (its install was removed
# during the forward, on another thread) leaves nothing alive behind, and the dead entry is
# dropped by the next push or pop.
_ROUTES: ContextVar[tuple[weakref.ref[_Route], ...]] = ContextVar("maskpatch_peft_task_ids", default=())


def _live_routes() -> tuple[weakref.ref[_Route], ...]:
    return tuple(ref for ref in _ROUTES.get() if (route := ref()) is not None and not route.record.removed)


def _push_route(route: _Route) -> None:
    _ROUTES.set((*_live_routes(), weakref.ref(route)))


def _pop_route(route: _Route) -> None:
    _ROUTES.set(tuple(ref for ref in _live_routes() if ref() is not route))


def _current_route() -> _Route | None:
    routes = _ROUTES.get()
    return routes[-1]() if routes else None


def drop_routes(record: InstallRecord) -> None:
    """Drop this context's routes of ``record``'s install (its removal, on the thread that removes it)."""
    if _ROUTES.get():
        _ROUTES.set(tuple(ref for ref in _live_routes() if ref().record is not record))  # type: ignore[union-attr]


def _task_encoders(peft_model: nn.Module) -> list[nn.Module]:
    """Return the multitask prompt encoders of ``peft_model`` (those that need ``task_ids``)."""
    encoders = getattr(peft_model, "prompt_encoder", None)
    if not isinstance(encoders, nn.ModuleDict):
        return []
    return [enc for enc in encoders.values() if type(enc).__name__ == "MultitaskPromptEmbedding"]


def _ensure_task_ids_hook(peft_model: nn.Module, record: InstallRecord) -> None:
    """Register a :class:`TaskIdsHook` on a multitask encoder added after ``apply`` (add_adapter)."""
    for encoder in _task_encoders(peft_model):
        if not any(isinstance(h, TaskIdsHook) for h in encoder._forward_pre_hooks.values()):
            record.register(encoder, TaskIdsHook(record))  # never after the install was removed


# --- rewriting one call ---------------------------------------------------------------------------


def _as_kwargs(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    """Return the call's arguments as one new keyword dict (positional ones bound by name)."""
    if not args:
        return dict(kwargs)
    signature = inspect.signature(module.forward)
    flat: dict[str, Any] = {}
    for name, value in signature.bind_partial(*args, **kwargs).arguments.items():
        if signature.parameters[name].kind is inspect.Parameter.VAR_KEYWORD:
            flat.update(value)
        else:
            flat[name] = value
    return flat


def _prepare_call(
    module: nn.Module, kind: str, layout: VirtualLayout, kwargs: dict[str, Any]
) -> tuple[PeftCall, dict[str, Any]]:
    """Return the :class:`PeftCall` for one call and the keyword arguments PEFT gets instead (a new dict)."""
    m, new = layout.num_virtual_tokens, dict(kwargs)
    fields: dict[str, Any] = {"m": m, "n": _input_length(new), "adapter": layout.adapter}
    if new.get("return_dict") is False:
        new["return_dict"], fields["as_tuple"] = True, True
    fields["position_ids"] = _position_ids(module, new.pop("position_ids", None), new)
    mask = new.get("attention_mask")
    if isinstance(mask, Tensor) and mask.dim() == 4:
        fields["mask4d"], new["attention_mask"] = _check_4d_call(module, kind, mask, fields["n"]), None
    labels = new.get("labels")
    if kind == "PeftModelForTokenClassification" and labels is not None:
        labels = require_tensor(labels, name="labels", where=type(module).__name__)
    if kind == "PeftModelForTokenClassification" and labels is not None and labels.shape[1] != fields["n"] + m:
        new["labels"] = prefix_labels(labels, m)  # labels already M + N long were aligned by the caller
    if kind == "PeftModelForQuestionAnswering":
        fields.update(_take_spans(module, new))
        types = new.pop("token_type_ids", None)  # PEFT drops them silently here
        fields["token_type_ids"] = None if types is None else require_tensor(types, name="token_type_ids", where=kind)
    if layout.peft_type == "MULTITASK_PROMPT_TUNING":
        fields["routed"] = _require_task_ids(module, new)
    if new.get("encoder_outputs") is not None:
        fields.update(_cached_encoder(module, layout, new))
    return PeftCall(**fields), new


def _input_length(kwargs: Mapping[str, Any]) -> int:
    for key in ("input_ids", "inputs_embeds", "attention_mask"):
        value = kwargs.get(key)
        if isinstance(value, Tensor) and value.dim() >= 2:
            return int(value.shape[-1] if key == "attention_mask" else value.shape[1])
    encoder = kwargs.get("encoder_outputs")
    return int(encoder[0].shape[1]) if encoder is not None else 0


def _check_4d_call(module: nn.Module, kind: str, mask: Tensor, n: int) -> Tensor:
    if kind != "PeftModelForCausalLM":
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
    """Take the answer-span positions out of PEFT's way: :class:`PeftOutputHook` computes the span loss.

    PEFT would hand them to the base model unshifted, and the base model's loss would put the
    virtual tokens in the span softmax (see :func:`span_loss`).
    """
    spans = {key: kwargs.pop(key, None) for key in ("start_positions", "end_positions")}
    return {
        key: None if value is None else require_tensor(value, name=key, where=type(module).__name__)
        for key, value in spans.items()
    }


def span_loss(start_logits: Tensor, end_logits: Tensor, start_positions: Tensor, end_positions: Tensor) -> Tensor:
    """transformers' question-answering loss over the caller's ``N`` real positions.

    ``start_logits`` / ``end_logits`` are ``(B, N)``: the virtual positions already cut, so an
    answer can never land on a virtual token. The rule is transformers' own, in the caller's
    frame: positions are clamped to ``[0, N]`` (a negative one means the first real token) and
    ``N`` is the ignored index (so ``N`` or more is left out of the loss); the loss is the mean of
    the start and end cross-entropies.
    """
    if start_positions.dim() > 1:
        start_positions = start_positions.squeeze(-1)
    if end_positions.dim() > 1:
        end_positions = end_positions.squeeze(-1)
    ignored = start_logits.shape[1]
    start_positions = start_positions.to(start_logits.device).clamp(0, ignored)
    end_positions = end_positions.to(end_logits.device).clamp(0, ignored)
    start = F.cross_entropy(start_logits, start_positions, ignore_index=ignored)
    end = F.cross_entropy(end_logits, end_positions, ignore_index=ignored)
    return (start + end) / 2


def _with_span_loss(repaired: Any, output: Any, call: PeftCall) -> Any:
    """Return ``repaired`` with ``loss`` computed by :func:`span_loss` from the real positions of ``output``."""
    if not isinstance(output, Mapping) or output.get("start_logits") is None or output.get("end_logits") is None:
        return repaired
    real = [_real_positions(output[key], call.n) for key in ("start_logits", "end_logits")]
    loss = span_loss(*real, call.start_positions, call.end_positions)  # type: ignore[arg-type]
    return type(repaired)(**{**dict(repaired.items()), "loss": loss})


def _real_positions(logits: Tensor, n: int) -> Tensor:
    return logits.narrow(1, logits.shape[1] - n, n)


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


# --- repairing the output -------------------------------------------------------------------------


def repair_output(output: Any, call: PeftCall, policy: Policy, *, kind: str, where: str) -> Any:
    """Check every token-level field of ``output``; under ``strip`` return a copy without the virtual positions.

    A field longer than ``call.n`` by exactly ``call.m`` is drift to repair; shorter fields
    (``logits_to_keep``) and equal ones (cached prompt-less encoder states) are left alone; any
    other excess raises :class:`~maskpatch.errors.DriftError`.
    """
    if not isinstance(output, Mapping):
        if policy == "strip":
            raise UnsupportedModelError(
                f"{where}: expected a ModelOutput to cut, but the model returned {type(output).__qualname__}"
            )
        return output
    # The same type: a dict or a ModelOutput.
    repaired: MutableMapping[str, Any] | None = copy.copy(output) if policy == "strip" else None  # type: ignore[assignment]
    for name, dims in _FIELDS.get(kind, _ENCODER_FIELDS):
        value = output.get(name)
        if value is None:
            continue
        label = f"{where} output {name!r}"
        if isinstance(value, Tensor):
            new = _repair_tensor(value, dims, call, policy, label)
        else:
            new = type(value)(_repair_tensor(v, dims, call, policy, f"{label}[{i}]") for i, v in enumerate(value))
        if repaired is not None:
            repaired[name] = new
    return output if repaired is None else repaired


def _repair_tensor(value: Tensor, dims: tuple[int, ...], call: PeftCall, policy: Policy, where: str) -> Tensor:
    for dim in dims:
        size = value.shape[dim]
        if size <= call.n:
            continue
        text = f"{where} has {size} positions on axis {dim} but the input has {call.n}"
        excess = check_excess(size - call.n, call.m, where=text, adapter=call.adapter)
        if policy == "strip":
            value = strip_positions(value, excess, dim=dim)
    return value


# --- the mask for extend / ignore ----------------------------------------------------------------


def output_mask(
    model: nn.Module, attention_mask: Tensor, *, convention: MaskConvention = MaskConvention.ONES
) -> Tensor:
    """Return the mask (in ``convention``, ``ONES`` by default: 1 attends) that lines up with ``model``'s outputs now.

    ``model`` is a model patched by :func:`maskpatch.apply`: a PeftModel, a model holding one (a
    SentenceTransformer), or a module patched with ``prepended_tokens=M``; and
    ``attention_mask`` the caller's ``(B, N)`` mask. While the active adapter prepends ``M``
    virtual tokens, under ``extend`` the result has ``M`` leading attending entries and under
    ``ignore`` ``M`` non-attending ones (``(B, M + N)``, like the outputs); under ``strip``, and
    when nothing is prepended (prefix tuning, LoRA, a disabled adapter), it is ``attention_mask``
    itself. Dtype and device are ``attention_mask``'s; it is not modified::

        mask  1 1 0     extend, M=2: 1 1 | 1 1 0     ignore: 0 0 | 1 1 0     strip: 1 1 0

    Raises :class:`UnsupportedModelError` when ``model`` is not patched.
    """
    require_module(model, where="output_mask")
    if installed_count(model) is not None:
        return prepended_mask(model, attention_mask, convention=convention)  # a prepended_tokens install
    record = find_record(model) if isinstance(model, nn.Module) else None
    if record is None:
        raise UnsupportedModelError(
            f"expected a model patched with maskpatch.apply(...), but {type(model).__name__} is not patched"
        )
    if record.adapter == "x-transformers":  # the prepended count is per call there
        raise PolicyError(
            "an x-transformers install prepends prepend_embeds per call: use "
            "maskpatch.adapters.x_transformers.output_mask(model, mask, prepend=prepend_embeds)"
        )
    require_tensor(attention_mask, name="attention_mask", where="output_mask", dims=(2,))
    layout = _peft_layout(model)
    if record.policy == "strip" or not layout.adds_positions:
        return attention_mask
    attend = record.policy == "extend"
    return prefix_mask(attention_mask, layout.num_virtual_tokens, attend=attend, convention=convention)


def _peft_layout(model: nn.Module) -> VirtualLayout:
    return next((active_layout(module) for module in model.modules() if is_peft_model(module)), NO_LAYOUT)


# --- disable_adapter() on models that cannot generate -------------------------------------------

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
        if not _WRAPPER_HOLDERS:
            remove_disable_adapter_wrapper()
            remove_generation_wrapper()


def ensure_disable_adapter_wrapper() -> None:
    """Wrap ``peft.PeftModel.disable_adapter`` with :func:`_disable_adapter_wrapper` unless it is wrapped (idempotent).

    The wrapper sits on the class, never on an instance (instance-level wrapt proxies break
    ``pickle`` and ``copy.deepcopy``), and calls PEFT's method unchanged for every model that
    maskpatch has not patched. :func:`remove_disable_adapter_wrapper` takes it off again.
    """
    peft_model = sys.modules.get("peft.peft_model")
    if peft_model is None:
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
        current = peft_model.PeftModel.__dict__["disable_adapter"]
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
