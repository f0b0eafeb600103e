"""Command line: ``maskpatch <command> [options]``.

Each command lives in its own module, imported only when the command runs, so ``maskpatch --help``
and ``maskpatch run`` stay fast (neither imports torch). A command module provides
``main(argv: list[str]) -> int``, parses its own options (``prog="maskpatch <command>"``) and
returns the exit status. Adding a command is one entry in :data:`COMMANDS`.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

__all__ = ["COMMANDS", "build_parser", "main"]

#: command name -> (module with ``main(argv) -> int``, one-line help).
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("maskpatch.cli.demo", "show the drift today and after the repair on the bundled all-MiniLM-L6-v2"),
    "run": ("maskpatch.auto.launcher", "run a command with auto-enable on: maskpatch run -- python train.py"),
    "doctor": ("maskpatch.cli.doctor", "load a saved model (and adapter), report its drift and what each policy does"),
}


def build_parser() -> argparse.ArgumentParser:
    """Return the top-level parser; each command's own options are parsed by its module."""
    from .. import __version__

    parser = argparse.ArgumentParser(
        prog="maskpatch",
        description="Correct PEFT prompt-learning results inside sentence-transformers and transformers models.",
    )
    parser.add_argument("--version", action="version", version=f"maskpatch {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="command", required=True)
    for name, (_, summary) in COMMANDS.items():
        # add_help=False: "maskpatch <command> --help" reaches the command's own parser.
        commands.add_parser(name, help=summary, description=summary, add_help=False)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``maskpatch <command>``; return its exit status (2 for a usage error)."""
    args = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    try:  # argparse exits for --help, --version and usage errors; hand back the status instead
        namespace, rest = parser.parse_known_args(args)
        module = importlib.import_module(COMMANDS[namespace.command][0])
        return int(module.main(rest) or 0)
    except SystemExit as exc:
        return _exit_status(exc)


def _exit_status(exc: SystemExit) -> int:
    """The status ``sys.exit(code)`` would give: None is 0, an int itself, anything else printed and 1."""
    if exc.code is None or isinstance(exc.code, int):
        return exc.code or 0
    print(exc.code, file=sys.stderr)
    return 1
