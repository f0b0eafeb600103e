"""``maskpatch run -- COMMAND ...``: run a command with auto-enable on, with or without the ``.pth``.

In the manner of ``opentelemetry-instrument`` and ``ddtrace-run``, the launcher sets
``MASKPATCH_AUTO=1`` (plus ``MASKPATCH_POLICY``, ``MASKPATCH_STRICT`` and
``MASKPATCH_DISABLED_ADAPTERS`` from its options), puts maskpatch's bootstrap folder first on
``PYTHONPATH`` and replaces itself with ``COMMAND``. Every Python interpreter started in that
process tree (``python``, ``torchrun`` and its workers, spawned pool workers) imports the
bootstrap's ``sitecustomize``, which starts auto-enable and then runs the ``sitecustomize`` it
shadows, so the user's own start-up code still runs. This works where ``.pth`` files are not
processed or no longer run ``import`` lines (PEP 829); with both in place auto-enable starts once.

Interpreters started with ``-S`` (no ``site``), ``-E`` or ``-I`` (``PYTHONPATH`` ignored) do not
run the bootstrap.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from .constants import (
    AUDIT_VALUE,
    MASKPATCH_AUTO,
    MASKPATCH_DISABLED_ADAPTERS,
    MASKPATCH_POLICY,
    MASKPATCH_STRICT,
    POLICY_VALUES,
)

__all__ = ["BOOTSTRAP_DIR", "build_parser", "launch_environment", "main"]

#: The folder ``maskpatch run`` puts first on ``PYTHONPATH``: it holds only ``sitecustomize.py``.
BOOTSTRAP_DIR = Path(__file__).resolve().parent / "_bootstrap"


def build_parser() -> argparse.ArgumentParser:
    """The options of ``maskpatch run``; everything after them (or after ``--``) is the command."""
    parser = argparse.ArgumentParser(
        prog="maskpatch run",
        description=(
            "Run COMMAND with maskpatch auto-enable on: every sentence-transformers model and PEFT "
            "prompt-learning model created by Python processes in its process tree is patched."
        ),
        epilog="example: maskpatch run --policy strip -- torchrun --nproc_per_node=2 train.py",
    )
    parser.add_argument("--policy", choices=POLICY_VALUES, help=f"sets {MASKPATCH_POLICY} (default: extend)")
    parser.add_argument("--strict", action="store_true", help=f"sets {MASKPATCH_STRICT}=1: problems raise")
    parser.add_argument(
        "--disable-adapters",
        metavar="NAMES",
        help=f"sets {MASKPATCH_DISABLED_ADAPTERS}: comma-separated adapter names to leave alone",
    )
    parser.add_argument(
        "--audit", action="store_true", help=f"sets {MASKPATCH_AUTO}=audit: report drift, patch nothing"
    )
    parser.add_argument("command", nargs=argparse.REMAINDER, help="the command to run, e.g. python train.py")
    return parser


def launch_environment(
    environ: Mapping[str, str],
    *,
    policy: str | None = None,
    strict: bool = False,
    disabled_adapters: str | None = None,
    audit: bool = False,
) -> dict[str, str]:
    """Return a copy of ``environ`` with auto-enable on and the bootstrap folder first on ``PYTHONPATH``.

    Options left at their defaults keep whatever ``environ`` already says. ``audit`` turns on
    audit mode (``MASKPATCH_AUTO=audit``) instead of patching.
    """
    env = dict(environ)
    env[MASKPATCH_AUTO] = AUDIT_VALUE if audit else "1"
    if policy is not None:
        env[MASKPATCH_POLICY] = policy
    if strict:
        env[MASKPATCH_STRICT] = "1"
    if disabled_adapters is not None:
        env[MASKPATCH_DISABLED_ADAPTERS] = disabled_adapters
    entries = [entry for entry in env.get("PYTHONPATH", "").split(os.pathsep) if entry]
    env["PYTHONPATH"] = os.pathsep.join([str(BOOTSTRAP_DIR), *(e for e in entries if e != str(BOOTSTRAP_DIR))])
    return env


def main(argv: Sequence[str]) -> int:
    """Run ``maskpatch run [options] [--] COMMAND ...``; only returns if COMMAND cannot be started."""
    parser = build_parser()
    options = parser.parse_args(list(argv))
    command = options.command[1:] if options.command[:1] == ["--"] else options.command
    if not command:
        parser.error("missing the command to run, e.g. maskpatch run -- python train.py")
    env = launch_environment(
        os.environ,
        policy=options.policy,
        strict=options.strict,
        disabled_adapters=options.disable_adapters,
        audit=options.audit,
    )
    return _exec(command, env)


def _exec(command: list[str], env: dict[str, str]) -> int:
    """Replace this process with ``command`` (POSIX); elsewhere run it and return its status."""
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        if os.name != "posix":
            import subprocess  # only here: it costs an import on every `maskpatch run`

            return subprocess.call(command, env=env)
        os.execvpe(command[0], command, env)
    except FileNotFoundError:
        print(f"maskpatch run: command not found: {command[0]}", file=sys.stderr)
        return 127
    except PermissionError:
        print(f"maskpatch run: permission denied: {command[0]}", file=sys.stderr)
        return 126
