"""Start maskpatch's auto-enable at interpreter start, without importing maskpatch or torch.

Two things call :func:`start`: the one line of ``maskpatch_auto.pth`` (only when
``MASKPATCH_AUTO`` is in the environment) and the ``sitecustomize`` that ``maskpatch run`` puts
first on ``PYTHONPATH``. It reads the environment with :mod:`maskpatch.constants` (loaded on its
own, standard library only) and, when auto-enable is on, registers post-import hooks on
sentence-transformers and peft; :mod:`maskpatch.autoenable` is imported only when one of them is.

:func:`start` never raises: an exception here would be printed by ``site`` for every Python
process in the environment. A bad value gives one warning and no patching.
"""

from __future__ import annotations

import os
import sys
from types import ModuleType
from typing import Any

__all__ = ["start"]

_started = False
_enabled = False
_settings: Any = None  # the AutoSettings read at start; Any: its class is loaded on its own


def start() -> None:
    """Read the environment once and register the post-import hooks it asks for; never raises."""
    global _started
    if _started:
        return
    _started = True
    try:
        _start()
    except Exception as exc:  # noqa: BLE001 - start-up must go on whatever happens here
        _warn(f"maskpatch: auto-enable could not start ({type(exc).__name__}: {exc}); no model will be patched.")


def _start() -> None:
    global _settings
    constants = _load_constants()
    settings = constants.read_settings(os.environ)
    _settings = settings
    if settings.problems:
        _warn(settings.describe_problems())
        if not settings.strict:
            return
    elif not settings.enabled:
        return
    from wrapt import register_post_import_hook

    for name in constants.INSTRUMENTED_MODULES:
        register_post_import_hook(_on_import, name)


def _on_import(module: ModuleType) -> None:
    """Post-import hook: turn on :mod:`maskpatch.autoenable` with the settings read at start."""
    settings = _settings
    if settings.problems:
        # Only reached under MASKPATCH_STRICT: fail the import instead of running unpatched.
        from maskpatch.errors import PolicyError

        raise PolicyError(f"{settings.describe_problems()} (raised because MASKPATCH_STRICT is on)")
    global _enabled
    try:
        from maskpatch import autoenable

        if not _enabled:
            # Once only: a later library import must not undo an autoenable.disable() in between.
            _enabled = True
            autoenable.enable(
                policy=settings.policy, strict=settings.strict, disabled_adapters=settings.disabled_adapters
            )
        autoenable.instrument_module(module)
    except Exception as exc:
        if settings.strict:
            raise
        _warn(f"maskpatch: auto-enable failed when {module.__name__} was imported ({type(exc).__name__}: {exc}).")


def _load_constants() -> ModuleType:
    """Load ``maskpatch/constants.py`` on its own: importing the package would import torch."""
    loaded = sys.modules.get("maskpatch.constants")
    if loaded is not None:
        return loaded
    from importlib.util import find_spec, module_from_spec, spec_from_file_location

    package = find_spec("maskpatch")
    if package is None or not package.submodule_search_locations:
        raise ImportError("maskpatch is not installed in this interpreter")
    path = os.path.join(list(package.submodule_search_locations)[0], "constants.py")
    spec = spec_from_file_location("_maskpatch_constants", path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {path}")
    module = module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses looks its module up there
    spec.loader.exec_module(module)
    return module


def _warn(message: str) -> None:
    """Emit ``message`` once as a UserWarning; write it to stderr if warnings are errors (-W error)."""
    import warnings

    try:
        warnings.warn_explicit(message, UserWarning, filename="<maskpatch auto-enable>", lineno=0)
    except Exception:  # noqa: BLE001 - e.g. -W error turns the warning into an exception
        sys.stderr.write(message + "\n")
