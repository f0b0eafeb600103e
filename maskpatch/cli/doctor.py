"""``maskpatch doctor MODEL_DIR [--adapter ADAPTER_DIR]``: find the drift in a saved model, and what each policy does.

The doctor loads a saved sentence-transformers model directory (SentenceTransformer,
SparseEncoder, MultiVectorEncoder or CrossEncoder, read from ``config_sentence_transformers.json``)
or a plain Hugging Face model directory (loaded as a SentenceTransformer with mean pooling),
optionally puts a saved PEFT adapter on it (``PeftModel.from_pretrained``), and runs a probe
batch of a short and a long text. It reports:

* the drift: the caller's mask has ``N`` columns, the token-level output ``N + M`` positions, and
  whether the active adapter (name, PEFT type, ``num_virtual_tokens``) explains ``M``;
* what happens today, unpatched: a crash, or how far the short text's output moves when it is
  padded in a batch;
* for each policy: the same batch-invariance numbers (cosine and max abs diff) with maskpatch,
  and every known limit (:mod:`maskpatch.limits`) the probe ran into, with what to do;
* the policy the adapter was trained with, when a ``maskpatch.json`` sidecar lies beside it (the
  adapter directory, or the model directory without ``--adapter``; see :mod:`maskpatch.provenance`).

Exit status: 0 when the model is healthy (no drift) or repairable (every policy batch invariant),
1 when the drift cannot be explained, a policy does not repair it or runs into a known limit, 2 when the model or adapter
cannot be loaded (or for a usage error).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from ..api import patched
from ..auditing import AuditReport, audit
from ..compat.st_inner import inner_model
from ..drift import POLICIES
from ..errors import DriftWarning, MaskpatchWarning
from ..layout import active_layout

if TYPE_CHECKING:
    from sentence_transformers.base.model import BaseModel

__all__ = ["DoctorError", "Drift", "PolicyResult", "Report", "audit_saved", "diagnose", "format_audit", "main"]

SHORT = "hello world"
LONG = "a considerably longer sentence, so that the short one is padded when both are in one batch"
#: Cross encoders score pairs; the first pair is the short one.
PAIRS = [(SHORT, "hi there"), (LONG, "the long sentence is paired with another longer sentence")]
MODEL_TYPES = ("auto", "SentenceTransformer", "SparseEncoder", "MultiVectorEncoder", "CrossEncoder")
TOLERANCE = 1e-5

EXIT_OK, EXIT_PROBLEM, EXIT_LOAD = 0, 1, 2

WHAT_POLICIES_DO = {
    "extend": "virtual tokens count as real: the mask gets M leading attend entries",
    "ignore": "virtual tokens are kept but masked out: the mask gets M leading do-not-attend entries",
    "strip": "virtual tokens are cut from every token-level output ([:, M:])",
}


class DoctorError(Exception):
    """The model or adapter directory cannot be loaded or probed (exit status 2)."""


@dataclass
class Drift:
    """What the first ``Transformer`` module returned for the probe batch, unpatched."""

    status: str  # "none", "repairable", "unexplained" or "no token-level output"
    output_key: str
    n: int
    positions: int | None
    excess: int | None
    adapter: str | None
    peft_type: str | None
    num_virtual_tokens: int


@dataclass
class PolicyResult:
    """How the short probe text's output moves when it is padded in a batch (``None`` policy: unpatched)."""

    policy: str | None
    batch_invariant: bool
    cosine: float | None = None
    max_abs_diff: float | None = None
    error: str | None = None
    does: str = ""
    limits: list[str] = field(default_factory=list)


@dataclass
class Report:
    model_dir: str
    adapter_dir: str | None
    model_type: str
    drift: Drift
    unpatched: PolicyResult
    policies: list[PolicyResult] = field(default_factory=list)
    healthy: bool = False
    verdict: str = ""
    #: What the adapter's ``maskpatch.json`` records (None without one), or why it cannot be read.
    trained_with: dict[str, Any] | None = None
    trained_with_error: str | None = None


def diagnose(
    model_dir: str | os.PathLike[str], *, adapter_dir: str | os.PathLike[str] | None = None, model_type: str = "auto"
) -> Report:
    """Load ``model_dir`` (and ``adapter_dir``), probe it unpatched and under each policy; return the report.

    Raises :class:`DoctorError` when a directory cannot be loaded.
    """
    model_type = _resolve_model_type(Path(model_dir), model_type)
    model = _load(Path(model_dir), model_type)
    if adapter_dir is not None:
        _attach_adapter(model, Path(adapter_dir))
    model.eval()
    inputs: list[Any] = list(PAIRS) if model_type == "CrossEncoder" else [SHORT, LONG]
    try:
        drift = measure_drift(model, inputs)
    except DoctorError:
        raise
    except Exception as exc:
        raise DoctorError(f"cannot probe {str(model_dir)!r}: {type(exc).__name__}: {exc}") from exc
    unpatched = _invariance(model, inputs, None)
    results = [] if drift.status == "unexplained" else [_probe_policy(model, inputs, p) for p in POLICIES]
    report = Report(str(model_dir), None if adapter_dir is None else str(adapter_dir), model_type, drift, unpatched)
    report.policies = results
    report.healthy, report.verdict = verdict(drift, results)
    report.trained_with, report.trained_with_error = _trained_with(Path(adapter_dir or model_dir))
    return report


def _trained_with(directory: Path) -> tuple[dict[str, Any] | None, str | None]:
    """Read the ``maskpatch.json`` sidecar in ``directory``: (its fields or None, an error or None)."""
    from ..errors import SidecarError
    from ..provenance import read_sidecar

    try:
        trained = read_sidecar(directory)
    except SidecarError as exc:
        return None, str(exc)
    return (None if trained is None else asdict(trained)), None


def verdict(drift: Drift, results: Sequence[PolicyResult]) -> tuple[bool, str]:
    """Return (healthy, one-line verdict) for ``drift`` and the per-policy ``results``."""
    if drift.status == "unexplained":
        who = "no active prompt-learning adapter" if drift.adapter is None else f"the active adapter {drift.adapter!r}"
        return False, (
            f"unexplained drift: the token output has {drift.excess} positions more than the mask, but {who} adds "
            f"{drift.num_virtual_tokens}; maskpatch will refuse this model (DriftError)"
        )
    failed = [r.policy for r in results if not r.batch_invariant]
    limited = [r.policy for r in results if r.limits]
    if limited:
        return False, (
            f"policies {', '.join(map(str, limited))} run into a known limit of maskpatch (see 'known limit' above "
            "for the case and what to do)"
        )
    if failed:
        return False, f"policies {', '.join(map(str, failed))} are not batch invariant; please report this model"
    if drift.status == "repairable":
        return True, f"repairable: {drift.excess} virtual tokens; use maskpatch.apply(model, policy=...) (any policy)"
    if drift.status == "none":
        return True, "healthy: no drift (token outputs have as many positions as the mask)"
    return True, "healthy: the output has no per-position axis (e.g. cross-encoder scores), so there is no drift"


def measure_drift(model: BaseModel, inputs: list[Any]) -> Drift:
    """Run the first ``Transformer`` module of ``model`` on ``inputs``, unpatched, and measure its drift."""
    transformer = _transformer_module(model)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        # ``preprocess`` from sentence-transformers 5.4; ``tokenize`` before.
        features = (getattr(model, "preprocess", None) or model.tokenize)(inputs)
        output = transformer(dict(features))
    key = getattr(transformer, "module_output_name", "token_embeddings")
    # Against the caller's mask: sentence-transformers 3.3 - 6.1 widen the output's mask by M themselves.
    caller = features.get("attention_mask")
    tokens, mask = output.get(key), caller if isinstance(caller, Tensor) else output["attention_mask"]
    layout = active_layout(inner_model(transformer))
    n = int(mask.shape[1])
    drift = partial(
        Drift,
        output_key=key,
        n=n,
        adapter=layout.adapter,
        peft_type=layout.peft_type,
        num_virtual_tokens=layout.num_virtual_tokens,
    )
    if not isinstance(tokens, Tensor) or tokens.dim() != 3 or tokens.shape[1] < n:
        # 2-D scores, or causal logits cut to the last positions (logits_to_keep).
        return drift("no token-level output", positions=None, excess=None)
    excess = int(tokens.shape[1]) - n
    if excess == 0:
        status = "none"
    elif excess == layout.num_virtual_tokens:
        status = "repairable"
    else:
        status = "unexplained"
    return drift(status, positions=n + excess, excess=excess)


def _probe_policy(model: nn.Module, inputs: list[Any], policy: str) -> PolicyResult:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", MaskpatchWarning)
        with patched(model, policy=policy):  # type: ignore[arg-type]
            result = _invariance(model, inputs, policy)
    result.does = WHAT_POLICIES_DO[policy]
    # Known limits the probe ran into (maskpatch.limits): named in the report, with what to do.
    result.limits = [str(w.message) for w in caught if issubclass(w.category, MaskpatchWarning)]
    return result


def _invariance(model: nn.Module, inputs: list[Any], policy: str | None) -> PolicyResult:
    """Compare the first input's output alone with its output inside the padded batch."""
    run = _runner(model)
    try:
        alone, in_batch = run(inputs[:1])[0], run(inputs)[0]
    except Exception as exc:  # noqa: BLE001 - the doctor reports what breaks, whatever it is
        return PolicyResult(policy, False, error=f"{type(exc).__name__}: {exc}")
    if alone.shape != in_batch.shape:
        shapes = f"{tuple(alone.shape)} alone vs {tuple(in_batch.shape)} in the batch"
        return PolicyResult(policy, False, error=f"output shape differs: {shapes}")
    diff = float((alone - in_batch).abs().max()) if alone.numel() else 0.0
    cosine = float(torch.nn.functional.cosine_similarity(alone, in_batch, dim=0)) if alone.numel() > 1 else None
    return PolicyResult(policy, diff <= TOLERANCE, cosine=cosine, max_abs_diff=diff)


def _runner(model: nn.Module) -> Callable[[list[Any]], list[Tensor]]:
    """Return a function running ``model``'s own inference API, one flat float tensor per input."""
    import sentence_transformers

    # SparseEncoder is new in sentence-transformers 5.0 and MultiVectorEncoder in 5.8: an older
    # release has neither, and no model of theirs to check for.
    def kind(name: str) -> type | tuple[()]:
        found = getattr(sentence_transformers, name, None)
        return found if isinstance(found, type) else ()

    cross, multi, sparse = kind("CrossEncoder"), kind("MultiVectorEncoder"), kind("SparseEncoder")

    def run(batch: list[Any]) -> list[Tensor]:
        loaded: Any = model  # one of the classes above, whichever this release has
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            warnings.simplefilter("always", MaskpatchWarning)  # known limits: _probe_policy reports them
            if isinstance(model, cross):
                out = loaded.predict(batch, convert_to_tensor=True, activation_fn=nn.Identity(), batch_size=len(batch))
            elif isinstance(model, multi):
                out = loaded.encode(batch, batch_size=len(batch))
            elif isinstance(model, sparse):
                out = loaded.encode(
                    batch, convert_to_tensor=True, convert_to_sparse_tensor=False, batch_size=len(batch)
                )
            else:
                out = loaded.encode(batch, convert_to_tensor=True, batch_size=len(batch))
        return [row.detach().float().reshape(-1).cpu() for row in out]

    return run


def _resolve_model_type(model_dir: Path, model_type: str) -> str:
    if not model_dir.is_dir():
        raise DoctorError(f"expected a model directory, but {str(model_dir)!r} is not a directory")
    if model_type != "auto":
        return _known_model_type(model_type, source="--model-type")
    config = model_dir / "config_sentence_transformers.json"
    if not config.is_file():
        return "SentenceTransformer"
    try:
        data = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise DoctorError(f"cannot read {config}: {exc}") from exc
    if not isinstance(data, dict):
        raise DoctorError(f"expected {config} to hold a JSON object, but it holds a JSON {type(data).__name__}")
    return _known_model_type(data.get("model_type", "SentenceTransformer"), source=str(config))


def _known_model_type(model_type: object, *, source: str) -> str:
    """Return ``model_type`` if it names a model class the doctor loads; raise :class:`DoctorError` otherwise.

    A name read from a file is never looked up as an attribute unless it is one of these.
    """
    if not isinstance(model_type, str) or model_type not in MODEL_TYPES[1:]:
        shown = repr(model_type) if len(repr(model_type)) <= 80 else repr(model_type)[:77] + "..."
        raise DoctorError(f"expected a model type out of {', '.join(MODEL_TYPES[1:])} in {source}, but got {shown}")
    return model_type


def _load(model_dir: Path, model_type: str) -> BaseModel:
    import sentence_transformers

    cls = getattr(sentence_transformers, _known_model_type(model_type, source="the model type"), None)
    if not isinstance(cls, type):
        version = getattr(sentence_transformers, "__version__", "?")
        raise DoctorError(
            f"cannot load {str(model_dir)!r} as a {model_type}: sentence-transformers {version} has no {model_type}"
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            loaded: BaseModel = cls(str(model_dir), device="cpu", local_files_only=True)
            return loaded
    except Exception as exc:
        raise DoctorError(f"cannot load {str(model_dir)!r} as a {model_type}: {type(exc).__name__}: {exc}") from exc


def _transformer_module(model: nn.Module) -> nn.Module:
    from ..compat.st_modules import st_classes

    classes = st_classes()  # Transformer lives elsewhere before sentence-transformers 5.4
    found: nn.Module | None = (
        None if classes is None else next((m for m in model.modules() if isinstance(m, classes.transformer)), None)
    )
    if found is None:
        raise DoctorError(f"expected a model with a sentence-transformers Transformer module, but {model!r} has none")
    return found


def _attach_adapter(model: nn.Module, adapter_dir: Path) -> None:
    if not adapter_dir.is_dir():
        raise DoctorError(f"expected an adapter directory, but {str(adapter_dir)!r} is not a directory")
    from peft import PeftModel

    from ..compat.st_inner import inner_name

    transformer = _transformer_module(model)
    name = inner_name(transformer)  # ``model`` from sentence-transformers 5.4, ``auto_model`` before
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            setattr(transformer, name, PeftModel.from_pretrained(getattr(transformer, name), str(adapter_dir)))
    except Exception as exc:
        raise DoctorError(f"cannot load the adapter {str(adapter_dir)!r}: {type(exc).__name__}: {exc}") from exc


def format_report(report: Report) -> str:
    """Return ``report`` as the human-readable text ``maskpatch doctor`` prints."""
    d = report.drift
    lines = [f"maskpatch doctor: {report.model_dir} ({report.model_type})"]
    if report.adapter_dir:
        lines.append(f"  adapter dir:    {report.adapter_dir}")
    adapter = "none" if d.adapter is None else f"{d.adapter!r} ({d.peft_type}, {d.num_virtual_tokens} virtual tokens)"
    lines.append(f"  active adapter: {adapter}")
    lines.extend(_format_trained_with(report))
    if d.positions is None:
        lines.append(f"  probe:          mask N={d.n}; {d.output_key!r} has no per-position axis")
    else:
        lines.append(f"  probe:          mask N={d.n}, {d.output_key!r} N+M={d.positions}, M={d.excess} -> {d.status}")
    lines.append("  short text alone vs padded in a batch:")
    for result in [report.unpatched, *report.policies]:
        lines.append("    " + _format_result(result))
        lines.extend(f"      known limit: {message}" for message in result.limits)
    lines.append(("ok: " if report.healthy else "problem: ") + report.verdict)
    return "\n".join(lines)


def _format_trained_with(report: Report) -> list[str]:
    if report.trained_with_error is not None:
        return [f"  trained with:   unreadable sidecar: {report.trained_with_error}"]
    if report.trained_with is None:
        return []
    policy = report.trained_with["policy"]
    version = report.trained_with["maskpatch_version"]
    line = f"  trained with:   maskpatch policy {policy!r} (maskpatch.json, maskpatch {version}); "
    return [line + f"serve it with maskpatch.apply(model, policy={policy!r})"]


def _format_result(result: PolicyResult) -> str:
    name = f"{result.policy or 'unpatched':<10}"
    if result.error is not None:
        return f"{name} fails: {result.error.splitlines()[0][:160]}"
    state = "batch invariant" if result.batch_invariant else "NOT batch invariant"
    cosine = "n/a" if result.cosine is None else f"{result.cosine:.6f}"
    does = f"  ({result.does})" if result.does else ""
    return f"{name} {state:<20} cosine {cosine}  max|diff| {result.max_abs_diff:.2e}{does}"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="maskpatch doctor",
        description="Load a saved model (and adapter), probe it, and report the drift and what each policy does.",
    )
    parser.add_argument("model_dir", metavar="MODEL_DIR", help="a saved sentence-transformers or Hugging Face model")
    parser.add_argument("--adapter", metavar="ADAPTER_DIR", help="a saved PEFT adapter to put on the model")
    parser.add_argument("--model-type", choices=MODEL_TYPES, default="auto", help="how to load MODEL_DIR")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument(
        "--audit",
        nargs="+",
        metavar="TEXT",
        help="instead of the probe, run the model's own inference API on these texts (one batch) in audit mode "
        "and report every place a token-level output and its mask disagree",
    )
    # Handled in main() before parsing (no MODEL_DIR needed); listed here for --help.
    parser.add_argument("--env", action="store_true", help="report the installed versions instead (no MODEL_DIR)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``maskpatch doctor``; return 0 (healthy or repairable), 1 (a problem) or 2 (cannot load)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--env" in argv:  # the environment report needs no model: maskpatch.doctor_env
        from .doctor_env import main as env_main

        return env_main([arg for arg in argv if arg != "--env"])
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # --help and usage errors
        return int(exc.code or 0)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.audit:
        return _main_audit(args)
    try:
        report = diagnose(args.model_dir, adapter_dir=args.adapter, model_type=args.model_type)
    except DoctorError as exc:
        print(f"maskpatch doctor: error: {exc}", file=sys.stderr)
        return EXIT_LOAD
    print(json.dumps(asdict(report), indent=2) if args.json else format_report(report))
    return EXIT_OK if report.healthy else EXIT_PROBLEM


# --- --audit: audit mode on sample texts ----------------------------------------------------------


def audit_saved(
    model_dir: str | os.PathLike[str],
    texts: Sequence[str],
    *,
    adapter_dir: str | os.PathLike[str] | None = None,
    model_type: str = "auto",
) -> AuditReport:
    """Load ``model_dir`` (and ``adapter_dir``) and encode ``texts`` in one batch under :func:`maskpatch.audit`.

    A CrossEncoder scores each text paired with itself. Returns the audit's report; the model is
    never patched. Raises :class:`DoctorError` when a directory cannot be loaded or ``texts`` is empty.
    """
    if not texts:
        raise DoctorError("expected at least one text to audit, but got none")
    model_type = _resolve_model_type(Path(model_dir), model_type)
    model = _load(Path(model_dir), model_type)
    if adapter_dir is not None:
        _attach_adapter(model, Path(adapter_dir))
    model.eval()
    inputs: list[Any] = [(t, t) for t in texts] if model_type == "CrossEncoder" else list(texts)
    with warnings.catch_warnings(), audit(model) as report:
        warnings.simplefilter("ignore", DriftWarning)  # the report says it all, once
        _runner(model)(inputs)
    return report


def format_audit(model_dir: str, report: AuditReport) -> str:
    """Return ``report`` as the text ``maskpatch doctor --audit`` prints."""
    lines = [f"maskpatch doctor --audit: {model_dir}"]
    if not report.findings:
        lines.append("ok: no token-level output disagreed with its mask; this model is not affected")
        return "\n".join(lines)
    for finding in report.findings:
        where = f"{finding.model}.{finding.site}" if finding.site else finding.model
        adapter = "none" if finding.adapter is None else f"{finding.adapter!r} (M={finding.num_virtual_tokens})"
        lines.append(
            f"  {where} ({finding.module_type}) {finding.output!r}: {finding.output_length} positions, mask "
            f"{finding.mask_length}; active adapter {adapter}; {'explained' if finding.explained else 'NOT explained'}"
        )
        lines.extend(f"    {policy:<7} {what}" for policy, what in finding.policies.items())
    if all(f.explained for f in report.findings):
        lines.append("affected: repairable; use maskpatch.apply(model, policy=...) or MASKPATCH_AUTO=1")
    else:
        lines.append("problem: drift the active adapter does not explain; maskpatch will refuse it (DriftError)")
    return "\n".join(lines)


def _main_audit(args: argparse.Namespace) -> int:
    """``--audit``: exit 0 when nothing or only repairable drift is found, 1 for unexplained drift, 2 on load errors."""
    try:
        report = audit_saved(args.model_dir, args.audit, adapter_dir=args.adapter, model_type=args.model_type)
    except DoctorError as exc:
        print(f"maskpatch doctor: error: {exc}", file=sys.stderr)
        return EXIT_LOAD
    if args.json:
        print(
            json.dumps({"model_dir": str(args.model_dir), "findings": [asdict(f) for f in report.findings]}, indent=2)
        )
    else:
        print(format_audit(str(args.model_dir), report))
    return EXIT_OK if all(f.explained for f in report.findings) else EXIT_PROBLEM
