"""The PEFT task table: one row per PEFT task class, keyed by the class itself.

A row says what maskpatch does for a ``PeftModelFor...`` class: which token-level output fields
carry the ``M`` virtual positions (and on which axes), which of them a host (a pipeline, a
Trainer) lines up, whether token-classification labels get ``M`` leading ``-100``, whether
answer-span positions are taken out of PEFT's way, and whether a custom 4-D attention mask is
extended. A new PEFT task type is one new row in :func:`_build_table`.

A PeftModel of a class with a forward of its own that has no row is refused at ``apply``
(:class:`~maskpatch.errors.UnsupportedModelError` naming the class and the supported ones):
guessing its fields would risk silent wrong results. The table is built the first time it is
needed (a PeftModel exists then, so ``peft`` is imported); importing this module imports no peft.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from torch import nn

from ...errors import UnsupportedModelError
from ...layout import is_peft_model

__all__ = ["ENCODER_FIELDS", "Fields", "TaskRow", "find_task", "supported_tasks", "task_for", "task_named"]

#: Token-level output fields: ``(name, axes with one entry per input position)``.
Fields = tuple[tuple[str, tuple[int, ...]], ...]

_SEQ, _ATTN = (1,), (2, 3)
_COMMON: Fields = (("hidden_states", _SEQ), ("attentions", _ATTN))
#: The fields of an encoder's output (``PeftModelForFeatureExtraction``, the plain ``PeftModel``).
ENCODER_FIELDS: Fields = (("last_hidden_state", _SEQ), *_COMMON)


@dataclass(frozen=True)
class TaskRow:
    """What maskpatch does for one PEFT task class (plain data).

    ``fields``: the token-level output fields the install's policy applies to (checked for drift;
    cut under ``strip``). ``host_fields``: the fields a host's call lines up (None: hosts are not
    supported for this class). ``shift_labels``: ``labels`` get ``M`` leading ``-100``.
    ``spans``: ``start_positions``/``end_positions`` (and ``token_type_ids``, which PEFT drops) are
    taken out of PEFT's way. ``mask4d``: a custom 4-D attention mask is extended by ``M``.
    """

    fields: Fields
    host_fields: Fields | None = None
    shift_labels: bool = False
    spans: bool = False
    mask4d: bool = False
    passthrough: bool = False


def _build_table() -> dict[type, TaskRow]:
    """Return the task table. Called once, when a PeftModel exists (so peft is imported)."""
    from peft import peft_model as pm

    return {
        # ``logits`` for hosts: a masked-LM base model under FEATURE_EXTRACTION (the fill-mask pipeline).
        pm.PeftModelForFeatureExtraction: TaskRow(
            ENCODER_FIELDS, host_fields=(("last_hidden_state", _SEQ), ("logits", _SEQ), *_COMMON)
        ),
        pm.PeftModelForTokenClassification: TaskRow(
            (("logits", _SEQ), *_COMMON), host_fields=(("logits", _SEQ), *_COMMON), shift_labels=True
        ),
        pm.PeftModelForQuestionAnswering: TaskRow(
            (("start_logits", _SEQ), ("end_logits", _SEQ), *_COMMON),
            host_fields=(("start_logits", _SEQ), ("end_logits", _SEQ), *_COMMON),
            spans=True,
        ),
        pm.PeftModelForSequenceClassification: TaskRow(_COMMON, host_fields=_COMMON),
        pm.PeftModelForCausalLM: TaskRow(
            (("logits", _SEQ), *_COMMON), host_fields=(("logits", _SEQ), *_COMMON), mask4d=True
        ),
        pm.PeftModelForSeq2SeqLM: TaskRow(
            (
                ("encoder_last_hidden_state", _SEQ),
                ("encoder_hidden_states", _SEQ),
                ("encoder_attentions", _ATTN),
                ("cross_attentions", (3,)),  # decoder queries, encoder keys: only the keys carry virtual tokens
            )
        ),
        # The plain PeftModel passes the call to its base model as it is: nothing is prepended there.
        pm.PeftModel: TaskRow(ENCODER_FIELDS, passthrough=True),
    }


@functools.cache
def _table() -> dict[type, TaskRow]:
    return _build_table()


def find_task(model: object) -> tuple[type, TaskRow] | None:
    """Return ``(task class, row)`` for a PeftModel ``model``, or None (not a PeftModel, or a class without a row).

    The nearest class of ``model``'s MRO with a row decides; a subclass of the plain ``PeftModel``
    with a forward of its own (an unknown task class) has none.
    """
    if not is_peft_model(model):
        return None
    model_type: type = type(model)
    if model_type not in _BY_TYPE:
        _BY_TYPE[model_type] = _task_of_type(model_type)
    return _BY_TYPE[model_type]


# The row found for each PeftModel type (a class's MRO does not change): one dict lookup per call.
_BY_TYPE: dict[type, tuple[type, TaskRow] | None] = {}


def _task_of_type(model_type: type) -> tuple[type, TaskRow] | None:
    table = _table()
    for cls in model_type.__mro__:
        row = table.get(cls)
        if row is None:
            continue
        if row.passthrough and _own_forward(model_type, cls):
            return None  # a task class of its own that the table does not know
        return cls, row
    return None


def _own_forward(model_type: type, plain: type) -> bool:
    return getattr(model_type, "forward", None) is not getattr(plain, "forward", None)


def task_for(model: nn.Module) -> TaskRow:
    """Return the row of ``model``'s PEFT task class; raise :class:`UnsupportedModelError` if it has none."""
    found = find_task(model)
    if found is None:
        raise UnsupportedModelError(
            f"expected a PeftModel of a task class maskpatch supports ({', '.join(supported_tasks())}), but got "
            f"{type(model).__module__}.{type(model).__qualname__}; a new PEFT task type needs a row in "
            "maskpatch.adapters.peft.tasks"
        )
    return found[1]


def supported_tasks(*, hosts: bool = False) -> tuple[str, ...]:
    """Return the names of the PEFT classes with a row (sorted); with ``hosts``, those hosts are supported with."""
    return tuple(sorted(cls.__name__ for cls, row in _table().items() if not hosts or row.host_fields is not None))


@functools.cache
def task_named(name: str) -> TaskRow | None:
    """Return the row of the PEFT class called ``name`` (for reports that carry a class name), or None."""
    return next((row for cls, row in _table().items() if cls.__name__ == name), None)
