"""Hosts: objects that hold a PeftModel and call it for the user (a transformers pipeline, a Trainer).

A host reads the model's token-level outputs next to its own ``N``-long view of the input (a
pipeline's offsets and special-token mask, a Trainer's label ids), so it needs outputs lined up
with its own tokens, whatever policy the model is patched with. ``maskpatch.apply(host)``:

* patches ``host.model`` as :func:`maskpatch.apply` would (the ``peft`` adapter), unless it is
  patched already, in which case that install is joined (same policy) and left as it is;
* registers an :class:`AlignOutputHook` on ``host.model``: a forward hook that, only while the
  host itself is calling (a :class:`~contextvars.ContextVar` says so), cuts the ``M`` virtual
  positions off every token-level output, as ``strip`` does;
* wraps, on the class, the host method inside which the host calls its model
  (``Pipeline.forward``, ``Trainer.evaluation_loop``) with :func:`_aligning_wrapper`, which sets
  that context variable for hosts whose model carries an :class:`AlignOutputHook` and calls the
  method unchanged for every other object.

So outside the host (``host.model(**batch)`` called by the user) the install's policy holds, and
inside it the host sees ``N``-long outputs. The handle removes what ``apply(host)`` added: the
align hook, and the model's install if ``apply(host)`` made it.

The class wrapper is held by the installs that need it, as the ``peft`` adapter's class-level
wrappers are (:mod:`maskpatch.adapters.peft.wrappers`): the first live host install of a host
class puts it on (:func:`hold_host_wrapper`, from :meth:`AlignOutputHook.attached`), and the
removal of the last one, by its handle, by ``maskpatch.remove`` or by the last ``patched`` block,
takes it off, leaving the class ``__dict__`` exactly as before. A copy of a patched model
(``pickle``, ``deepcopy``) holds it too, from when it is loaded until ``maskpatch.remove(copy)``.
An install whose model is garbage collected without removal drops out of the holders silently;
the next removal of any host install, or :func:`release_unheld_host_wrappers`, then takes the
wrapper off. Everything happens under :data:`maskpatch.handle.LOCK`.
"""

from __future__ import annotations

import copy
import functools
import sys
import warnings
import weakref
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, ClassVar

import wrapt
from torch import Tensor, nn

from .. import provenance
from ..drift import Policy, check_excess, strip_positions, validate_policy
from ..errors import (
    AlreadyPatchedError,
    MaskpatchWarning,
    PolicyError,
    UnsupportedModelError,
    UnsupportedVersionError,
)
from ..handle import LOCK, HookSpec, PatchHandle, find_record, install, remove_hooks
from ..hooks import ForwardHook, InstallRecord
from ..nesting import counted_block
from ..registry import check_requirements, find_adapter, registered_adapters
from .peft import CALL_KEY, PeftCall, PeftCallHook
from .peft.mask import prompt_output_mask
from .peft.tasks import Fields, find_task, supported_tasks

__all__ = [
    "AlignOutputHook",
    "HostAdapter",
    "HostMethod",
    "apply_host",
    "hold_host_wrapper",
    "host_adapter",
    "is_host_patched",
    "patched_host",
    "peft_kind",
    "release_unheld_host_wrappers",
    "remove_host",
    "remove_host_wrappers",
]

#: A host method, as :attr:`HostAdapter.host_class` names it: (module, class name, method name).
HostMethod = tuple[str, str, str]

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
    ``ignore`` (cut here), ``N`` under ``strip`` (left alone). ``host`` names the host method whose
    class wrapper the install holds while it lives (:attr:`HostAdapter.host_class`). A copy
    (``pickle``, ``deepcopy``) holds it too from when it is loaded, e.g. in a fresh worker process
    (where the wrapper goes on when the host's library is imported).
    """

    def __init__(self, record: InstallRecord, host: HostMethod) -> None:
        super().__init__(record)
        self.host = host

    def attached(self) -> None:
        hold_host_wrapper(self.record, self.host)

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        if "host" not in state:  # pickled by a maskpatch that did not record it: ask the registry
            adapter = next((a for a in registered_adapters() if a.name == self.record.adapter), None)
            if not isinstance(adapter, HostAdapter):
                return
            self.host = adapter.host_class
        try:
            imported = hold_host_wrapper(self.record, self.host)
        except UnsupportedVersionError as exc:  # never fail an unpickling: say the copy is not lined up
            warnings.warn(f"{exc}; a host around this copy sees the install's policy", MaskpatchWarning, stacklevel=2)
            return
        if not imported:  # outside LOCK: wrapt calls import hooks under its own lock
            _wrap_when_imported(self.host)

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

# Under LOCK. The installs (records) holding each host method's wrapper, weakly: an install
# dropped with its model without remove() does not hold the wrapper forever.
_HOLDERS: dict[HostMethod, weakref.WeakSet[InstallRecord]] = {}
# The wrappers in place: host method -> (class, original as found in its __dict__, wrapper).
_WRAPPED: dict[HostMethod, tuple[type, Any, Any]] = {}
# The host methods whose post-import hook is registered (wrapt cannot unregister one).
_IMPORT_HOOKS: set[HostMethod] = set()


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


def host_method(host: HostMethod) -> tuple[type, Any] | None:
    """Return ``(class, method as in its __dict__)`` for ``host`` if its module is imported (never imports it).

    Raises :class:`UnsupportedVersionError` when the class does not define the method itself:
    wrapping an inherited one could not be undone exactly, and without it the host's outputs
    would not be lined up.
    """
    module, name, method = host
    cls = getattr(sys.modules.get(module), name, None)
    if not isinstance(cls, type):
        return None
    if method not in cls.__dict__:
        raise UnsupportedVersionError(
            f"maskpatch lines up a {name}'s outputs by wrapping {module}.{name}.{method}, but {name} does not "
            f"define {method} itself in this version of its library"
        )
    return cls, cls.__dict__[method]


def hold_host_wrapper(record: InstallRecord, host: HostMethod) -> bool:
    """Hold the wrapper of ``host`` for as long as ``record``'s install lives; return whether it is on now.

    The first holder puts :func:`_aligning_wrapper` on the class if its module is imported (False
    otherwise: see :func:`_wrap_when_imported`); the install's removal releases it, and the release
    of the last holder restores the class exactly. Idempotent per install; a removed install holds
    nothing. Raises :class:`UnsupportedVersionError`, holding nothing, when the class does not
    define the method.
    """
    with LOCK:
        if record.removed:
            return host in _WRAPPED
        imported = _put_on(host)
        holders = _HOLDERS.setdefault(host, weakref.WeakSet())
        if record not in holders:
            holders.add(record)
            if _release_host_wrappers not in record.releases:
                record.releases.append(_release_host_wrappers)
        return imported


def _put_on(host: HostMethod) -> bool:
    """Put the wrapper of ``host`` on its class unless it is on; return whether the class is imported (under LOCK)."""
    if host in _WRAPPED:
        return True
    found = host_method(host)
    if found is None:
        return False
    cls, original = found
    wrapper = wrapt.FunctionWrapper(original, _aligning_wrapper)
    type.__setattr__(cls, host[2], wrapper)
    _WRAPPED[host] = (cls, original, wrapper)
    return True


def _release_host_wrappers(record: InstallRecord) -> None:
    """The undo an install holding host wrappers runs at its removal (under LOCK)."""
    with LOCK:
        for holders in _HOLDERS.values():
            holders.discard(record)
        release_unheld_host_wrappers()


def release_unheld_host_wrappers() -> int:
    """Take off every host wrapper no live install holds, restoring the class exactly; return how many.

    The removal of the last holder does this by itself; an install whose model was garbage
    collected without removal drops out of the holders silently, so its wrapper stays until the
    next removal or a call of this function. A wrapper some other code has replaced since (a
    wrapper of the wrapper) cannot be taken off without undoing that code's change: it is left
    in place (a pass-through for unpatched hosts) with a :class:`MaskpatchWarning`.
    """
    restored = 0
    with LOCK:
        for host, (cls, original, wrapper) in list(_WRAPPED.items()):
            if _HOLDERS.get(host):
                continue
            del _WRAPPED[host]
            if cls.__dict__.get(host[2]) is wrapper:
                type.__setattr__(cls, host[2], original)
                restored += 1
            else:
                warnings.warn(
                    f"maskpatch cannot restore {cls.__qualname__}.{host[2]} exactly: expected its own wrapper "
                    f"there, but found {type(cls.__dict__.get(host[2])).__qualname__} (something wrapped or "
                    "replaced it since); the wrapper is left in place and passes unpatched hosts through",
                    MaskpatchWarning,
                    stacklevel=2,
                )
    return restored


#: Former name of :func:`release_unheld_host_wrappers`. A wrapper a live install holds is never
#: taken off: that install's host would silently see the policy's outputs instead of its own.
remove_host_wrappers = release_unheld_host_wrappers


def _wrap_when_imported(host: HostMethod) -> None:
    """Put the wrapper of ``host`` on when its module is imported, if an install holds it then (once per host).

    Call without holding :data:`LOCK`: wrapt runs the hook under its import lock, and the hook
    takes LOCK.
    """
    with LOCK:
        if host in _IMPORT_HOOKS:
            return
        _IMPORT_HOOKS.add(host)
    wrapt.register_post_import_hook(functools.partial(_wrap_if_held, host), host[0])


def _wrap_if_held(host: HostMethod, module: object) -> None:
    """Post-import hook: put the wrapper of ``host`` on if a live install holds it."""
    with LOCK:
        if not _HOLDERS.get(host):
            return
        try:
            _put_on(host)
        except UnsupportedVersionError as exc:
            warnings.warn(f"{exc}; a host around a copied install sees its policy", MaskpatchWarning, stacklevel=2)


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
        host_method(self.host_class)  # raises if the class cannot be wrapped: before any hook goes in
        specs = [] if has_own_install(target) else find_adapter(target).plan(target, record)
        return [*specs, HookSpec(target, AlignOutputHook(record, self.host_class))]

    #: The mask capability on the host's PeftModel (see maskpatch.registry.MaskAdapter).
    output_mask = staticmethod(prompt_output_mask)


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

    def open_install() -> PatchHandle:
        return _install_host(adapter, host, policy, check_versions, prepended_tokens, pinned=False)[0]

    with counted_block(open_install) as handle:
        yield handle


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
            return PatchHandle(model, joined), True
        own = has_own_install(model)
        if check_versions:
            check_requirements(adapter)
            if not own:
                check_requirements(find_adapter(model))
        record = InstallRecord(policy, adapter.name, pinned=pinned, root=model)
        install(adapter.plan(host, record))  # the align hook holds the host's class wrapper (attached)
        if not own:  # this install patched the model too: a prompt saved from it records the policy
            provenance.track(model, record)
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
