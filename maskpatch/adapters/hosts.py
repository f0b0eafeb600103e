"""Hosts: objects that hold a PeftModel and call it for the user (a transformers pipeline, a Trainer).

A host reads the model's token-level outputs next to its own ``N``-long view of the input (a
pipeline's offsets and special-token mask, a Trainer's label ids), so it needs outputs lined up
with its own tokens, whatever policy the model is patched with. ``maskpatch.apply(host)``:

* patches ``host.model`` as :func:`maskpatch.apply` would (the ``peft`` adapter), unless it is
  patched already, in which case that install is joined (same policy) and left as it is;
* registers an :class:`AlignOutputHook` on ``host.model``: a forward hook that, only while the
  host itself is calling (a :class:`~contextvars.ContextVar` says so), cuts the ``M`` virtual
  positions off every token-level output, as ``strip`` does;
* wraps, once per process and on the class, the host method inside which the host calls its
  model (``Pipeline.forward``, ``Trainer.evaluation_loop``) with :func:`_aligning_wrapper`,
  which sets that context variable for hosts whose model carries an :class:`AlignOutputHook`
  and calls the method unchanged for every other object.

So outside the host (``host.model(**batch)`` called by the user) the install's policy holds, and
inside it the host sees ``N``-long outputs. The handle removes what ``apply(host)`` added: the
align hook, and the model's install if ``apply(host)`` made it. The class wrappers stay for the
process (pass-throughs for unpatched hosts); :func:`remove_host_wrappers` takes them off.
"""

from __future__ import annotations

import copy
import sys
import threading
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, ClassVar

import wrapt
from torch import Tensor, nn

from ..drift import Policy, check_excess, strip_positions, validate_policy
from ..errors import AlreadyPatchedError, MaskpatchWarning, PolicyError, UnsupportedModelError
from ..handle import LOCK, HookSpec, PatchHandle, find_record, install, remove_hooks
from ..hooks import ForwardHook, InstallRecord
from ..registry import check_requirements, find_adapter, registered_adapters
from .peft import CALL_KEY, PeftCall, PeftCallHook
from .peft.mask import prompt_output_mask
from .peft.tasks import Fields, find_task, supported_tasks

__all__ = [
    "AlignOutputHook",
    "HostAdapter",
    "apply_host",
    "host_adapter",
    "is_host_patched",
    "patched_host",
    "peft_kind",
    "remove_host",
    "remove_host_wrappers",
]

# The models some host is calling right now, on this thread or task (innermost last).
_ALIGNING: ContextVar[tuple[nn.Module, ...]] = ContextVar("maskpatch_aligning", default=())


def peft_kind(model: object) -> str | None:
    """Return the name of ``model``'s PEFT task class if hosts are supported with it (its row has host fields)."""
    found = find_task(model)
    return found[0].__name__ if found is not None and found[1].host_fields is not None else None


def _host_fields(model: object) -> Fields:
    found = find_task(model)
    return () if found is None or found[1].host_fields is None else found[1].host_fields


class AlignOutputHook(ForwardHook):
    """Forward hook on a host's PeftModel: while the host calls it, cut the virtual positions (as ``strip``).

    Outside a host's call it does nothing. Registered after the model's own output hook, so it
    sees what the install's policy made of the output: ``N + M`` positions under ``extend`` and
    ``ignore`` (cut here), ``N`` under ``strip`` (left alone). A copy (``pickle``, ``deepcopy``)
    puts the host's class wrapper back when it is loaded, e.g. in a fresh worker process.
    """

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        adapter = next((a for a in registered_adapters() if a.name == self.record.adapter), None)
        if isinstance(adapter, HostAdapter):  # now, or when the host's library is imported
            wrapt.register_post_import_hook(adapter.on_import, adapter.host_class[0])

    def __call__(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> Any:
        if not any(owner is module for owner in _ALIGNING.get()):
            return None
        call = kwargs.get(CALL_KEY)
        if not isinstance(call, PeftCall) or output is None:
            return None  # nothing prepended (prefix tuning, LoRA, a disabled adapter), or the forward raised
        return cut_output(output, call, fields=_host_fields(module), where=type(module).__name__)


def cut_output(output: Any, call: PeftCall, *, fields: Fields, where: str) -> Any:
    """Return a copy of ``output`` whose token-level ``fields`` have ``N`` positions; ``output`` is not changed.

    A field ``N + M`` long on an axis loses its first ``M`` positions there (views); ``N`` long or
    shorter is left alone; any other excess raises :class:`~maskpatch.errors.DriftError`.
    """
    if not isinstance(output, Mapping):
        raise UnsupportedModelError(
            f"{where}: expected a ModelOutput to line up with the host's tokens, but the model returned "
            f"{type(output).__qualname__} (was return_dict=False passed?)"
        )
    aligned: Any = copy.copy(output)  # the same type: a dict or a ModelOutput
    for name, dims in fields:
        value = output.get(name)
        if isinstance(value, Tensor):
            aligned[name] = _cut(value, dims, call, f"{where} output {name!r}")
        elif value is not None:
            aligned[name] = type(value)(
                _cut(v, dims, call, f"{where} output {name!r}[{i}]") for i, v in enumerate(value)
            )
    return aligned


def _cut(value: Tensor, dims: tuple[int, ...], call: PeftCall, where: str) -> Tensor:
    for dim in dims:
        size = value.shape[dim]
        if size > call.n:
            text = f"{where} has {size} positions on axis {dim} but the input has {call.n}"
            value = strip_positions(
                value, check_excess(size - call.n, call.m, where=text, adapter=call.adapter), dim=dim
            )
    return value


# --- the class-level wrapper that says "a host is calling" ---------------------------------------

_WRAPPER_LOCK = threading.Lock()
_WRAPPED: list[tuple[type, str]] = []


def has_align_hook(model: nn.Module) -> bool:
    """Return whether ``model`` itself carries an :class:`AlignOutputHook` (of any install)."""
    return any(isinstance(h, AlignOutputHook) for h in model._forward_hooks.values())


def _aligning_wrapper(wrapped: Any, instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """wrapt wrapper of a host method: mark ``instance.model`` as called by its host for the call's duration."""
    model = getattr(instance, "model", None)
    if not isinstance(model, nn.Module) or not has_align_hook(model):
        return wrapped(*args, **kwargs)
    token = _ALIGNING.set((*_ALIGNING.get(), model))
    try:
        return wrapped(*args, **kwargs)
    finally:
        _ALIGNING.reset(token)


def ensure_host_wrapper(cls: type, method: str) -> None:
    """Wrap ``cls.<method>`` with :func:`_aligning_wrapper` on the class, unless it is wrapped (idempotent)."""
    with _WRAPPER_LOCK:
        current = cls.__dict__[method]
        if getattr(current, "_self_wrapper", None) is _aligning_wrapper:
            return
        wrapt.wrap_function_wrapper(cls, method, _aligning_wrapper)
        _WRAPPED.append((cls, method))


def remove_host_wrappers() -> int:
    """Restore every host method :func:`ensure_host_wrapper` wrapped; return how many were restored."""
    restored = 0
    with _WRAPPER_LOCK:
        while _WRAPPED:
            cls, method = _WRAPPED.pop()
            current = cls.__dict__.get(method)
            if current is not None and getattr(current, "_self_wrapper", None) is _aligning_wrapper:
                type.__setattr__(cls, method, current.__wrapped__)
                restored += 1
    return restored


# --- host adapters and their installs ------------------------------------------------------------


class HostAdapter:
    """Base class of the adapters for hosts; a subclass names the host class and the method to wrap.

    ``plan(host, record)`` returns the hooks for ``host.model``: the ``peft`` adapter's plan when
    the PeftModel has no install of its own yet, then an :class:`AlignOutputHook`. It changes
    nothing. (A PeftModel inside a patched sentence-transformers model has none of its own: that
    install only covers calls made through sentence-transformers.)
    """

    name: ClassVar[str]
    requires: ClassVar[dict[str, str]] = {"peft": ">=0.21,<0.22", "transformers": ">=5,<6", "torch": ">=2.4"}
    optional: ClassVar[dict[str, str]] = {}
    #: ``(module name in sys.modules, class name, method called around the model calls)``.
    host_class: ClassVar[tuple[str, str, str]]

    def host_type(self) -> type | None:
        """Return the host class if its library is imported (never imports it)."""
        module, cls, _ = self.host_class
        found = getattr(sys.modules.get(module), cls, None)
        return found if isinstance(found, type) else None

    def matches(self, model: object) -> bool:
        host = self.host_type()
        return host is not None and isinstance(model, host)

    def model_of(self, host: Any) -> nn.Module:
        """Return the PeftModel ``host`` calls; raise :class:`UnsupportedModelError` for anything else."""
        model = getattr(host, "model", None)
        if not isinstance(model, nn.Module) or peft_kind(model) is None:
            kinds = ", ".join(supported_tasks(hosts=True))
            raise UnsupportedModelError(
                f"expected the {type(host).__name__}'s model to be a peft PeftModel of a task class maskpatch "
                f"lines up for hosts ({kinds}), but got {type(model).__module__}.{type(model).__qualname__}"
            )
        self.check_host(host, model)
        return model

    def check_host(self, host: Any, model: nn.Module) -> None:
        """Raise :class:`UnsupportedModelError` if ``host`` is of a kind this adapter does not line up."""

    def plan(self, model: Any, record: InstallRecord) -> list[HookSpec]:
        target = self.model_of(model)
        specs = [] if has_own_install(target) else find_adapter(target).plan(target, record)
        return [*specs, HookSpec(target, AlignOutputHook(record))]

    #: The mask capability on the host's PeftModel (see maskpatch.registry.MaskAdapter).
    output_mask = staticmethod(prompt_output_mask)

    def ensure_wrapper(self) -> None:
        """Wrap the host method that calls the model (see the module docstring)."""
        host = self.host_type()
        if host is not None:
            ensure_host_wrapper(host, self.host_class[2])

    def on_import(self, module: object) -> None:
        """Post-import hook for the host's module: :meth:`ensure_wrapper`."""
        self.ensure_wrapper()


def has_own_install(peft_model: nn.Module) -> bool:
    """Return whether ``peft_model`` itself is patched (carries the ``peft`` adapter's call hook)."""
    return any(isinstance(h, PeftCallHook) for h in peft_model._forward_pre_hooks.values())


def host_adapter(obj: object) -> HostAdapter | None:
    """Return the registered host adapter that handles ``obj``, or None (always None for a module)."""
    if isinstance(obj, nn.Module):
        return None
    return next((a for a in registered_adapters() if isinstance(a, HostAdapter) and a.matches(obj)), None)


def _host_record(model: nn.Module) -> InstallRecord | None:
    return next((h.record for h in model._forward_hooks.values() if isinstance(h, AlignOutputHook)), None)


def apply_host(
    adapter: HostAdapter, host: Any, *, policy: Policy, check_versions: bool, prepended_tokens: int | None
) -> PatchHandle:
    """:func:`maskpatch.apply` for a host (see the module docstring)."""
    with LOCK:
        handle, joined = _install_host(adapter, host, policy, check_versions, prepended_tokens, pinned=True)
        handle._record.pinned = True
    if joined:
        warnings.warn(
            f"this {type(host).__name__} is already patched by maskpatch (policy {handle.policy!r}); "
            "returning the existing handle instead of patching twice",
            MaskpatchWarning,
            stacklevel=3,
        )
    return handle


@contextmanager
def patched_host(
    adapter: HostAdapter, host: Any, *, policy: Policy, check_versions: bool, prepended_tokens: int | None
) -> Iterator[PatchHandle]:
    """:func:`maskpatch.patched` for a host: blocks nest, and the last one to exit removes the install."""
    with LOCK:  # one lock for the install and the count, so a block exiting elsewhere cannot remove it between
        handle, _ = _install_host(adapter, host, policy, check_versions, prepended_tokens, pinned=False)
        handle._record.contexts += 1
    try:
        yield handle
    finally:
        with LOCK:
            handle._record.contexts -= 1
            if handle._record.contexts == 0 and not handle._record.pinned:
                handle.remove()


def _install_host(
    adapter: HostAdapter, host: Any, policy: object, check_versions: bool, prepended: int | None, *, pinned: bool
) -> tuple[PatchHandle, bool]:
    """Install (or find) the host install of ``host``; return its handle and whether it existed already."""
    policy = validate_policy(policy)
    if prepended is not None:
        raise PolicyError(
            f"prepended_tokens is for modules that prepend tokens themselves, but got a {type(host).__name__}; "
            "patch its model with maskpatch.apply(model, prepended_tokens=...) instead"
        )
    model = adapter.model_of(host)
    with LOCK:
        existing = _host_record(model) or find_record(model)
        if existing is not None and existing.policy != policy:
            raise AlreadyPatchedError(
                f"the {type(host).__name__}'s {type(model).__name__} is already patched with policy "
                f"{existing.policy!r}, but policy {policy!r} was asked for; remove that install first "
                "(its handle.remove() or maskpatch.remove(model))"
            )
        joined = _host_record(model)
        if joined is not None:
            adapter.ensure_wrapper()  # a copy (pickle, deepcopy) of a patched host, in a fresh process
            return PatchHandle(model, joined), True
        if check_versions:
            check_requirements(adapter)
            if not has_own_install(model):
                check_requirements(find_adapter(model))
        record = InstallRecord(policy, adapter.name, pinned=pinned, root=model)
        install(adapter.plan(host, record))
        adapter.ensure_wrapper()
        return PatchHandle(model, record), False


def is_host_patched(adapter: HostAdapter, host: Any) -> bool:
    """:func:`maskpatch.is_patched` for a host: whether its model carries an :class:`AlignOutputHook`."""
    model = getattr(host, "model", None)
    return isinstance(model, nn.Module) and has_align_hook(model)


def remove_host(adapter: HostAdapter, host: Any) -> bool:
    """:func:`maskpatch.remove` for a host: remove every maskpatch hook from its model; return whether any."""
    model = getattr(host, "model", None)
    if not isinstance(model, nn.Module):
        return False
    with LOCK:
        return remove_hooks(model) > 0
