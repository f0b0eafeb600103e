"""The adapter registry: plain data, entry points, version checks, and one contract for every adapter."""

from __future__ import annotations

import contextlib
import importlib.metadata
import re
import subprocess
import sys
import textwrap

import pytest
from packaging.specifiers import SpecifierSet
from torch import nn

import maskpatch
from maskpatch import (
    AdapterExistsError,
    InvalidAdapterError,
    MaskpatchError,
    UnknownAdapterError,
    UnsupportedModelError,
    UnsupportedVersionError,
    register_adapter,
    registered_adapters,
    unregister_adapter,
)
from maskpatch.handle import HookSpec
from maskpatch.hooks import InstallRecord
from maskpatch.registry import check_requirements, find_adapter, load_entry_points


class Marked(nn.Module):
    """A module only the test adapters below match."""

    def forward(self, x):
        return x


class FakeAdapter:
    """A minimal adapter: matches Marked modules, plans nothing."""

    def __init__(self, name: str = "fake", requires=None, optional=None, match: type = Marked) -> None:
        self.name = name
        self.requires = requires or {}
        self.optional = optional or {}
        self._match = match

    def matches(self, model: object) -> bool:
        return isinstance(model, self._match)

    def plan(self, model: nn.Module, record: InstallRecord) -> list[HookSpec]:
        return []


@pytest.fixture
def scratch_names():
    """Names registered by a test; unregistered afterwards so the registry is as it was."""
    names: list[str] = []
    yield names
    for name in names:
        with contextlib.suppress(UnknownAdapterError):
            unregister_adapter(name)


# --- the registry as data -------------------------------------------------------------------


def test_register_then_unregister_restores_the_registry(scratch_names):
    """register_adapter appends in order; unregister_adapter returns the adapter and removes it."""
    before = registered_adapters()
    adapter = FakeAdapter("fake-a")
    register_adapter(adapter)
    scratch_names.append("fake-a")
    assert registered_adapters() == (*before, adapter)
    assert unregister_adapter("fake-a") is adapter
    assert registered_adapters() == before


def test_registering_a_name_twice_needs_replace(scratch_names):
    """A second adapter of the same name raises AdapterExistsError (a MaskpatchError and a ValueError)
    unless replace=True, which swaps it in place; the refused one is not registered."""
    first, second = FakeAdapter("fake-b"), FakeAdapter("fake-b")
    register_adapter(first)
    scratch_names.append("fake-b")
    with pytest.raises(AdapterExistsError, match="an adapter named 'fake-b' is already registered") as info:
        register_adapter(second)
    assert isinstance(info.value, MaskpatchError) and isinstance(info.value, ValueError)
    assert [a for a in registered_adapters() if a.name == "fake-b"] == [first]
    register_adapter(second, replace=True)
    assert [a for a in registered_adapters() if a.name == "fake-b"] == [second]


def test_register_refuses_objects_that_are_not_adapters():
    """An object without name/requires/optional/matches/plan raises InvalidAdapterError (a MaskpatchError
    and a TypeError) naming what is missing, and nothing is registered."""
    before = registered_adapters()
    with pytest.raises(InvalidAdapterError, match=r"expected an adapter with name.*missing: name, requires") as info:
        register_adapter(object())  # type: ignore[arg-type]
    assert isinstance(info.value, MaskpatchError) and isinstance(info.value, TypeError)
    assert registered_adapters() == before


@pytest.mark.parametrize(
    ("field", "value", "expected"),
    [
        ("name", "", "a non-empty str"),
        ("name", 3, "a non-empty str"),
        ("requires", ["torch>=2"], "'fake-bad'.requires to be a mapping"),
        ("optional", None, "'fake-bad'.optional to be a mapping"),
        ("plan", "not callable", "'fake-bad'.plan to be callable"),
    ],
)
def test_register_refuses_adapters_with_malformed_members(field, value, expected):
    """Members of the wrong kind are refused with InvalidAdapterError before the registry changes."""
    before = registered_adapters()
    adapter = FakeAdapter("fake-bad")
    setattr(adapter, field, value)
    with pytest.raises(InvalidAdapterError, match=re.escape(expected)):
        register_adapter(adapter)
    assert registered_adapters() == before


def test_unregister_unknown_name_is_an_unknown_adapter_error():
    """Unregistering a name that is not registered raises UnknownAdapterError (a MaskpatchError and a
    KeyError) whose message is a sentence naming the registered adapters."""
    with pytest.raises(UnknownAdapterError) as info:
        unregister_adapter("no-such-adapter")
    assert isinstance(info.value, MaskpatchError) and isinstance(info.value, KeyError)
    message = str(info.value)
    assert message.startswith("no adapter named 'no-such-adapter' is registered; registered adapters: ")
    assert all(a.name in message for a in registered_adapters())


def test_find_adapter_returns_the_first_match_in_registration_order(scratch_names):
    """find_adapter tries adapters in order and returns the first whose matches() is true."""
    first, second = FakeAdapter("fake-first"), FakeAdapter("fake-second")
    register_adapter(first)
    register_adapter(second)
    scratch_names.extend(["fake-first", "fake-second"])
    assert find_adapter(Marked()) is first


def test_find_adapter_without_match_names_the_type_and_the_adapters():
    """No matching adapter raises UnsupportedModelError (a TypeError) naming the type and the registry."""
    with pytest.raises(UnsupportedModelError) as info:
        find_adapter(nn.Linear(2, 2))
    message = str(info.value)
    assert "torch.nn.modules.linear.Linear" in message
    assert all(a.name in message for a in registered_adapters())
    assert isinstance(info.value, TypeError)


# --- entry points ---------------------------------------------------------------------------


class _EntryPoint:
    name = "fake"
    value = "fake_plugin:adapter"

    def __init__(self, target: object) -> None:
        self._target = target

    def load(self) -> object:
        return self._target


def test_load_entry_points_registers_objects_and_classes_and_counts_them(monkeypatch, scratch_names):
    """Entry points naming an adapter object or a class are registered; the count of new ones is returned."""

    class ThirdParty(FakeAdapter):
        def __init__(self) -> None:
            super().__init__("third-party-class")

    instance = FakeAdapter("third-party-object")
    seen_groups = []

    def entry_points(*, group):
        seen_groups.append(group)
        return [_EntryPoint(instance), _EntryPoint(ThirdParty)]

    monkeypatch.setattr(importlib.metadata, "entry_points", entry_points)
    scratch_names.extend(["third-party-object", "third-party-class"])
    assert load_entry_points() == 2
    assert seen_groups == ["maskpatch.adapters"]
    names = [a.name for a in registered_adapters()]
    assert "third-party-object" in names and "third-party-class" in names
    # A second load finds both registered already and adds nothing.
    assert load_entry_points() == 0


class _BrokenEntryPoint(_EntryPoint):
    def load(self) -> object:
        raise ImportError("No module named 'fake_plugin'")


def test_a_broken_entry_point_is_skipped_with_a_warning_and_the_others_still_load(monkeypatch, scratch_names):
    """One plugin that fails to import, or is not an adapter, warns by name; the good one is registered."""
    good = FakeAdapter("third-party-good")
    monkeypatch.setattr(
        importlib.metadata,
        "entry_points",
        lambda *, group: [_BrokenEntryPoint(None), _EntryPoint(object()), _EntryPoint(good)],
    )
    scratch_names.append("third-party-good")
    with pytest.warns(maskpatch.MaskpatchWarning, match="fake_plugin") as caught:
        assert load_entry_points() == 1
    assert len(caught) == 2
    assert "third-party-good" in [a.name for a in registered_adapters()]


# --- version requirements -------------------------------------------------------------------


def _fake_versions(monkeypatch, versions: dict[str, str]) -> None:
    real = importlib.metadata.version

    def version(dist: str) -> str:
        if dist in versions:
            if versions[dist] == "missing":
                raise importlib.metadata.PackageNotFoundError(dist)
            return versions[dist]
        return real(dist)

    monkeypatch.setattr(importlib.metadata, "version", version)


def test_check_requirements_passes_inside_the_range(monkeypatch):
    """Installed versions inside every required and optional range pass silently."""
    _fake_versions(monkeypatch, {"libx": "1.5", "liby": "0.3"})
    check_requirements(FakeAdapter(requires={"libx": ">=1,<2"}, optional={"liby": ">=0.2"}))


def test_check_requirements_out_of_range_names_dist_range_and_found_version(monkeypatch):
    """A required library outside its range raises UnsupportedVersionError naming all three and the bypass."""
    _fake_versions(monkeypatch, {"libx": "2.0"})
    with pytest.raises(UnsupportedVersionError) as info:
        check_requirements(FakeAdapter("fake-v", requires={"libx": ">=1,<2"}))
    message = str(info.value)
    assert "'fake-v'" in message and "libx>=1,<2" in message and "libx==2.0" in message
    assert "check_versions=False" in message
    assert isinstance(info.value, RuntimeError)


def test_check_requirements_missing_required_library_is_reported(monkeypatch):
    """A required library that is not installed raises UnsupportedVersionError saying so."""
    _fake_versions(monkeypatch, {"libx": "missing"})
    with pytest.raises(UnsupportedVersionError, match="libx is not installed"):
        check_requirements(FakeAdapter(requires={"libx": ">=1"}))


def test_check_requirements_optional_library_is_checked_only_when_installed(monkeypatch):
    """An optional library that is missing is fine; one that is installed but out of range is not."""
    _fake_versions(monkeypatch, {"liby": "missing"})
    check_requirements(FakeAdapter(optional={"liby": ">=1"}))
    _fake_versions(monkeypatch, {"liby": "0.5"})
    with pytest.raises(UnsupportedVersionError, match=r"liby==0\.5"):
        check_requirements(FakeAdapter(optional={"liby": ">=1"}))


# --- the contract every registered adapter keeps --------------------------------------------


# The plan, install/remove and behaviour contract of every adapter: tests/unit/test_adapter_contract.py.

ADAPTERS = registered_adapters()


@pytest.mark.parametrize("adapter", ADAPTERS, ids=[a.name for a in ADAPTERS])
def test_adapter_contract_declares_name_and_valid_version_ranges(adapter):
    """Every adapter has a unique non-empty name and PEP 440 ranges that the tested pins satisfy."""
    assert isinstance(adapter.name, str) and adapter.name
    assert [a.name for a in registered_adapters()].count(adapter.name) == 1
    for ranges in (adapter.requires, adapter.optional):
        for dist, spec in ranges.items():
            assert isinstance(dist, str) and dist
            SpecifierSet(spec)  # raises InvalidSpecifier on a malformed range
    check_requirements(adapter)  # the pinned CI environment is inside every declared range


@pytest.mark.parametrize("adapter", ADAPTERS, ids=[a.name for a in ADAPTERS])
def test_adapter_contract_does_not_match_foreign_objects(adapter):
    """matches() is false for non-modules and for plain torch modules, and never raises."""
    for foreign in (object(), None, "model", nn.Linear(2, 2), nn.Sequential(nn.ReLU())):
        assert adapter.matches(foreign) is False


def test_every_adapter_matches_without_importing_its_library():
    """Asking every registered adapter about a plain module imports neither sentence-transformers,
    peft nor transformers (a fresh interpreter checks it)."""
    code = textwrap.dedent(
        """
        import sys, torch
        import maskpatch
        adapters = maskpatch.registered_adapters()
        assert adapters, "no adapter registered"
        for adapter in adapters:
            assert adapter.matches(torch.nn.Linear(2, 2)) is False, adapter.name
        heavy = sorted(m for m in ("sentence_transformers", "peft", "transformers") if m in sys.modules)
        print("imported:", heavy)
        sys.exit(1 if heavy else 0)
        """
    )
    result = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
