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

Under ``extend`` and ``ignore`` the outputs keep their ``N + M`` positions; :func:`maskpatch.output_mask`
returns the mask that lines up with them. The computation itself is the same under every policy
(PEFT's model attends the virtual tokens), so losses do not depend on the policy.

What each PEFT task class needs (its token-level fields, labels or answer spans to shift, 4-D
mask support) is one row of :mod:`~maskpatch.adapters.peft.tasks`; a task class without a row is
refused at ``apply``. The package is split by concern:

* :mod:`~maskpatch.adapters.peft.adapter`: :class:`PeftAdapter` (``matches``, ``plan``);
* :mod:`~maskpatch.adapters.peft.tasks`: the task table;
* :mod:`~maskpatch.adapters.peft.call`: rewriting one call (:class:`PeftCall`);
* :mod:`~maskpatch.adapters.peft.output`: checking and cutting the output, the span loss;
* :mod:`~maskpatch.adapters.peft.multitask`: routing multitask ``task_ids``;
* :mod:`~maskpatch.adapters.peft.mask`: the mask that lines up with the outputs (the adapter's ``output_mask``);
* :mod:`~maskpatch.adapters.peft.wrappers`: the class-level ``disable_adapter`` wrapper;
* :mod:`~maskpatch.adapters.peft.hooks`: the hooks on the PeftModel and its base model.
"""

from __future__ import annotations

from .adapter import PeftAdapter
from .call import CALL_KEY, PeftCall, as_kwargs, input_length
from .hooks import PeftBaseHook, PeftCallHook, PeftOutputHook
from .mask import prompt_output_mask
from .multitask import TaskIdsHook, drop_routes
from .output import repair_output, span_loss
from .tasks import ENCODER_FIELDS, TaskRow, find_task, supported_tasks, task_for
from .wrappers import (
    ensure_disable_adapter_wrapper,
    hold_disable_adapter_wrapper,
    release_unheld_wrappers,
    remove_disable_adapter_wrapper,
)

__all__ = [
    "CALL_KEY",
    "ENCODER_FIELDS",
    "PeftAdapter",
    "PeftBaseHook",
    "PeftCall",
    "PeftCallHook",
    "PeftOutputHook",
    "TaskIdsHook",
    "TaskRow",
    "as_kwargs",
    "drop_routes",
    "ensure_disable_adapter_wrapper",
    "find_task",
    "hold_disable_adapter_wrapper",
    "input_length",
    "prompt_output_mask",
    "release_unheld_wrappers",
    "remove_disable_adapter_wrapper",
    "repair_output",
    "span_loss",
    "supported_tasks",
    "task_for",
]
