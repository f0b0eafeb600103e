"""Start maskpatch's auto-enable at interpreter start, without importing torch, wrapt or maskpatch's core.

Two things call :func:`start`: the one line of ``maskpatch_auto.pth`` (only when
``MASKPATCH_AUTO`` is in the environment) and the ``sitecustomize`` that ``maskpatch run`` puts
first on ``PYTHONPATH``. This module, :mod:`maskpatch.auto.constants` and the packages above them
import the standard library only (``maskpatch/__init__`` loads its public names on first use).
:func:`start` reads the environment with :mod:`maskpatch.auto.constants` and, when auto-enable is
on, puts a small finder first on ``sys.meta_path``. The first time ``sentence_transformers`` or
``peft`` is looked up, that finder takes itself off, registers wrapt post-import hooks
(``wrapt.register_post_import_hook``) on both libraries and hands the lookup to wrapt's finder.
When a library has been imported, its hook imports :mod:`maskpatch.auto.autoenable`, which wraps
the library's model constructors. A process that never imports either library never imports
wrapt, torch or the rest of maskpatch.

:func:`start` never raises: an exception here would be printed by ``site`` for every Python
process in the environment. A bad value gives one warning and no patching.
"""

from __future__ import annotations

import _thread
import os
import sys
from types import ModuleType

from .constants import INSTRUMENTED_MODULES, AutoSettings, read_settings

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing costs an import at start-up; only type checkers need it here
    from importlib.machinery import ModuleSpec
    from typing import Any

__all__ = ["start"]

_started = False
_enabled = False
_settings = AutoSettings()  # replaced by what the environment says when start() runs
_libraries: tuple[str, ...] = ()


def start() -> None:
    """Read the environment once and prepare the post-import hooks it asks for; never raises."""
    global _started
    if _started:
        return
    _started = True
    try:
        _start()
    except Exception as exc:  # noqa: BLE001 - start-up must go on whatever happens here
        _warn(f"maskpatch: auto-enable could not start ({type(exc).__name__}: {exc}); no model will be patched.")


def _start() -> None:
    global _settings, _libraries
    settings = read_settings(os.environ)
    _settings, _libraries = settings, tuple(INSTRUMENTED_MODULES)
    if settings.problems:
        _warn(settings.describe_problems())
        if not settings.strict:
            return
        if not any(name in sys.modules for name in _libraries):
            # Under MASKPATCH_STRICT every import of the libraries fails, the retried ones too.
            _refuse_from_now_on(f"{settings.describe_problems()} (raised because MASKPATCH_STRICT is on)")
            return
    elif not settings.enabled:
        return
    if any(name in sys.modules for name in _libraries):
        _register_hooks()
    else:
        sys.meta_path.insert(0, _FirstLookup())


class _FirstLookup:
    """Meta-path finder that registers the wrapt post-import hooks when a library is first looked up."""

    _lock = _thread.allocate_lock()
    _wrapt_finder: Any = None

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> ModuleSpec | None:
        if fullname not in _libraries:
            return None
        with self._lock:
            if self in sys.meta_path:
                sys.meta_path.remove(self)
                type(self)._wrapt_finder = _register_hooks_safely()
        # wrapt's finder went in while this lookup was already past the start of sys.meta_path:
        # hand the lookup to it, so that this very import runs the hook.
        finder = self._wrapt_finder
        return None if finder is None else finder.find_spec(fullname, path, target)


class _StrictRefusal:
    """Meta-path finder (MASKPATCH_STRICT with a bad value) that fails every import of the libraries.

    It stays on ``sys.meta_path``: an import that is tried again raises again, so a process never
    goes on unpatched after the first failure was caught.
    """

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> ModuleSpec | None:
        if fullname not in _libraries:
            return None
        # A spec whose loader refuses: looking the library up (importlib.util.find_spec, as
        # transformers does to see what is installed) still works; importing it raises.
        from importlib.machinery import ModuleSpec

        return ModuleSpec(fullname, self)  # type: ignore[arg-type]  # a loader by protocol (exec_module)

    def create_module(self, spec: ModuleSpec) -> None:
        return None

    def exec_module(self, module: ModuleType) -> None:
        _refuse()


_refusal = ""  # why the libraries' imports fail under MASKPATCH_STRICT (empty: they do not)


def _refuse_from_now_on(reason: str) -> None:
    """Make every later import of the libraries raise ``reason`` (MASKPATCH_STRICT): strict stays strict."""
    global _refusal
    if not _refusal:
        _refusal = reason
        sys.meta_path.insert(0, _StrictRefusal())


def _refuse() -> None:
    from maskpatch.errors import PolicyError

    raise PolicyError(_refusal or f"{_settings.describe_problems()} (raised because MASKPATCH_STRICT is on)")


def _register_hooks_safely() -> Any:
    """Register the hooks; return wrapt's finder, or None (after one warning) if that failed."""
    try:
        return _register_hooks()
    except Exception as exc:
        if _settings.strict:
            raise
        _warn(f"maskpatch: auto-enable could not start ({type(exc).__name__}: {exc}); no model will be patched.")
        return None


def _register_hooks() -> Any:
    from wrapt.importer import ImportHookFinder, register_post_import_hook

    for name in _libraries:
        register_post_import_hook(_on_import, name)
    return next((f for f in sys.meta_path if isinstance(f, ImportHookFinder)), None)


def _on_import(module: ModuleType) -> None:
    """Post-import hook: turn on :mod:`maskpatch.auto.autoenable` with the settings read at start."""
    settings = _settings
    if settings.problems:
        # Only reached under MASKPATCH_STRICT with a library imported before start: fail loudly.
        _refuse()
    global _enabled
    try:
        from ..drift import validate_policy
        from . import autoenable

        if not _enabled:
            # Once only: a later library import must not undo an autoenable.disable() in between.
            _enabled = True
            autoenable.enable(
                policy=validate_policy(settings.policy),
                strict=settings.strict,
                disabled_adapters=settings.disabled_adapters,
                audit=settings.audit,
            )
        autoenable.instrument_module(module)
    except Exception as exc:
        if settings.strict:
            _refuse_from_now_on(
                f"maskpatch: auto-enable failed when {module.__name__} was imported ({type(exc).__name__}: {exc}); "
                "raised because MASKPATCH_STRICT is on"
            )
            raise
        _warn(f"maskpatch: auto-enable failed when {module.__name__} was imported ({type(exc).__name__}: {exc}).")


def _warn(message: str) -> None:
    """Emit ``message`` once as a UserWarning; write it to stderr if warnings are errors (-W error)."""
    import warnings

    try:
        warnings.warn_explicit(message, UserWarning, filename="<maskpatch auto-enable>", lineno=0)
    except Exception:  # noqa: BLE001 - e.g. -W error turns the warning into an exception
        sys.stderr.write(message + "\n")
