"""Checking and cutting a patched PeftModel's output, and the answer-span loss over real positions."""

from __future__ import annotations

import copy
from collections.abc import Mapping, MutableMapping
from typing import Any

import torch.nn.functional as F
from torch import Tensor

from ...drift import Policy, check_excess, strip_positions
from ...errors import UnsupportedModelError
from .call import PeftCall
from .tasks import Fields

__all__ = ["repair_output", "span_loss", "with_span_loss"]


def repair_output(output: Any, call: PeftCall, policy: Policy, *, fields: Fields, where: str) -> Any:
    """Check every token-level field of ``output``; under ``strip`` return a copy without the virtual positions.

    A field longer than ``call.n`` by exactly ``call.m`` is drift to repair; shorter fields
    (``logits_to_keep``) and equal ones (cached prompt-less encoder states) are left alone; any
    other excess raises :class:`~maskpatch.errors.DriftError`. ``fields`` are the task row's
    (:attr:`~maskpatch.adapters.peft.tasks.TaskRow.fields`).
    """
    if not isinstance(output, Mapping):
        if policy == "strip":
            raise UnsupportedModelError(
                f"{where}: expected a ModelOutput to cut, but the model returned {type(output).__qualname__}"
            )
        return output
    # The same type: a dict or a ModelOutput.
    repaired: MutableMapping[str, Any] | None = copy.copy(output) if policy == "strip" else None  # type: ignore[assignment]
    for name, dims in fields:
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


def with_span_loss(repaired: Any, output: Any, call: PeftCall) -> Any:
    """Return ``repaired`` with ``loss`` computed by :func:`span_loss` from the real positions of ``output``."""
    if not isinstance(output, Mapping) or output.get("start_logits") is None or output.get("end_logits") is None:
        return repaired
    if call.start_positions is None or call.end_positions is None:
        return repaired
    start, end = (_real_positions(output[key], call.n) for key in ("start_logits", "end_logits"))
    loss = span_loss(start, end, call.start_positions, call.end_positions)
    return type(repaired)(**{**dict(repaired.items()), "loss": loss})


def _real_positions(logits: Tensor, n: int) -> Tensor:
    return logits.narrow(1, logits.shape[1] - n, n)
