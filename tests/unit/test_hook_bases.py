"""Every hook maskpatch defines derives from the typed base that says how torch calls it.

Invariant protected: each :class:`~maskpatch.hooks.MaskpatchHook` subclass in ``maskpatch/`` (and
so every hook a built-in adapter plans, checked over the registry in test_adapter_contract.py) is
exactly one of :class:`~maskpatch.hooks.ForwardPreHook` or :class:`~maskpatch.hooks.ForwardHook`,
its ``pre`` is that base's (``InstallRecord.register`` reads ``pre`` to pick torch's pre-hook or
forward-hook registry), and its ``__call__`` takes the arguments torch passes to that kind:
``(module, args, kwargs)`` before ``forward``, ``(module, args, kwargs, output)`` after it. A hook
that declared the wrong kind would be registered where torch calls it with the wrong arguments.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import pytest

import maskpatch
from maskpatch.hooks import ForwardHook, ForwardPreHook, MaskpatchHook

#: The arguments torch passes a hook registered with ``with_kwargs=True``, by kind.
CALL_PARAMETERS = {
    ForwardPreHook: ["module", "args", "kwargs"],
    ForwardHook: ["module", "args", "kwargs", "output"],
}


def _maskpatch_hook_classes() -> list[type[MaskpatchHook]]:
    """Every MaskpatchHook subclass defined in maskpatch/, after importing each of its modules."""
    for info in pkgutil.walk_packages(maskpatch.__path__, "maskpatch."):
        if not info.name.endswith(".__main__"):  # `python -m maskpatch.cli` runs the command line
            importlib.import_module(info.name)
    found: set[type[MaskpatchHook]] = set()
    todo = [MaskpatchHook]
    while todo:
        for sub in todo.pop().__subclasses__():
            todo.append(sub)
            if sub.__module__.startswith("maskpatch.") and sub not in CALL_PARAMETERS:
                found.add(sub)
    return sorted(found, key=lambda cls: f"{cls.__module__}.{cls.__qualname__}")


HOOK_CLASSES = _maskpatch_hook_classes()


def test_the_walk_finds_the_hooks_of_every_family():
    """The walk over maskpatch/ sees hooks of each family, so the test below checks something."""
    modules = {cls.__module__ for cls in HOOK_CLASSES}
    assert {
        "maskpatch.hooks",
        "maskpatch.limits",
        "maskpatch.adapters.peft.hooks",
        "maskpatch.adapters.sentence_transformers.transformer",
        "maskpatch.adapters.sentence_transformers.pooling",
        "maskpatch.adapters.sentence_transformers.consumers",
        "maskpatch.adapters.x_transformers",
        "maskpatch.adapters.generic",
        "maskpatch.adapters.key_padding",
        "maskpatch.adapters.hosts",
    } <= modules


@pytest.mark.parametrize("cls", HOOK_CLASSES, ids=[cls.__qualname__ for cls in HOOK_CLASSES])
def test_every_maskpatch_hook_derives_from_the_typed_base_of_its_kind(cls):
    """The class is a ForwardPreHook or a ForwardHook (not both), with that base's ``pre`` and call signature."""
    bases = [base for base in CALL_PARAMETERS if issubclass(cls, base)]
    assert len(bases) == 1, f"{cls.__module__}.{cls.__qualname__} derives from {bases or 'MaskpatchHook alone'}"
    (base,) = bases
    assert cls.pre is base.pre, f"{cls.__qualname__}.pre is {cls.pre}, but it is a {base.__name__}"
    assert "pre" not in vars(cls), f"{cls.__qualname__} sets pre itself; its base says which kind it is"
    parameters = list(inspect.signature(cls.__call__).parameters)[1:]  # without self
    assert parameters == CALL_PARAMETERS[base], f"{cls.__qualname__}.__call__{parameters} as a {base.__name__}"
