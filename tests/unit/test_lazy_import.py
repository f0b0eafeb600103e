"""``import maskpatch`` is lazy: start-up paths import no torch, public names resolve on first use.

Invariants protected: importing ``maskpatch``, its command line and ``maskpatch run``'s launcher
imports neither torch nor wrapt (so ``maskpatch run -- CMD`` hands over at once); every public name
resolves to the very object its defining module holds; the built-in adapters come first in the
registry even when the registry is used before anything else of maskpatch; the moved tooling
modules are still reachable from their old attribute names, with a DeprecationWarning.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import warnings

import pytest

import maskpatch

HEAVY = ("torch", "wrapt", "transformers", "sentence_transformers", "peft", "numpy")


def _fresh(code: str) -> dict:
    """Run ``code`` in a fresh interpreter (no MASKPATCH_* variables) and return the JSON it prints last."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MASKPATCH_")}
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=env, timeout=240
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


LOADED = f"""
import json, sys
heavy = sorted(m for m in sys.modules if m.split(".")[0] in {HEAVY!r})
ours = sorted(m for m in sys.modules if m.split(".")[0] == "maskpatch")
print(json.dumps({{"heavy": heavy, "maskpatch": ours}}))
"""


def test_import_maskpatch_imports_no_torch():
    """`import maskpatch` loads the package module alone: no torch, wrapt or libraries, no submodule."""
    found = _fresh("import maskpatch\n" + LOADED)
    assert found == {"heavy": [], "maskpatch": ["maskpatch"]}


def test_command_line_and_launcher_import_no_torch():
    """The `maskpatch` console script's module and `maskpatch run`'s launcher, options parsed, import no torch."""
    code = """
    from maskpatch import cli
    from maskpatch.auto import launcher
    cli.build_parser().parse_known_args(["run", "--", "python", "-c", "pass"])
    launcher.build_parser().parse_args(["--policy", "strip", "--", "python", "-c", "pass"])
    launcher.launch_environment({}, policy="strip")
    """
    found = _fresh(textwrap.dedent(code) + LOADED)
    assert found["heavy"] == []
    assert found["maskpatch"] == [
        "maskpatch",
        "maskpatch.auto",
        "maskpatch.auto.constants",
        "maskpatch.auto.launcher",
        "maskpatch.cli",
    ]


def test_every_public_name_resolves_to_its_definition():
    """Each name of maskpatch.__all__ resolves, to the object of the module that defines it; dir() lists them."""
    import importlib

    for name in maskpatch.__all__:
        value = getattr(maskpatch, name)
        if name != "__version__":
            module = importlib.import_module(maskpatch._EXPORTS[name], "maskpatch")
            assert value is getattr(module, name), name
    assert set(maskpatch.__all__) <= set(dir(maskpatch))
    with pytest.raises(AttributeError, match="has no attribute 'no_such_name'"):
        maskpatch.no_such_name  # noqa: B018


def test_builtin_adapters_come_first_when_the_registry_is_used_first():
    """An adapter registered through maskpatch.registry before anything else still comes after the built-ins."""
    code = """
    from maskpatch.registry import register_adapter, registered_adapters

    class Mine:
        name, requires, optional = "mine", {}, {}
        def matches(self, model): return False
        def plan(self, model, record): return []

    register_adapter(Mine())
    import json
    print(json.dumps([a.name for a in registered_adapters()]))
    """
    assert _fresh(code) == [
        "sentence-transformers",
        "peft",
        "x-transformers",
        "pipeline",
        "trainer",
        "prepended-tokens",
        "mine",
    ]


@pytest.mark.parametrize(("old", "new"), [("autoenable", "auto.autoenable"), ("constants", "auto.constants")])
def test_moved_tooling_modules_still_resolve_with_a_deprecation_warning(old, new):
    """maskpatch.autoenable / maskpatch.constants give the moved module and say where it lives now."""
    import importlib

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        module = getattr(maskpatch, old)
    assert module is importlib.import_module(f"maskpatch.{new}")
    assert [w.category for w in caught] == [DeprecationWarning]
    assert f"maskpatch.{new}" in str(caught[0].message)
