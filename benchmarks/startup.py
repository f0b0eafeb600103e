"""Interpreter start-up cost of installing maskpatch: ``python -c pass``, many times, interleaved.

Builds (in a temporary folder, from this interpreter's base Python) two venvs that differ only in
maskpatch: both get wrapt (the one dependency the start-up bootstrap imports); one also gets a
regular maskpatch wheel, with its ``maskpatch_auto.pth``. Then it times ``python -c pass`` in
rounds, one run of each variant per round in a shuffled order, and prints the median (and the 10th
and 90th percentiles) of each variant and the ratios of the medians:

* not installed (twice: the second row shows the run-to-run noise);
* installed, ``MASKPATCH_AUTO`` unset (what every Python process in the environment pays);
* installed, ``MASKPATCH_AUTO=1`` (start-up with the post-import hooks registered: the bootstrap
  and wrapt are imported, torch is not);
* installed, ``maskpatch run -- python -c pass`` (the launcher's console script, which imports no
  torch, then the command with auto-enable on);
* for reference, this development environment (editable install) with the variable unset and set.

Usage: ``python benchmarks/startup.py [--runs 200] [--wheel dist/maskpatch-*.whl]``. It prints
numbers and asserts nothing; it is not a timed test.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAUNCHER = "installed, maskpatch run -- python -c pass"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=200, help="runs of each variant (default 200)")
    parser.add_argument("--wheel", type=Path, default=None, help="a built maskpatch wheel (default: build one)")
    return parser.parse_args()


def pip(*args: str) -> None:
    # Without PYTHONPATH: a checkout on it (with the egg-info a build leaves) would pass for installed.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    subprocess.run([sys.executable, "-m", "pip", *args], check=True, capture_output=True, env=env)


def make_venv(folder: Path, *wheels: Path) -> str:
    """A venv (no pip) of the base interpreter with ``wheels`` installed; return its python."""
    base = getattr(sys, "_base_executable", sys.executable)
    subprocess.run([base, "-m", "venv", "--without-pip", str(folder)], check=True)
    python = str(folder / "bin" / "python")
    pip("--python", python, "install", "--no-deps", "--no-index", "-q", *map(str, wheels))
    return python


def build_wheels(out: Path, wheel: Path | None) -> tuple[Path, Path]:
    """Return (the maskpatch wheel, the wrapt wheel of this environment's version)."""
    from importlib.metadata import version

    pip("download", "--no-deps", "-q", "-d", str(out), f"wrapt=={version('wrapt')}")
    if wheel is None:
        pip("wheel", "--no-deps", "-q", "-w", str(out), str(ROOT))
        wheel = next(out.glob("maskpatch-*.whl"))
    return wheel, next(out.glob("wrapt-*.whl"))


def time_once(command: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    subprocess.run(command, env=env, check=True)
    return time.perf_counter() - start


def main() -> None:
    args = parse_args()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MASKPATCH_") and k != "PYTHONPATH"}
    auto = {**env, "MASKPATCH_AUTO": "1"}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        wheel, wrapt_wheel = build_wheels(folder / "wheels", args.wheel)
        without = make_venv(folder / "without", wrapt_wheel)
        with_ = make_venv(folder / "with", wrapt_wheel, wheel)
        launcher = [str(Path(with_).with_name("maskpatch")), "run", "--", with_, "-c", "pass"]
        variants = {
            "not installed": ([without, "-c", "pass"], env),
            "not installed, again (noise control)": ([without, "-c", "pass"], env),
            "installed, MASKPATCH_AUTO unset": ([with_, "-c", "pass"], env),
            "installed, MASKPATCH_AUTO=1": ([with_, "-c", "pass"], auto),
            LAUNCHER: (launcher, env),
            "dev .venv (editable), unset": ([sys.executable, "-c", "pass"], env),
            "dev .venv (editable), MASKPATCH_AUTO=1": ([sys.executable, "-c", "pass"], auto),
        }
        times: dict[str, list[float]] = {name: [] for name in variants}
        for command, variant_env in variants.values():  # warm the file cache and .pyc files
            time_once(command, variant_env)
        order = list(variants)
        for _ in range(args.runs):
            random.shuffle(order)
            for name in order:
                times[name].append(time_once(*variants[name]))
    report(times, args.runs)


def report(times: dict[str, list[float]], runs: int) -> None:
    print(
        f"python -c pass, {runs} runs each, interleaved; {platform.python_implementation()} "
        f"{platform.python_version()} on {platform.machine()}, {os.cpu_count()} CPUs"
    )
    print(f"{'variant':44} {'median ms':>10} {'p10 ms':>8} {'p90 ms':>8}")
    medians = {}
    for name, runs_of_variant in times.items():
        values = sorted(runs_of_variant)
        medians[name] = statistics.median(values)
        p10, p90 = values[len(values) // 10], values[(9 * len(values)) // 10]
        print(f"{name:44} {medians[name] * 1e3:10.2f} {p10 * 1e3:8.2f} {p90 * 1e3:8.2f}")
    base = medians["not installed"]
    noise = medians["not installed, again (noise control)"] / base
    print(f"ratio not installed, again / not installed (noise): {noise:.3f}")
    print(f"ratio installed (unset) / not installed: {medians['installed, MASKPATCH_AUTO unset'] / base:.3f}")
    print(f"ratio installed (MASKPATCH_AUTO=1) / not installed: {medians['installed, MASKPATCH_AUTO=1'] / base:.3f}")
    launched = medians[LAUNCHER] - medians["installed, MASKPATCH_AUTO unset"]
    print(f"maskpatch run -- python -c pass, minus python -c pass (medians): {launched * 1e3:.1f} ms")
    dev_unset = medians["dev .venv (editable), unset"]
    print(
        f"ratio dev .venv MASKPATCH_AUTO=1 / unset: {medians['dev .venv (editable), MASKPATCH_AUTO=1'] / dev_unset:.3f}"
    )


if __name__ == "__main__":
    main()
