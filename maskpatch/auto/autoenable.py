"""Process-wide auto-enable: patch every model sentence-transformers and peft create.

``MASKPATCH_AUTO=1`` in the environment turns this on at interpreter start (see
:mod:`maskpatch.auto.constants` and ``docs/auto-enable.md``); :func:`enable` turns it on from code.
Either way nothing is imported eagerly: post-import hooks (``wrapt.register_post_import_hook``)
wait for ``sentence_transformers`` and ``peft``, and then wrap, at class level with wrapt, the
``__init__`` of

* ``sentence_transformers.base.model.BaseModel``, which every sentence-transformers model class
  (SentenceTransformer, SparseEncoder, CrossEncoder, MultiVectorEncoder, subclasses) runs once;
* ``peft.PeftModel`` and each of its subclasses in peft (``PeftModelForFeatureExtraction``, ...);
* ``transformers.Pipeline`` and each of its subclasses in transformers, once
  ``transformers.pipelines`` is imported: a pipeline whose model is a prompt-learning PeftModel is
  patched as a host (:mod:`maskpatch.adapters.hosts`), others are left alone.

When the outermost wrapped ``__init__`` of a new object returns, the object goes to
:func:`maskpatch.apply` with the configured policy, if a registered adapter handles it, that
adapter is not disabled and, for a PeftModel, its active adapter is prompt learning (a LoRA
PeftModel is left alone). No model instance is touched in any other way: the hooks are the usual
ones, so ``is_patched``, ``remove`` and pickling work as after a hand-written ``apply``.

Two rules keep a PeftModel from being patched twice, by the PEFT adapter and by the
sentence-transformers adapter (whose hooks read the PEFT model inside at call time):

* a PeftModel built around a module that already sits in a patched sentence-transformers model
  (``model[0].model = get_peft_model(model[0].model, config)``) is left to that model's install;
* a sentence-transformers model created around PeftModels that were patched on their own takes
  those installs off them before it is patched as a whole.

:func:`disable` puts every class's ``__init__`` back exactly and patches no new model; models
already patched stay patched (``maskpatch.remove`` unpatches one).
"""

from __future__ import annotations

import logging
import sys
import threading
import warnings
import weakref
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import wrapt
from torch import nn

from .. import api, provenance
from ..adapters.hosts import HostAdapter, host_adapter
from ..auditing import AuditReport, audit, is_audited
from ..compat.st_modules import st_model_classes
from ..drift import Policy, validate_policy
from ..errors import MaskpatchError, MaskpatchWarning, PolicyError, UnsupportedModelError
from ..handle import iter_hooks, remove_hooks
from ..layout import is_peft_model
from ..registry import find_adapter, registered_adapters
from .constants import INSTRUMENTED_MODULES, parse_adapter_list

__all__ = [
    "AutoEnableConfig",
    "current_config",
    "disable",
    "enable",
    "instrument_module",
    "is_enabled",
    "process_audit_report",
]

_log = logging.getLogger(__name__)

#: The adapter whose install covers every PeftModel inside the model it patches.
ST_ADAPTER = "sentence-transformers"

#: Modules whose import also wraps constructors (of hosts), besides :data:`INSTRUMENTED_MODULES`.
HOST_MODULES = ("transformers.pipelines",)


@dataclass(frozen=True)
class AutoEnableConfig:
    """The options auto-enable patches new models with."""

    policy: Policy = "extend"
    strict: bool = False
    disabled_adapters: frozenset[str] = frozenset()
    #: audit new models (``MASKPATCH_AUTO=audit``) instead of patching them
    audit: bool = False


class _State:
    """Process-wide state of auto-enable. It lives here, never on a model."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.config: AutoEnableConfig | None = None
        self.hooks_registered = False
        # (class, original __init__, wrapper) for each class whose __init__ is wrapped.
        self.wrapped: list[tuple[type, Any, wrapt.FunctionWrapper[..., Any]]] = []
        # Sentence-transformers models auto-enable patched (weakly held: only to find, when a
        # PeftModel is created, whether its base model already sits inside one).
        self.st_models: weakref.WeakSet[nn.Module] = weakref.WeakSet()
        self.constructing = threading.local()


_STATE = _State()


def enable(
    *, policy: Policy = "extend", strict: bool = False, disabled_adapters: Iterable[str] | str = (), audit: bool = False
) -> AutoEnableConfig:
    """Patch every sentence-transformers model and prompt-learning PeftModel created from now on.

    Returns the options in force.

    ``policy`` is the repair policy of every install. ``disabled_adapters`` names registered
    adapters (e.g. ``"sentence-transformers"``; a comma-separated string works too) whose models
    are left alone. With ``strict``, a model that cannot be patched raises from its constructor
    instead of warning. Calling ``enable`` again replaces the options for models created after it.
    Models created before ``enable`` are not patched. Raises :class:`PolicyError` for an unknown
    policy or adapter name, before changing anything.

    With ``audit`` (``MASKPATCH_AUTO=audit``), the same models are audited instead of patched
    (:func:`maskpatch.audit`): nothing changes, and drift is reported once per site, with a
    :class:`~maskpatch.errors.DriftWarning`, into :func:`process_audit_report`.
    """
    config = _make_config(policy, strict, disabled_adapters, audit)
    with _STATE.lock:
        _STATE.config = config
        register = not _STATE.hooks_registered
        _STATE.hooks_registered = True
    for name in (*INSTRUMENTED_MODULES, *HOST_MODULES):
        if register:  # wrapt calls the hook at once for a library imported already
            wrapt.register_post_import_hook(instrument_module, name)
        elif name in sys.modules:  # enabled again after disable(): the hooks have fired already
            instrument_module(sys.modules[name])
    # A prompt saved under a policy is loaded under that policy (maskpatch.provenance).
    provenance.guard_loads()
    _log.debug("maskpatch auto-enable on: %s", config)
    return config


def disable() -> None:
    """Stop patching new models and restore every wrapped ``__init__`` exactly; idempotent.

    Models patched so far stay patched: ``maskpatch.remove(model)`` unpatches one.
    """
    with _STATE.lock:
        _STATE.config = None
        for cls, original, wrapper in reversed(_STATE.wrapped):
            if cls.__dict__.get("__init__") is wrapper:
                setattr(cls, "__init__", original)
        _STATE.wrapped.clear()


def is_enabled() -> bool:
    """Return whether new models are being patched."""
    return _STATE.config is not None


def current_config() -> AutoEnableConfig | None:
    """Return the options new models are patched with, or None when auto-enable is off."""
    return _STATE.config


def _make_config(policy: Policy, strict: bool, disabled: Iterable[str] | str, audit: bool = False) -> AutoEnableConfig:
    names = parse_adapter_list(disabled) if isinstance(disabled, str) else frozenset(disabled)
    known = {adapter.name for adapter in registered_adapters()}
    unknown = sorted(names - known)
    if unknown:
        raise PolicyError(
            f"expected registered adapter names in disabled_adapters (MASKPATCH_DISABLED_ADAPTERS), but got "
            f"{', '.join(map(repr, unknown))}; registered adapters: {', '.join(sorted(known)) or 'none'}"
        )
    return AutoEnableConfig(
        policy=validate_policy(policy), strict=bool(strict), disabled_adapters=names, audit=bool(audit)
    )


# --- post-import hooks: wrap the constructors -------------------------------------------------


def instrument_module(module: ModuleType) -> None:
    """Post-import hook for a library of :data:`INSTRUMENTED_MODULES`: wrap its model constructors.

    Idempotent. Classes the library has not finished defining yet (it is still being imported,
    e.g. sentence-transformers imports peft half-way) are skipped and wrapped on a later call.
    """
    config = _STATE.config
    if config is None:
        return
    try:
        classes = list(_constructors(module.__name__))
    except Exception as exc:  # noqa: BLE001 - reported by _problem: raised under strict, warned otherwise
        _problem(config, f"cannot find the model classes of {module.__name__} ({type(exc).__name__}: {exc})", exc)
        return
    with _STATE.lock:
        for cls in classes:
            _wrap_init(cls)


def _constructors(library: str) -> Iterator[type]:
    """The classes whose ``__init__`` auto-enable wraps for ``library``, if already defined.

    They are looked up in ``sys.modules`` instead of imported: importing a submodule of a
    library that is still being imported could break its own import.
    """
    if library == "sentence_transformers":
        yield from st_model_classes()  # BaseModel from 5.4; SentenceTransformer and CrossEncoder before
    elif library == "peft":
        peft_model = getattr(sys.modules.get("peft.peft_model"), "PeftModel", None)
        if isinstance(peft_model, type):
            yield from _with_subclasses(peft_model, package="peft")
    elif library == "transformers.pipelines":
        pipeline = getattr(sys.modules.get("transformers.pipelines.base"), "Pipeline", None)
        if isinstance(pipeline, type):
            yield from _with_subclasses(pipeline, package="transformers")


def _with_subclasses(cls: type, *, package: str) -> Iterator[type]:
    """``cls`` and its subclasses defined in ``package`` (recursively), each once."""
    seen: set[type] = set()
    todo = [cls]
    while todo:
        current = todo.pop()
        if current in seen or not (current.__module__ == package or current.__module__.startswith(package + ".")):
            continue
        seen.add(current)
        yield current
        todo.extend(current.__subclasses__())


def _wrap_init(cls: type) -> None:
    """Wrap ``cls.__init__`` (only where ``cls`` defines it) unless auto-enable already did."""
    original = cls.__dict__.get("__init__")
    if original is None or any(entry[0] is cls for entry in _STATE.wrapped):
        return
    wrapper = wrapt.FunctionWrapper(original, _construct)
    setattr(cls, "__init__", wrapper)
    _STATE.wrapped.append((cls, original, wrapper))


def _construct(wrapped: Any, instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """The ``__init__`` wrapper: build the object, then patch it once the outermost ``__init__`` returns."""
    building: set[int] = _STATE.constructing.__dict__.setdefault("ids", set())
    key = id(instance)
    if key in building:
        return wrapped(*args, **kwargs)
    building.add(key)
    try:
        result = wrapped(*args, **kwargs)
    finally:
        building.discard(key)
    config = _STATE.config
    if config is not None and (isinstance(instance, nn.Module) or host_adapter(instance) is not None):
        _patch_created(instance, config)
    return result


# --- patching one new model -------------------------------------------------------------------


def _patch_created(model: nn.Module, config: AutoEnableConfig) -> None:
    """Apply maskpatch to a model that was just created, as ``config`` says (see the module doc)."""
    name = type(model).__name__
    try:
        adapter = find_adapter(model)
    except UnsupportedModelError:
        _log.debug("maskpatch auto-enable: no adapter handles %s; left unpatched", name)
        return
    if adapter.name in config.disabled_adapters:
        _log.debug("maskpatch auto-enable: adapter %r is disabled; %s left unpatched", adapter.name, name)
        return
    if is_peft_model(model) and not _is_prompt_learning(model):
        _log.debug("maskpatch auto-enable: %s has no prompt-learning adapter; left unpatched", name)
        return
    if isinstance(adapter, HostAdapter) and not _holds_prompt_learning(model):
        _log.debug("maskpatch auto-enable: %s does not call a prompt-learning PeftModel; left unpatched", name)
        return
    if config.audit:
        if not isinstance(adapter, HostAdapter):  # a host's model was audited when it was created
            _audit_created(model, config)
        return
    if adapter.name != ST_ADAPTER and _inside_patched_st_model(model):
        _log.debug("maskpatch auto-enable: %s sits inside a patched sentence-transformers model", name)
        return
    try:
        with _STATE.lock:
            if adapter.name == ST_ADAPTER:
                _release_inner_installs(model)
            if not api.is_patched(model):
                api.apply(model, policy=config.policy, strict=config.strict)
            if adapter.name == ST_ADAPTER:
                _STATE.st_models.add(model)
    except MaskpatchError as exc:
        _problem(config, f"could not patch the new {name} ({type(exc).__name__}: {exc}); it is left unpatched", exc)


def process_audit_report() -> AuditReport:
    """Return the report every model audited by ``MASKPATCH_AUTO=audit`` (or ``enable(audit=True)``) records into."""
    return _PROCESS_REPORT


_PROCESS_REPORT = AuditReport()


def _audit_created(model: nn.Module, config: AutoEnableConfig) -> None:
    """Audit a model that was just created into the process-wide report (once per model)."""
    try:
        with _STATE.lock:
            if not is_audited(model, _PROCESS_REPORT):
                audit(model, report=_PROCESS_REPORT)
    except MaskpatchError as exc:
        _problem(config, f"could not audit the new {type(model).__name__} ({type(exc).__name__}: {exc})", exc)


def _is_prompt_learning(peft_model: Any) -> bool:
    """Whether the PeftModel's active adapter is prompt learning (prompt, P-, prefix, multitask tuning)."""
    config = getattr(peft_model, "active_peft_config", None)
    return bool(getattr(config, "is_prompt_learning", False))


def _holds_prompt_learning(host: Any) -> bool:
    """Whether a host (a pipeline) calls a PeftModel whose active adapter is prompt learning."""
    model = getattr(host, "model", None)
    return is_peft_model(model) and _is_prompt_learning(model)


def _inside_patched_st_model(model: nn.Module) -> bool:
    """Whether the module ``model`` (a PeftModel) wraps already sits in a patched ST model."""
    get_base = getattr(model, "get_base_model", None)
    base = get_base() if callable(get_base) else None
    if not isinstance(base, nn.Module):
        return False
    with _STATE.lock:
        owners = list(_STATE.st_models)
    return any(api.is_patched(owner) and any(m is base for m in owner.modules()) for owner in owners)


def _release_inner_installs(model: nn.Module) -> None:
    """Take off ``model`` every install another adapter made on a module inside it."""
    records = {id(hook.record): hook.record for _, _, hook in iter_hooks(model) if hook.record.adapter != ST_ADAPTER}
    for record in records.values():
        _log.debug("maskpatch auto-enable: the sentence-transformers install replaces %r inside", record)
        remove_hooks(model, record)


def _problem(config: AutoEnableConfig, message: str, exc: Exception) -> None:
    """Report an auto-enable problem: raise under ``strict``, warn otherwise."""
    if config.strict:
        raise exc
    warnings.warn(f"maskpatch auto-enable: {message}", MaskpatchWarning, stacklevel=4)
