"""The adapter registry: one adapter per model family, kept as plain data.

An adapter says which objects it handles (``matches``), which library versions it was tested
with (``requires``, checked when it is used, never at import) and which hooks to register
(``plan``, which must not change the model). Third-party packages add adapters through the
``maskpatch.adapters`` entry-point group; each entry point names an adapter object or a class
that builds one with no arguments.
"""

from __future__ import annotations

import importlib.metadata
import threading
import warnings
from collections.abc import Mapping
from typing import Protocol, runtime_checkable

from torch import Tensor, nn

from .compat.versions import in_range, installed_version
from .conventions import MaskConvention
from .errors import (
    AdapterExistsError,
    InvalidAdapterError,
    MaskpatchWarning,
    UnknownAdapterError,
    UnsupportedModelError,
    UnsupportedVersionError,
)
from .handle import HookSpec
from .hooks import InstallRecord

__all__ = [
    "ENTRY_POINT_GROUP",
    "Adapter",
    "MaskAdapter",
    "check_requirements",
    "find_adapter",
    "get_adapter",
    "installed_adapter",
    "load_entry_points",
    "register_adapter",
    "registered_adapters",
    "unregister_adapter",
]

ENTRY_POINT_GROUP = "maskpatch.adapters"


@runtime_checkable
class Adapter(Protocol):
    """What a model-family adapter provides: a name, its tested versions, ``matches`` and ``plan``.

    ``maskpatch.apply(model)`` asks the registered adapters in order whether they ``matches`` the
    model, checks the first one's ``requires`` and ``optional`` (unless ``check_versions=False``),
    calls its ``plan`` with a fresh :class:`~maskpatch.plugin.InstallRecord` and registers every
    hook of the plan, all or none. ``handle.remove()`` takes them off again; the adapter has no
    undo of its own to write. See ``docs/writing-an-adapter.md``.
    """

    # Read-only properties, so that a plain class attribute (a str, a dict) satisfies them.
    @property
    def name(self) -> str:
        """The registry key, e.g. ``"sentence-transformers"``; also what ``MASKPATCH_DISABLED_ADAPTERS`` names."""
        ...

    @property
    def requires(self) -> Mapping[str, str]:
        """Distribution name -> PEP 440 specifier; each must be installed and in range."""
        ...

    @property
    def optional(self) -> Mapping[str, str]:
        """Distribution name -> specifier, checked only when that distribution is installed."""
        ...

    def matches(self, model: object) -> bool:
        """Return whether this adapter handles ``model``.

        Must not import anything (look for a library in ``sys.modules``) and must not change ``model``.
        """
        ...

    def plan(self, model: nn.Module, record: InstallRecord) -> list[HookSpec]:
        """Return the hooks to register on ``model``'s modules, each holding ``record``.

        Must not change ``model`` (nor its classes): maskpatch registers the hooks, and may call
        ``plan`` only to compare with an existing install. Raises a :class:`MaskpatchError`
        subclass when ``model`` is not what the adapter expects, before anything is installed.
        """
        ...


@runtime_checkable
class MaskAdapter(Protocol):
    """An adapter that can say which mask lines up with a patched model's outputs (optional capability).

    :func:`maskpatch.output_mask` finds the install in the model, then asks the adapter that made
    it (through the install record) by calling this method. An adapter without it makes
    ``output_mask`` raise :class:`UnsupportedModelError` naming the adapter.
    """

    def output_mask(
        self, model: nn.Module, record: InstallRecord, attention_mask: Tensor, *, convention: MaskConvention
    ) -> Tensor:
        """Return the mask (in ``convention``) that lines up with ``model``'s outputs under ``record.policy``."""
        ...


_PROTOCOL_MEMBERS = ("name", "requires", "optional", "matches", "plan")
_ADAPTERS: dict[str, Adapter] = {}
_LOCK = threading.Lock()
_entry_points_loaded = False
_ENTRY_POINTS_LOCK = threading.Lock()
_builtins_registered = False
_BUILTINS_LOCK = threading.Lock()


def _ensure_builtins() -> None:
    """Register maskpatch's own adapters ahead of any other, once, the first time the registry is used.

    Not at import: ``import maskpatch`` stays free of torch (the built-in adapters import it).
    """
    global _builtins_registered
    if _builtins_registered:
        return
    with _BUILTINS_LOCK:
        if not _builtins_registered:  # another thread may have registered them meanwhile
            from .adapters import builtin_adapters  # deferred: the adapters import this module

            adapters = builtin_adapters()
            with _LOCK:
                for adapter in adapters:
                    _ADAPTERS.setdefault(adapter.name, adapter)
            _builtins_registered = True


def register_adapter(adapter: Adapter, *, replace: bool = False) -> None:
    """Add ``adapter`` to the registry, after the adapters registered before it.

    Raises :class:`InvalidAdapterError` (a ``TypeError``) when ``adapter`` does not provide what
    :class:`Adapter` requires, and :class:`AdapterExistsError` (a ``ValueError``) when an adapter of
    the same name is registered and ``replace`` is false; the registry is unchanged then.
    ``replace=True`` puts ``adapter`` in the place of the one it replaces.
    """
    _check_adapter(adapter)
    _ensure_builtins()
    with _LOCK:
        if adapter.name in _ADAPTERS and not replace:
            raise AdapterExistsError(
                f"an adapter named {adapter.name!r} is already registered ({_ADAPTERS[adapter.name]!r}); "
                "pass replace=True to replace it"
            )
        _ADAPTERS[adapter.name] = adapter


def _check_adapter(adapter: object) -> None:
    """Raise :class:`InvalidAdapterError` unless ``adapter`` has what :class:`Adapter` requires."""
    if not isinstance(adapter, Adapter):
        missing = [name for name in _PROTOCOL_MEMBERS if not hasattr(adapter, name)]
        raise InvalidAdapterError(
            f"expected an adapter with name, requires, optional, matches and plan, but got {adapter!r} "
            f"(missing: {', '.join(missing)})"
        )
    name = adapter.name
    if not isinstance(name, str) or not name:
        raise InvalidAdapterError(f"expected an adapter name that is a non-empty str, but got {name!r}")
    for field in ("requires", "optional"):
        value = getattr(adapter, field)
        if not isinstance(value, Mapping):
            raise InvalidAdapterError(
                f"expected {name!r}.{field} to be a mapping of distribution name to specifier, but got {value!r}"
            )
    for method in ("matches", "plan"):
        if not callable(getattr(adapter, method)):
            raise InvalidAdapterError(
                f"expected {name!r}.{method} to be callable, but got {getattr(adapter, method)!r}"
            )


def unregister_adapter(name: str) -> Adapter:
    """Remove and return the adapter called ``name``.

    Raises :class:`UnknownAdapterError` (a ``KeyError``) when no adapter has that name.
    """
    _ensure_builtins()
    with _LOCK:
        adapter = _ADAPTERS.pop(name, None)
        known = ", ".join(_ADAPTERS) or "none"
    if adapter is None:
        raise UnknownAdapterError(f"no adapter named {name!r} is registered; registered adapters: {known}")
    return adapter


def registered_adapters() -> tuple[Adapter, ...]:
    """Return the registered adapters, in the order ``find_adapter`` tries them."""
    _ensure_builtins()
    _load_entry_points_once()
    with _LOCK:
        return tuple(_ADAPTERS.values())


def load_entry_points(group: str = ENTRY_POINT_GROUP) -> int:
    """Register every adapter advertised in the entry-point ``group``; return how many were added.

    An entry point that fails to load or does not give an adapter is skipped with a
    :class:`MaskpatchWarning` naming it, so one broken plugin does not take the others down.
    """
    added = 0
    for entry_point in importlib.metadata.entry_points(group=group):
        try:
            loaded = entry_point.load()
            adapter = loaded() if isinstance(loaded, type) else loaded
            with _LOCK:
                if getattr(adapter, "name", None) in _ADAPTERS:
                    continue
            register_adapter(adapter)
        except Exception as exc:  # noqa: BLE001 - a plugin's bug must not break maskpatch for every model
            warnings.warn(
                f"skipping the maskpatch adapter entry point {entry_point.name!r} ({entry_point.value}): {exc}",
                MaskpatchWarning,
                stacklevel=2,
            )
            continue
        added += 1
    return added


def _load_entry_points_once() -> None:
    global _entry_points_loaded
    with _ENTRY_POINTS_LOCK:
        if not _entry_points_loaded:
            load_entry_points()
            _entry_points_loaded = True


def find_adapter(model: object) -> Adapter:
    """Return the first registered adapter that matches ``model``; raise if none does."""
    for adapter in registered_adapters():
        if adapter.matches(model):
            return adapter
    names = ", ".join(a.name for a in registered_adapters()) or "none"
    raise UnsupportedModelError(
        f"no maskpatch adapter handles an object of type {type(model).__module__}.{type(model).__qualname__}; "
        f"registered adapters: {names}"
    )


def get_adapter(name: str) -> Adapter:
    """Return the registered adapter called ``name``; raise :class:`UnknownAdapterError` (a ``KeyError``) if none is."""
    for adapter in registered_adapters():
        if adapter.name == name:
            return adapter
    known = ", ".join(a.name for a in registered_adapters()) or "none"
    raise UnknownAdapterError(f"no adapter named {name!r} is registered; registered adapters: {known}")


def installed_adapter(record: InstallRecord) -> Adapter:
    """Return the adapter that made ``record``'s install: the object that planned it, or (a copy) the registered one."""
    owner: Adapter | None = record.owner  # set by apply to the adapter object it planned with
    return owner if owner is not None else get_adapter(record.adapter)


def check_requirements(adapter: Adapter) -> None:
    """Raise one :class:`UnsupportedVersionError` naming every library of ``adapter`` out of range or missing."""
    problems = [_problem(dist, spec, required=True) for dist, spec in adapter.requires.items()]
    problems += [_problem(dist, spec, required=False) for dist, spec in adapter.optional.items()]
    found = [p for p in problems if p]
    if found:
        raise UnsupportedVersionError(
            f"the {adapter.name!r} adapter needs " + "; ".join(found) + ". Pass check_versions=False to "
            "maskpatch.apply to try it anyway"
        )


def _problem(dist: str, spec: str, *, required: bool) -> str:
    found = installed_version(dist)
    if found is None:
        return f"{dist}{spec}, but {dist} is not installed" if required else ""
    if not in_range(found, spec):
        return f"{dist}{spec}, but found {dist}=={found}"
    return ""
