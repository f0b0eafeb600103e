"""The adapter object of the PEFT family: what it matches, and the hooks its plan registers."""

from __future__ import annotations

from torch import nn

from ...compat.generation import generation_cache_name
from ...compat.versions import SUPPORTED
from ...errors import UnsupportedModelError
from ...handle import HookSpec
from ...hooks import InstallRecord, position_hook_for
from ...layout import is_peft_model
from ...limits import limit_hook_for
from ...positions import position_scheme
from ..peft_generation import generates_with_peft
from .hooks import PeftBaseHook, PeftCallHook, PeftOutputHook
from .mask import prompt_output_mask
from .multitask import TaskIdsHook, task_encoders
from .tasks import task_for

__all__ = ["PeftAdapter"]


class PeftAdapter:
    """Patches a ``peft.PeftModel`` that the user calls directly (see :mod:`maskpatch.adapters.peft`)."""

    name = "peft"
    requires = {dist: SUPPORTED[dist] for dist in ("peft", "transformers", "torch")}
    optional: dict[str, str] = {}

    def matches(self, model: object) -> bool:
        return is_peft_model(model)

    def plan(self, model: nn.Module, record: InstallRecord) -> list[HookSpec]:
        task_for(model)  # refuses a task class without a row in the task table, before anything is installed
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
        specs.extend(HookSpec(encoder, TaskIdsHook(record)) for encoder in task_encoders(model))
        if generates_with_peft(model):
            generation_cache_name()  # refuses, at apply, a transformers that names the cache neither way
        return specs  # the disable_adapter() wrapper goes in with PeftCallHook (attached), not here

    output_mask = staticmethod(prompt_output_mask)  # the mask capability (see maskpatch.registry.MaskAdapter)
