"""The supported version ranges, as data, and the one check of them.

maskpatch supports every release of the last two years of the libraries it patches. The ranges
below are the ones ``pyproject.toml``'s extras declare (a test keeps them equal), so installing
maskpatch never moves a supported stack. :func:`check_environment` runs before anything
version-specific of those libraries is imported and names *every* library out of range in one
:class:`~maskpatch.errors.UnsupportedVersionError`.
"""

from __future__ import annotations

import importlib.metadata
import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from packaging.specifiers import SpecifierSet
from packaging.version import InvalidVersion, Version

from ..errors import UnsupportedVersionError

__all__ = [
    "IMPORT_NAMES",
    "PAIR_RULES",
    "SUPPORTED",
    "PairRule",
    "check_environment",
    "in_range",
    "installed_version",
    "out_of_range",
]

#: distribution -> the versions maskpatch supports (PEP 440).
SUPPORTED: Mapping[str, str] = {
    "torch": ">=2.4",
    "transformers": ">=4.46,<6",
    "sentence-transformers": ">=3.0,<7",
    "peft": ">=0.13,<0.22",
}

#: distribution -> its top-level import name: a library is checked once it has been imported.
IMPORT_NAMES: Mapping[str, str] = {
    "torch": "torch",
    "transformers": "transformers",
    "sentence-transformers": "sentence_transformers",
    "peft": "peft",
}


@dataclass(frozen=True)
class PairRule:
    """When ``dist`` is in ``when``, ``other`` must be in ``needs`` (``why`` says whose rule it is)."""

    dist: str
    when: str
    other: str
    needs: str
    why: str


#: Constraints between two libraries that neither one's package metadata enforces.
PAIR_RULES: tuple[PairRule, ...] = (
    PairRule(
        "transformers",
        ">=5",
        "torch",
        ">=2.6",
        "transformers 5 disables PyTorch older than 2.6 (it then has no models)",
    ),
)

VersionLookup = Callable[[str], "str | None"]


def installed_version(dist: str) -> str | None:
    """Return the installed version of distribution ``dist``, or None when it is not installed."""
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def in_range(version: str, spec: str) -> bool:
    """Return whether ``version`` satisfies ``spec`` (pre-releases and local labels such as ``+cpu`` count)."""
    try:
        parsed = Version(version)
    except InvalidVersion:
        return False
    return SpecifierSet(spec).contains(Version(parsed.public), prereleases=True)


def out_of_range(dists: Iterable[str], *, lookup: VersionLookup | None = None) -> list[str]:
    """Return one sentence per problem among ``dists`` (not installed libraries are skipped).

    ``lookup`` maps a distribution to its version (default: :func:`installed_version`).
    """
    lookup = installed_version if lookup is None else lookup
    wanted = list(dict.fromkeys(dists))
    found = {dist: lookup(dist) for dist in set(wanted) | {r.other for r in PAIR_RULES}}
    problems = [
        f"{dist}=={found[dist]} (supported: {dist}{SUPPORTED[dist]})"
        for dist in wanted
        if found[dist] is not None and dist in SUPPORTED and not in_range(found[dist], SUPPORTED[dist])  # type: ignore[arg-type]
    ]
    for rule in PAIR_RULES:
        mine, other = found.get(rule.dist), found.get(rule.other)
        if rule.dist in wanted and mine and other and in_range(mine, rule.when) and not in_range(other, rule.needs):
            problems.append(
                f"{rule.other}=={other} with {rule.dist}=={mine} (needs {rule.other}{rule.needs}: {rule.why})"
            )
    return problems


def check_environment(*, lookup: VersionLookup | None = None, modules: Mapping[str, object] | None = None) -> None:
    """Raise one :class:`UnsupportedVersionError` naming every imported library out of its supported range.

    Only libraries already imported (in ``sys.modules``) are checked: a model can only come from
    those, and an old copy installed but unused must not block ``apply``. Imports nothing.
    """
    modules = sys.modules if modules is None else modules
    imported = [dist for dist, name in IMPORT_NAMES.items() if name in modules]
    problems = out_of_range(imported, lookup=lookup)
    if problems:
        raise UnsupportedVersionError(
            "maskpatch supports "
            + ", ".join(f"{d}{s}" for d, s in SUPPORTED.items())
            + "; out of range here: "
            + "; ".join(problems)
            + ". Pass check_versions=False to maskpatch.apply to try it anyway"
        )
