"""The hooks on a patched PeftModel and its base model (see :mod:`maskpatch.adapters.peft`)."""

from __future__ import annotations

import dataclasses
from typing import Any

from torch import nn

from ...hooks import LOCK, ForwardHook, ForwardPreHook, InstallRecord, accepts_position_ids
from ...layout import active_layout
from ...masks4d import extend_4d_mask, prefix_labels, shift_position_ids
from .call import CALL_KEY, PeftCall, as_kwargs, prepare_call
from .multitask import Route, drop_routes, ensure_task_ids_hook, pop_route, push_route
from .output import repair_output, with_span_loss
from .tasks import task_for
from .wrappers import hold_disable_adapter_wrapper

__all__ = ["PeftBaseHook", "PeftCallHook", "PeftOutputHook"]


class PeftCallHook(ForwardPreHook):
    """Pre-hook on the PeftModel: rewrite the caller's call into one PEFT handles (:mod:`.call`)."""

    def attached(self) -> None:
        hold_disable_adapter_wrapper(self.record)

    def __call__(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        layout = active_layout(module)
        if self.record.removed or not layout.adds_positions:
            return None  # removed while this forward was starting: act as the unpatched model
        call, new = prepare_call(module, task_for(module), layout, as_kwargs(module, args, kwargs))
        if call.routed:
            route = Route(module, new.pop("task_ids"), self.record)
            ensure_task_ids_hook(module, self.record)
            push_route(route)
            with LOCK:
                if drop_routes not in self.record.releases:
                    self.record.releases.append(drop_routes)
            call = dataclasses.replace(call, route=route)
        new[CALL_KEY] = call
        return (), new


class PeftBaseHook(ForwardPreHook):
    """Pre-hook on ``peft_model.base_model``: give back what :class:`PeftCallHook` took out of PEFT's way.

    ``first`` is the base model's own first position (:mod:`maskpatch.positions`): the caller's
    position ids are in the model's numbering, and the virtual tokens take its first ``M``.
    """

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


class PeftOutputHook(ForwardHook):
    """Forward hook on the PeftModel (always called): check every token-level output, cut it under ``strip``."""

    always_call = True

    def __call__(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> Any:
        call = kwargs.get(CALL_KEY)
        if not isinstance(call, PeftCall):
            return None
        if call.route is not None:
            pop_route(call.route)
        if output is None:  # the forward raised; torch runs this hook on the way out
            return None
        fields = task_for(module).fields
        repaired = repair_output(output, call, self.record.policy, fields=fields, where=type(module).__name__)
        if call.start_positions is not None and call.end_positions is not None:
            repaired = with_span_loss(repaired, output, call)
        return repaired.to_tuple() if call.as_tuple else repaired
