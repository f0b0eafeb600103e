"""The environment variables of process-wide auto-enable, and how their values are read.

Each constant below is the name of one variable (the constant and the variable are spelled the
same). Child processes inherit the environment, so one setting covers a whole process tree:
``torchrun`` workers, sentence-transformers' multi-process encoding pool, DataLoader workers.

This module imports nothing but the standard library and nothing else of maskpatch: the start-up
bootstrap (:mod:`maskpatch.auto.bootstrap`, run by the ``maskpatch_auto.pth`` line and by
``maskpatch run``) imports it at interpreter start, without importing torch.
"""

from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:  # imports cost time at interpreter start; only type checkers need this one
    from collections.abc import Mapping

__all__ = [
    "AUDIT_VALUE",
    "FALSE_VALUES",
    "INSTRUMENTED_MODULES",
    "MASKPATCH_AUTO",
    "MASKPATCH_DISABLED_ADAPTERS",
    "MASKPATCH_POLICY",
    "MASKPATCH_STRICT",
    "POLICY_VALUES",
    "TRUE_VALUES",
    "AutoSettings",
    "parse_adapter_list",
    "read_settings",
]

MASKPATCH_AUTO = "MASKPATCH_AUTO"
"""Turns auto-enable on: ``1``, ``true``, ``yes`` or ``on`` (any case). ``0``, ``false``, ``no``,
``off`` or empty leave it off; ``audit`` (:data:`AUDIT_VALUE`) audits every model instead of
patching it (nothing changes, drift is reported); any other value warns once and patches nothing."""

AUDIT_VALUE = "audit"
"""The :data:`MASKPATCH_AUTO` value that turns on audit mode for the whole process (any case)."""

MASKPATCH_POLICY = "MASKPATCH_POLICY"
"""The repair policy of every auto-enabled install: ``extend`` (the default when unset or empty),
``ignore`` or ``strip`` (any case)."""

MASKPATCH_STRICT = "MASKPATCH_STRICT"
"""``1`` (or ``true``/``yes``/``on``) turns auto-enable problems into errors instead of warnings;
see ``docs/auto-enable.md`` for exactly which problems and where each is raised."""

MASKPATCH_DISABLED_ADAPTERS = "MASKPATCH_DISABLED_ADAPTERS"
"""A comma-separated list of maskpatch adapter names (registry names, e.g.
``sentence-transformers``) whose models auto-enable leaves alone. Spaces and empty items are
ignored; a name no registered adapter has is a bad value."""

TRUE_VALUES = frozenset({"1", "true", "yes", "on"})
"""Spellings of "on" for the boolean variables (compared after ``strip().lower()``)."""

FALSE_VALUES = frozenset({"", "0", "false", "no", "off"})
"""Spellings of "off" for the boolean variables (compared after ``strip().lower()``)."""

POLICY_VALUES = ("extend", "ignore", "strip")
"""The values ``MASKPATCH_POLICY`` accepts; the same as :data:`maskpatch.POLICIES`."""

INSTRUMENTED_MODULES = ("sentence_transformers", "peft")
"""The libraries whose import triggers auto-enable (through post-import hooks)."""


class AutoSettings:
    """What the environment asks of auto-enable, read by :func:`read_settings` (immutable).

    ``audit`` is true for ``MASKPATCH_AUTO=audit``: models are audited, never patched (``policy``
    is then unused). ``problems`` lists every bad value, one sentence each. When it is not empty nothing is
    patched (``patching`` is false), whatever the other fields say. A plain class, not a
    dataclass or namedtuple: their imports would cost milliseconds at interpreter start.
    """

    __slots__ = ("enabled", "policy", "strict", "disabled_adapters", "problems", "audit")
    enabled: bool
    policy: str
    strict: bool
    disabled_adapters: frozenset[str]
    problems: tuple[str, ...]
    audit: bool

    def __init__(
        self,
        *,
        enabled: bool = False,
        policy: str = "extend",
        strict: bool = False,
        disabled_adapters: frozenset[str] = frozenset(),
        problems: tuple[str, ...] = (),
        audit: bool = False,
    ) -> None:
        values = (enabled, policy, strict, disabled_adapters, problems, audit)
        for name, value in zip(self.__slots__, values, strict=True):
            object.__setattr__(self, name, value)

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"AutoSettings is immutable; cannot set {name!r}")

    def _fields(self) -> tuple[object, ...]:
        return tuple(getattr(self, name) for name in self.__slots__)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, AutoSettings) and self._fields() == other._fields()

    def __hash__(self) -> int:
        return hash(self._fields())

    def __repr__(self) -> str:
        return "AutoSettings(" + ", ".join(f"{n}={getattr(self, n)!r}" for n in self.__slots__) + ")"

    @property
    def patching(self) -> bool:
        """Whether auto-enable should patch models: enabled, with no bad value."""
        return self.enabled and not self.problems

    def describe_problems(self) -> str:
        """The one warning that reports every bad value (empty when there is none)."""
        if not self.problems:
            return ""
        return (
            "maskpatch: auto-enable is off in this process, no model will be patched: " + "; ".join(self.problems) + "."
        )


def read_settings(environ: Mapping[str, str]) -> AutoSettings:
    """Read the auto-enable variables from ``environ``; never raises on a bad value.

    The refining variables are only read when :data:`MASKPATCH_AUTO` is on. Bad values end up
    in ``AutoSettings.problems`` instead of raising, because this runs at interpreter start.
    """
    audit = environ.get(MASKPATCH_AUTO, "").strip().lower() == AUDIT_VALUE
    enabled, problem = (True, "") if audit else _read_bool(environ, MASKPATCH_AUTO)
    if problem:
        # Under an unreadable switch, honour MASKPATCH_STRICT so strict jobs still fail loudly.
        strict, _ = _read_bool(environ, MASKPATCH_STRICT)
        return AutoSettings(enabled=True, strict=strict, problems=(problem,))
    if not enabled:
        return AutoSettings()
    policy, policy_problem = _read_policy(environ)
    strict, strict_problem = _read_bool(environ, MASKPATCH_STRICT)
    problems = tuple(p for p in (policy_problem, strict_problem) if p)
    return AutoSettings(
        enabled=True,
        policy=policy,
        strict=strict,
        disabled_adapters=parse_adapter_list(environ.get(MASKPATCH_DISABLED_ADAPTERS, "")),
        problems=problems,
        audit=audit,
    )


def parse_adapter_list(value: str) -> frozenset[str]:
    """Split a comma-separated list of adapter names, dropping spaces around names and empty items."""
    return frozenset(name.strip() for name in value.split(",") if name.strip())


def _read_bool(environ: Mapping[str, str], name: str) -> tuple[bool, str]:
    raw = environ.get(name)
    if raw is None:
        return False, ""
    value = raw.strip().lower()
    if value in TRUE_VALUES:
        return True, ""
    if value in FALSE_VALUES:
        return False, ""
    extra = f" or {AUDIT_VALUE!r}" if name == MASKPATCH_AUTO else ""
    return False, f"{name}={_shorten(raw)} is not a boolean (expected one of 1/0, true/false, yes/no, on/off{extra})"


def _read_policy(environ: Mapping[str, str]) -> tuple[str, str]:
    raw = environ.get(MASKPATCH_POLICY, "")
    value = raw.strip().lower() or "extend"
    if value in POLICY_VALUES:
        return value, ""
    choices = ", ".join(repr(p) for p in POLICY_VALUES)
    return "extend", f"{MASKPATCH_POLICY}={_shorten(raw)} is not a policy (expected one of {choices})"


#: The most characters of a bad value quoted in the start-up warning (every interpreter prints it).
MAX_QUOTED = 60


def _shorten(raw: str) -> str:
    """``repr(raw)``, cut to :data:`MAX_QUOTED` characters with the full length named when longer."""
    if len(raw) <= MAX_QUOTED:
        return repr(raw)
    return f"{raw[:MAX_QUOTED]!r}... ({len(raw)} characters)"
