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

from torch import nn

from .compat.versions import in_range, installed_version
from .errors import MaskpatchError, MaskpatchWarning, UnsupportedModelError, UnsupportedVersionError
from .handle import HookSpec
from .hooks import InstallRecord

__all__ = [
    "ENTRY_POINT_GROUP",
    "Adapter",
    "check_requirements",
    "find_adapter",
    "load_entry_points",
    "register_adapter",
    "registered_adapters",
    "unregister_adapter",
]

ENTRY_POINT_GROUP = "maskpatch.adapters"


@runtime_checkable
class Adapter(Protocol):
    """What a model-family adapter provides (see the module docstring)."""

    name: str
    #: distribution name -> PEP 440 specifier; each must be installed and in range.
    requires: Mapping[str, str]
    #: distribution name -> specifier, checked only when that distribution is installed.
    optional: Mapping[str, str]

    def matches(self, model: object) -> bool:
        """Return whether this adapter handles ``model``; must not import anything."""
        ...

    def plan(self, model: nn.Module, record: InstallRecord) -> list[HookSpec]:
        """Return the hooks to register on ``model``; must not change it. Raises on bad input."""
        ...


_ADAPTERS: dict[str, Adapter] = {}
_LOCK = threading.Lock()
_entry_points_loaded = False
_ENTRY_POINTS_LOCK = threading.Lock()


def register_adapter(adapter: Adapter, *, replace: bool = False) -> None:
    """Add ``adapter`` to the registry; a second one of the same name needs ``replace=True``."""
    if not isinstance(adapter, Adapter):
        raise TypeError(f"expected an object with name, requires, optional, matches and plan, but got {adapter!r}")
    with _LOCK:
        if adapter.name in _ADAPTERS and not replace:
            raise MaskpatchError(f"an adapter named {adapter.name!r} is already registered; pass replace=True")
        _ADAPTERS[adapter.name] = adapter


def unregister_adapter(name: str) -> Adapter:
    """Remove and return the adapter called ``name``; KeyError if there is none."""
    with _LOCK:
        return _ADAPTERS.pop(name)


def registered_adapters() -> tuple[Adapter, ...]:
    """Return the registered adapters, in the order ``find_adapter`` tries them."""
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
        except Exception as exc:  # a plugin's bug must not break maskpatch for every model
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
