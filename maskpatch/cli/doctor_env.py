"""``maskpatch doctor --env``: the installed versions, whether this combination is a tested row, and
the known upstream problems of that combination.

Reads package metadata only: imports neither torch's model libraries nor sentence-transformers,
so it also works where an import of them would fail. Exit status: 0 when every library is in its
supported range, 1 when one is not.
"""

from __future__ import annotations

import argparse
import json
import platform
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

from ..compat.matrix import KNOWN_PROBLEMS, LIBRARIES, ROWS
from ..compat.versions import SUPPORTED, in_range, installed_version, out_of_range

__all__ = ["EnvReport", "environment_report", "format_env_report", "main"]


@dataclass
class EnvReport:
    """What ``maskpatch doctor --env`` found."""

    python: str
    maskpatch: str
    versions: dict[str, str | None]
    out_of_range: list[str]
    row: str | None
    row_tested_by: str | None
    known_problems: list[str] = field(default_factory=list)

    @property
    def supported(self) -> bool:
        return not self.out_of_range


def environment_report() -> EnvReport:
    """Collect the :class:`EnvReport` of this environment."""
    from .. import __version__

    found = {dist: installed_version(dist) for dist in ("torch", *LIBRARIES)}
    row = next(
        (r for r in ROWS if r.pins and all(found.get(d) == v for d, v in r.pins.items())),
        None,
    )
    problems = [
        f"{p.dist} {p.spec}: {p.text}"
        for p in KNOWN_PROBLEMS
        if found.get(p.dist) is not None and in_range(found[p.dist], p.spec)  # type: ignore[arg-type]
    ]
    return EnvReport(
        python=platform.python_version(),
        maskpatch=__version__,
        versions=found,
        out_of_range=out_of_range(SUPPORTED),
        row=row.name if row else None,
        row_tested_by=row.where if row else None,
        known_problems=problems,
    )


def format_env_report(report: EnvReport) -> str:
    """Return ``report`` as the text ``maskpatch doctor --env`` prints."""
    lines = [f"maskpatch {report.maskpatch} on Python {report.python}", ""]
    for dist, version in report.versions.items():
        state = (
            "not installed"
            if version is None
            else (
                f"supported ({dist}{SUPPORTED[dist]})"
                if in_range(version, SUPPORTED[dist])
                else f"OUT OF RANGE (supported: {dist}{SUPPORTED[dist]})"
            )
        )
        lines.append(f"  {dist:<22} {version or '-':<14} {state}")
    lines.append("")
    if report.row:
        lines.append(f"tested row: {report.row} ({report.row_tested_by}); see docs/compatibility.md")
    else:
        lines.append("not a tested row (see docs/compatibility.md for the rows and `bash scripts/compat.sh --list`)")
    for problem in report.out_of_range:
        lines.append(f"out of range: {problem}")
    lines.append("")
    lines.append(
        "known upstream problems of this combination:" if report.known_problems else "no known upstream problems"
    )
    lines.extend(f"  - {text}" for text in report.known_problems)
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Print the environment report; return 0 when every library is in range, 1 otherwise."""
    parser = argparse.ArgumentParser(prog="maskpatch doctor --env", description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args(argv)
    report = environment_report()
    print(
        json.dumps({**asdict(report), "supported": report.supported}, indent=2)
        if args.json
        else format_env_report(report)
    )
    return 0 if report.supported else 1
