"""The policy a prompt was trained with travels with it: ``maskpatch.json`` beside a saved adapter.

A prompt trained under one policy learns to work with that policy's pooling; served unpatched
(or under another policy) it gives other embeddings, and ones that depend on the batch's padding
again. Nothing in PEFT's own files says how a prompt was trained, so maskpatch writes a small
sidecar, :data:`SIDECAR`, next to ``adapter_config.json``:

* **on save.** While a model is patched, ``PeftModel.save_pretrained`` (which
  sentence-transformers' ``Transformer.save`` calls too) is wrapped at class level with wrapt.
  When the PeftModel being saved sits inside a patched model, every prompt-learning adapter it
  saves gets a sidecar naming the policy; an unpatched save in that time removes a sidecar an
  earlier patched save left in the same directory. PEFT's own files are not touched: they are
  byte-identical to an unpatched save. The wrapper goes in with the first install and comes off,
  restoring the class exactly, when the last patched model is unpatched (or garbage collected,
  noticed at the next removal).
* **on load.** ``PeftModel.from_pretrained`` and ``PeftModel.load_adapter`` are wrapped. When
  the adapter directory holds a sidecar and the model the adapter goes into is not patched with
  that policy, one :class:`~maskpatch.errors.MaskpatchWarning` names the policy and what to do.
  Under auto-enable (``MASKPATCH_AUTO``) a PeftModel that ``from_pretrained`` builds is patched
  with the recorded policy instead (replacing auto-enable's own install of it).

**How long the load guard stays on, and why part of it is process-wide.** Its main case is a
load into a model that is *not* patched: there is no install then to tie the wrapper to. So the
guard has two holders, and the wrappers are on while either holds them:

* *the process*, from the first use of maskpatch's public API (``maskpatch.apply``, any name
  :mod:`maskpatch` exports lazily) or :func:`maskpatch.auto.autoenable.enable` (auto-enable
  patches what ``from_pretrained`` builds with the recorded policy, before any install of it
  exists), until :func:`unguard_loads`. A post-import hook waits for peft; nothing is imported
  eagerly. This part stays on for the process on purpose: :func:`unguard_loads` is the opt out.
* *the installs*: every install of :func:`maskpatch.apply` (and of a host, when it patches the
  host's model) holds the guard while it lives, exactly as it holds the ``save_pretrained``
  wrapper. So a load into a patched model is checked even with the process part off (after
  :func:`unguard_loads`, or when maskpatch is used only through its submodules), and after the
  last such install is removed ``PeftModel.__dict__`` is exactly as before the first.

:func:`unguard_loads` then :func:`guard_loads` put the process part off and on again; the
wrappers come off, restoring both methods exactly, when neither holder is left. The page
"What maskpatch changes on classes" of the docs lists every class-level wrapper.

``maskpatch doctor`` reads the sidecar too (:func:`read_sidecar`).
"""

from __future__ import annotations

import inspect
import json
import logging
import os
import sys
import threading
import warnings
import weakref
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import wrapt
from torch import nn

from .drift import POLICIES, Policy
from .errors import MaskpatchWarning, SidecarError
from .handle import find_record
from .hooks import LOCK, InstallRecord

__all__ = [
    "SIDECAR",
    "TrainedWith",
    "guard_loads",
    "load_guard_holders",
    "read_sidecar",
    "served_policy",
    "track",
    "unguard_loads",
    "untrack_unpatched",
]

_log = logging.getLogger(__name__)

#: The sidecar's file name, beside ``adapter_config.json``.
SIDECAR = "maskpatch.json"
#: The version of the sidecar's layout; a reader refuses a layout it does not know.
FORMAT = 1
#: The peft adapter of the registry: auto-enable leaves PeftModels alone when it is disabled.
_PEFT_ADAPTER = "peft"


@dataclass(frozen=True)
class TrainedWith:
    """What a sidecar records: the policy the adapter was saved under, and which adapter it was."""

    policy: Policy
    adapter_name: str
    peft_type: str
    num_virtual_tokens: int
    maskpatch_version: str
    format: int = FORMAT


#: One wrapped class method: (class, attribute, original as found in the class ``__dict__``, wrapper).
_Wrapped = tuple[type, str, Any, Any]


class _State:
    """Process-wide: the patched models being tracked and the class methods wrapped. Never on a model."""

    def __init__(self) -> None:
        #: apply roots -> their install's record (weakly: a dropped model or record is forgotten)
        self.roots: weakref.WeakKeyDictionary[nn.Module, weakref.ref[InstallRecord]] = weakref.WeakKeyDictionary()
        # (class, attribute, original as found in the class __dict__, wrapper) for each wrapped method.
        self.saving: list[_Wrapped] = []
        self.loading: list[_Wrapped] = []
        self.missing: set[tuple[type, str]] = set()
        self.guard_requested = False
        self.hook_registered = False
        self.local = threading.local()


_STATE = _State()


# -- the sidecar file ---------------------------------------------------------------------------


def read_sidecar(directory: str | os.PathLike[str]) -> TrainedWith | None:
    """Return what ``directory``'s :data:`SIDECAR` records, or None when it has none.

    Raises :class:`SidecarError` when the file exists but is not a sidecar this version reads.
    """
    path = Path(directory) / SIDECAR
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise SidecarError(f"cannot read {path}: {exc}") from exc
    if not isinstance(data, dict) or data.get("format") != FORMAT or data.get("policy") not in POLICIES:
        found = data.get("format") if isinstance(data, dict) else type(data).__name__
        raise SidecarError(
            f"{path} is not a maskpatch sidecar of format {FORMAT} with a known policy (found {found!r})"
        )
    try:
        return TrainedWith(**{key: data[key] for key in TrainedWith.__dataclass_fields__})
    except KeyError as exc:
        raise SidecarError(f"{path} lacks the field {exc.args[0]!r}") from exc


def _write_sidecar(directory: str, trained: TrainedWith) -> None:
    path = Path(directory) / SIDECAR
    path.write_text(json.dumps(asdict(trained), indent=2) + "\n", encoding="utf-8")


# -- which policy serves a module ---------------------------------------------------------------


def served_policy(module: nn.Module) -> Policy | None:
    """Return the policy of the install that covers ``module``, or None when none does.

    An install covers ``module`` when one of ``module``'s own submodules carries its hooks, or when
    a tracked patched model (an ``apply`` root) contains ``module``.
    """
    record = find_record(module)
    if record is not None:
        return record.policy
    for root, ref in list(_STATE.roots.items()):
        if any(sub is module for sub in root.modules()):
            record = ref()
            if record is not None and not record.removed:
                return record.policy
    return None


def track(root: nn.Module, record: InstallRecord) -> None:
    """Remember ``root``, just patched by ``record``'s install; wrap saving and loading while any such install lives.

    Called under :data:`LOCK` by the install (never registers an import hook: wrapt runs those
    under its own lock, and a hook of this module takes LOCK).
    """
    with LOCK:
        _STATE.roots[root] = weakref.ref(record)
        _sync_wrappers()


def untrack_unpatched() -> None:
    """Forget the tracked models whose install was removed (O(tracked)); unwrap what nothing holds any more.

    Saving is unwrapped when no tracked install is left, loading when none is left and the
    process-wide guard is off (:func:`unguard_loads`); both exactly. An install whose model was
    garbage collected without removal is forgotten here too, so the removal of any install (which
    calls this) or a call of this function settles it.
    """
    with LOCK:
        for root, ref in list(_STATE.roots.items()):
            record = ref()
            if record is None or record.removed:
                _STATE.roots.pop(root, None)
        _sync_wrappers()


def _sync_wrappers() -> None:
    """Under :data:`LOCK`: wrap or restore saving and loading as their holders say (see the module docstring)."""
    cls = _peft_model_class()
    if not _STATE.roots:
        _restore(_STATE.saving)
    elif cls is not None and not _STATE.saving:
        _wrap(cls, "save_pretrained", _save_pretrained, _STATE.saving)
    if not (_STATE.roots or _STATE.guard_requested):
        _restore(_STATE.loading)
    elif cls is not None and not _STATE.loading:
        _wrap(cls, "from_pretrained", _from_pretrained, _STATE.loading)
        _wrap(cls, "load_adapter", _load_adapter, _STATE.loading)


# -- saving -------------------------------------------------------------------------------------


def _peft_model_class() -> type | None:
    module = sys.modules.get("peft.peft_model")
    return getattr(module, "PeftModel", None)


def _wrap(cls: type, name: str, wrapper: Any, into: list[_Wrapped]) -> None:
    original = cls.__dict__.get(name)
    if original is None:  # a peft that moved the method: say so once, never fail an apply or an import
        if (cls, name) not in _STATE.missing:
            _STATE.missing.add((cls, name))
            warnings.warn(
                f"maskpatch cannot record or check the policy of saved prompts: expected {cls.__name__}.{name} "
                "to be defined on the class, but it is not",
                MaskpatchWarning,
                stacklevel=2,
            )
        return
    function_wrapper = wrapt.FunctionWrapper(original, wrapper)
    setattr(cls, name, function_wrapper)
    into.append((cls, name, original, function_wrapper))


def _restore(wrapped: list[_Wrapped]) -> None:
    """Put each original back, exactly; a wrapper something else replaced since is left to it, with a warning."""
    for cls, name, original, function_wrapper in reversed(wrapped):
        current = cls.__dict__.get(name)
        if current is function_wrapper:
            setattr(cls, name, original)
        else:
            warnings.warn(
                f"maskpatch cannot restore {cls.__qualname__}.{name} exactly: expected its own wrapper there, but "
                f"found {type(current).__qualname__} (something wrapped or replaced it since); left as it is",
                MaskpatchWarning,
                stacklevel=3,
            )
    wrapped.clear()


def _save_pretrained(wrapped: Any, instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """The ``save_pretrained`` wrapper: save as PEFT does, then write (or clear) the sidecars."""
    result = wrapped(*args, **kwargs)
    bound = inspect.signature(wrapped).bind(*args, **kwargs)
    if not bound.arguments.get("is_main_process", True):
        return result
    directory = os.fspath(bound.arguments["save_directory"])
    names = bound.arguments.get("selected_adapters") or list(instance.peft_config)
    policy = served_policy(instance)
    for name, output_dir in _adapter_dirs(instance, directory, names):
        if policy is None:
            Path(output_dir, SIDECAR).unlink(missing_ok=True)
        else:
            _write_sidecar(output_dir, _trained_with(instance, name, policy))
    return result


def _adapter_dirs(peft_model: Any, directory: str, names: list[str]) -> Iterator[tuple[str, str]]:
    """Yield ``(adapter name, directory PEFT saved it in)`` for each prompt-learning adapter of ``names``."""
    for name in names:
        if getattr(peft_model.peft_config[name], "is_prompt_learning", False):
            yield name, directory if name == "default" else os.path.join(directory, name)


def _trained_with(peft_model: Any, name: str, policy: Policy) -> TrainedWith:
    from . import __version__

    config = peft_model.peft_config[name]
    peft_type = getattr(config.peft_type, "value", str(config.peft_type))
    return TrainedWith(policy, name, str(peft_type), int(config.num_virtual_tokens), __version__)


# -- loading ------------------------------------------------------------------------------------


def guard_loads() -> None:
    """Turn the process-wide load guard on: warn when an adapter saved under a policy is loaded into a model not patched with it.

    Wraps ``PeftModel.from_pretrained`` and ``PeftModel.load_adapter`` once peft is imported (at
    once if it is); idempotent. The first use of maskpatch's public API and auto-enable call it.
    :func:`unguard_loads` turns it off again.
    """
    with LOCK:
        _STATE.guard_requested = True
        register = not _STATE.hook_registered
        _STATE.hook_registered = True
    if register:  # outside LOCK: wrapt calls the hook at once for a module imported already, under its lock
        wrapt.register_post_import_hook(_on_peft_import, "peft")
    elif "peft" in sys.modules:
        _on_peft_import(sys.modules["peft"])


def unguard_loads() -> None:
    """Turn the process-wide load guard off; idempotent.

    ``PeftModel.from_pretrained`` and ``load_adapter`` are restored exactly at once when no live
    install holds them, otherwise when the last one is removed (until then loads into patched
    models are still checked).
    """
    import maskpatch

    maskpatch._guarded = True  # a later first use of the public API must not turn it back on
    with LOCK:
        _STATE.guard_requested = False
        untrack_unpatched()


def load_guard_holders() -> dict[str, Any]:
    """Say who holds the load guard now: ``{"process": bool, "installs": int, "wrapped": bool}``.

    ``process`` is the process-wide part (:func:`guard_loads` / :func:`unguard_loads`), ``installs``
    the live tracked installs, ``wrapped`` whether both methods are wrapped now.
    """
    with LOCK:
        records = [ref() for ref in _STATE.roots.values()]
        installs = sum(1 for record in records if record is not None and not record.removed)
        return {"process": _STATE.guard_requested, "installs": installs, "wrapped": bool(_STATE.loading)}


def _on_peft_import(module: Any) -> None:
    with LOCK:  # a model patched before peft was imported holds both; the process part holds loading
        _sync_wrappers()


def _busy() -> bool:
    return bool(getattr(_STATE.local, "busy", False))


def _from_pretrained(wrapped: Any, instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """The ``from_pretrained`` wrapper: build the PeftModel (its inner ``load_adapter`` unchecked), then check."""
    if _busy():
        return wrapped(*args, **kwargs)
    _STATE.local.busy = True
    try:
        peft_model = wrapped(*args, **kwargs)
    finally:
        _STATE.local.busy = False
    bound = inspect.signature(wrapped).bind(*args, **kwargs)
    name = bound.arguments.get("adapter_name", "default")
    directory = _adapter_dir(bound.arguments["model_id"], bound.arguments.get("kwargs", {}))
    _check_loaded(peft_model, bound.arguments["model"], directory, name, built=True)
    return peft_model


def _load_adapter(wrapped: Any, instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """The ``load_adapter`` wrapper: load as PEFT does, then check the adapter just loaded."""
    result = wrapped(*args, **kwargs)
    if not _busy():
        bound = inspect.signature(wrapped).bind(*args, **kwargs)
        directory = _adapter_dir(bound.arguments["model_id"], bound.arguments.get("kwargs", {}))
        _check_loaded(instance, instance, directory, bound.arguments["adapter_name"], built=False)
    return result


def _adapter_dir(model_id: Any, extra: dict[str, Any]) -> Path | None:
    """The local directory PEFT read the adapter from, or None for a hub id (never fetched here)."""
    path = Path(os.fspath(model_id)) / (extra.get("subfolder") or "")
    return path if path.is_dir() else None


def _check_loaded(peft_model: Any, target: nn.Module, directory: Path | None, name: str, *, built: bool) -> None:
    """Warn (or, under auto-enable, patch) when adapter ``name`` was saved under a policy that does not serve it."""
    if directory is None:
        return
    try:
        trained = read_sidecar(directory)
    except SidecarError as exc:
        warnings.warn(f"ignoring the maskpatch sidecar of adapter {name!r}: {exc}", MaskpatchWarning, stacklevel=4)
        return
    if trained is None:
        return
    served = served_policy(peft_model) or served_policy(target)
    if served == trained.policy:
        return
    if built and _auto_patch(peft_model, trained.policy, served):
        _log.info("maskpatch: adapter %r from %s patched with its recorded policy %r", name, directory, trained.policy)
        return
    how = "unpatched" if served is None else f"under policy {served!r}"
    warnings.warn(
        f"the prompt-learning adapter {name!r} loaded from {str(directory)!r} was trained with maskpatch policy "
        f"{trained.policy!r} ({SIDECAR}), but the model it was loaded into is served {how}: its embeddings will "
        f"differ from the ones it was trained for{' and depend on the batch padding' if served is None else ''}. "
        f"Patch the model you encode with: maskpatch.apply(model, policy={trained.policy!r}) (patching before "
        f"loading the adapter also silences this warning), or set MASKPATCH_AUTO=1 to apply it on load",
        MaskpatchWarning,
        stacklevel=4,
    )


def _auto_patch(peft_model: nn.Module, policy: Policy, served: Policy | None) -> bool:
    """Under auto-enable, give a PeftModel ``from_pretrained`` just built the recorded policy; return whether done.

    Only the PeftModel's own install (the one auto-enable made in its constructor) is replaced; a
    model that encloses it is the caller's and is left as it is (the caller is warned instead).
    """
    from . import api, autoenable

    config = autoenable.current_config()
    if config is None or _PEFT_ADAPTER in config.disabled_adapters:
        return False
    record = find_record(peft_model)
    if served is not None and (record is None or record.root is not peft_model):
        return False
    if record is not None:
        api.remove(peft_model)
    api.apply(peft_model, policy=policy)
    return True
