"""The tested rows of the version matrix and the known upstream problems, as plain data.

``scripts/compat.sh`` reads :data:`ROWS` (it loads this file with ``runpy``, so it imports the
standard library only) and ``maskpatch doctor --env`` matches the installed versions against it.
``docs/compatibility.md`` holds the last results of each row.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["KNOWN_PROBLEMS", "ROWS", "KnownProblem", "Row"]

LIBRARIES = ("transformers", "sentence-transformers", "peft")


@dataclass(frozen=True)
class Row:
    """One tested combination; ``pins`` maps each library to its version (empty: the newest releases)."""

    name: str
    pins: dict[str, str]
    where: str

    def requirements(self) -> list[str]:
        """The pip requirements of the row (torch is always 2.13.0, the CPU build)."""
        return ["torch==2.13.0"] + [f"{d}=={self.pins[d]}" if d in self.pins else d for d in LIBRARIES]


#: Rows, oldest first. ``where``: who runs it (CI runs pins, oldest and newest on every run).
ROWS: tuple[Row, ...] = (
    Row("oldest", {"transformers": "4.46.3", "sentence-transformers": "3.0.1", "peft": "0.13.2"}, "CI, compat subset"),
    Row("st33", {"transformers": "4.46.3", "sentence-transformers": "3.3.1", "peft": "0.13.2"}, "scripts/compat.sh"),
    Row("st4", {"transformers": "4.51.3", "sentence-transformers": "4.1.0", "peft": "0.15.2"}, "scripts/compat.sh"),
    Row("peft017", {"transformers": "4.55.4", "sentence-transformers": "5.1.2", "peft": "0.17.1"}, "scripts/compat.sh"),
    Row("st57", {"transformers": "4.57.6", "sentence-transformers": "5.7.0", "peft": "0.18.1"}, "scripts/compat.sh"),
    Row("st61", {"transformers": "5.23.0", "sentence-transformers": "6.1.0", "peft": "0.21.2"}, "scripts/compat.sh"),
    Row(
        "pins",
        {"transformers": "5.23.0", "sentence-transformers": "6.2.0", "peft": "0.21.2"},
        "CI, whole suite (constraints/ci.txt)",
    ),
    Row("newest", {}, "CI, whole suite (newest releases, resolved at run time)"),
)


@dataclass(frozen=True)
class KnownProblem:
    """An upstream behaviour of ``dist`` releases in ``spec`` that matters to prompt learning."""

    dist: str
    spec: str
    text: str


KNOWN_PROBLEMS: tuple[KnownProblem, ...] = (
    KnownProblem(
        "sentence-transformers",
        "<3.3",
        "unpatched, Pooling crashes on a prompt-learning model (mask N columns, token embeddings N + M); "
        "maskpatch repairs the features before Pooling, under every policy",
    ),
    KnownProblem(
        "sentence-transformers",
        ">=3.3,<6.2",
        "sentence-transformers extends the mask inline (ones: extend only), also for prefix tuning and "
        "Cartridge and inside disable_adapter() (padding pooled), and writes it into the caller's features "
        "dict (forwarding it twice crashes); maskpatch measures drift against the caller's mask and repairs all of these",
    ),
    KnownProblem(
        "sentence-transformers",
        ">=6.2",
        "unpatched, Pooling silently falls back to an all-ones mask when its length differs: prompt-learning "
        "embeddings pool the padding and depend on the batch; maskpatch repairs it",
    ),
    KnownProblem(
        "sentence-transformers",
        "<6.2",
        "Pooling 'weightedmean' weighs tokens by column index, padding included: left padding is batch "
        "variant upstream, with or without maskpatch; under 'ignore' maskpatch hands Pooling the real "
        "columns only, so the M masked virtual columns shift nothing",
    ),
    KnownProblem(
        "peft",
        "<0.18",
        "peft keeps no _adapters_disabled flag; maskpatch reads a disabled prompt-learning adapter from the "
        "forward that disable_adapter() swaps in",
    ),
    KnownProblem(
        "peft",
        "<0.22",
        "disable_adapter() crashes for prompt learning on a base model without prepare_inputs_for_generation "
        "(every encoder); maskpatch makes it work on the models it patches",
    ),
    KnownProblem(
        "transformers",
        ">=5.24",
        "generate's cache keyword is renamed from past_key_values to cache; peft up to 0.21.2 reads the old "
        "name in prepare_inputs_for_generation, so unpatched generate with prompt learning or prefix tuning "
        "re-prepends the prompt (or replaces the cache) at every step; maskpatch hands peft the cache under its "
        "name on the models it patches (maskpatch.adapters.peft_generation)",
    ),
)
