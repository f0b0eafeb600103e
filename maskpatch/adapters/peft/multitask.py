"""Multitask prompt tuning: the caller's ``task_ids`` routed to the prompt encoders PEFT calls without them.

``PeftModelForFeatureExtraction`` and ``...ForQuestionAnswering`` call ``get_prompt`` without
``task_ids``, which a multitask prompt encoder refuses. :class:`~maskpatch.adapters.peft.hooks.PeftCallHook`
pushes a :class:`Route` (the call's ``task_ids``) on a context variable (per thread and task,
never on a module) and :class:`TaskIdsHook`, a pre-hook on each multitask encoder, hands them in.
"""

from __future__ import annotations

import weakref
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from ...hooks import ForwardPreHook, InstallRecord

__all__ = [
    "Route",
    "TaskIdsHook",
    "current_route",
    "drop_routes",
    "ensure_task_ids_hook",
    "pop_route",
    "push_route",
    "task_encoders",
]


class TaskIdsHook(ForwardPreHook):
    """Pre-hook on a multitask prompt encoder: the caller's ``task_ids`` where PEFT passes none (module doc)."""

    def __call__(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        route = current_route()
        if route is None or not any(module is enc for enc in task_encoders(route.owner)):
            return None
        bound = dict(zip(("indices", "task_ids"), args, strict=False)) | kwargs
        if bound.get("task_ids") is not None:
            return None
        return (), {**bound, "task_ids": route.task_ids}


@dataclass(frozen=True, eq=False)
class Route:
    """The ``task_ids`` of one PeftModel call in progress, and the install that routes them."""

    owner: nn.Module
    task_ids: Tensor
    record: InstallRecord


# The task ids of the PeftModel calls in progress on this thread or task, innermost last. The
# context variable holds weak references only: a route lives as long as the call's PeftCall (in
# the call's keyword arguments), so a call whose output hook never ran (its install was removed
# during the forward, on another thread) leaves nothing alive behind, and the dead entry is
# dropped by the next push or pop.
_ROUTES: ContextVar[tuple[weakref.ref[Route], ...]] = ContextVar("maskpatch_peft_task_ids", default=())


def _live_routes() -> tuple[weakref.ref[Route], ...]:
    return tuple(ref for ref in _ROUTES.get() if (route := ref()) is not None and not route.record.removed)


def push_route(route: Route) -> None:
    _ROUTES.set((*_live_routes(), weakref.ref(route)))


def pop_route(route: Route) -> None:
    _ROUTES.set(tuple(ref for ref in _live_routes() if ref() is not route))


def current_route() -> Route | None:
    routes = _ROUTES.get()
    return routes[-1]() if routes else None


def drop_routes(record: InstallRecord) -> None:
    """Drop this context's routes of ``record``'s install (its removal, on the thread that removes it)."""
    if _ROUTES.get():
        _ROUTES.set(tuple(ref for ref in _live_routes() if ref().record is not record))  # type: ignore[union-attr]


def task_encoders(peft_model: nn.Module) -> list[nn.Module]:
    """Return the multitask prompt encoders of ``peft_model`` (those that need ``task_ids``)."""
    encoders = getattr(peft_model, "prompt_encoder", None)
    if not isinstance(encoders, nn.ModuleDict):
        return []
    return [enc for enc in encoders.values() if type(enc).__name__ == "MultitaskPromptEmbedding"]


def ensure_task_ids_hook(peft_model: nn.Module, record: InstallRecord) -> None:
    """Register a :class:`TaskIdsHook` on a multitask encoder added after ``apply`` (add_adapter)."""
    for encoder in task_encoders(peft_model):
        if not any(isinstance(h, TaskIdsHook) for h in encoder._forward_pre_hooks.values()):
            record.register(encoder, TaskIdsHook(record))  # never after the install was removed
