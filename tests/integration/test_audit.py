"""Audit mode: ``with maskpatch.audit(model) as report:`` observes drift and changes nothing.

Invariants protected here:

* every output under audit is bit-identical (``torch.equal``) to the unpatched model's, and leaving
  the block leaves the model's hook dicts and ``__dict__`` exactly as before (nothing is patched);
* each site whose token-level output is longer than its mask is recorded once, as a typed
  :class:`maskpatch.Finding` with the module's qualified name, both lengths (read from the unpatched
  outputs by hand), the active adapter and its M, and what each policy would do; one
  :class:`maskpatch.DriftWarning` per site, however many calls;
* models without drift (LoRA, a patched model) record nothing; an excess the adapter does not
  explain is recorded as unexplained; objects no adapter handles are refused before any hook goes in;
* the observer's hot path does not read tensor values on the host (no ``aten._local_scalar_dense``).
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import maskpatch
from maskpatch.auditing import AuditHook, PeftOutputObserver, TransformerOutputObserver

from conftest import TEXTS
from helpers import add_prompt_learning, encode, st_model, state

pytestmark = pytest.mark.filterwarnings("ignore:.*not supported for parameter efficient tuning.*")

M = 4


@pytest.fixture(scope="module")
def tiny_bert(tiny_model_dir) -> str:
    return tiny_model_dir("bert")


def _encode_recording(model, texts):
    """encode() with every warning recorded (helpers.encode would silence them)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = model.encode(texts, convert_to_tensor=True, batch_size=len(texts))
    return out, [w for w in caught if issubclass(w.category, maskpatch.DriftWarning)]


def _token_cls_peft(kind: str = "prompt"):
    import transformers
    from peft import LoraConfig, PromptTuningConfig, get_peft_model

    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, num_labels=3
    )
    config._attn_implementation = "eager"  # sdpa returns no attention maps
    base = transformers.BertForTokenClassification(config).eval()
    peft_config = (
        PromptTuningConfig(task_type="TOKEN_CLS", num_virtual_tokens=M)
        if kind == "prompt"
        else LoraConfig(task_type="TOKEN_CLS", r=4, target_modules=["query", "value"])
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return get_peft_model(base, peft_config).eval()


IDS = torch.tensor([[7, 8, 9, 10, 0, 0], [11, 12, 13, 14, 15, 16]])
MASK = (IDS != 0).long()


def test_sentence_transformer_audit_changes_nothing_and_records_the_transformer_once(tiny_bert):
    """Embeddings are bit-identical to unpatched; one finding for module '0' with the lengths seen by hand; one warning."""
    model = add_prompt_learning(st_model(tiny_bert), m=M)
    reference = encode(model, TEXTS)
    features = model.preprocess(TEXTS)
    with torch.no_grad():
        by_hand = model[0](dict(features))  # the unpatched Transformer output: N + M token rows, N mask columns
    n, positions = by_hand["attention_mask"].shape[1], by_hand["token_embeddings"].shape[1]
    before = state(model)

    with maskpatch.audit(model) as report:
        first, warned_first = _encode_recording(model, TEXTS)
        _, warned_second = _encode_recording(model, TEXTS[:1])
        assert not maskpatch.is_patched(model)

    assert torch.equal(first, reference)
    assert state(model) == before
    assert len(report.findings) == 1
    finding = report.findings[0]
    assert isinstance(finding, maskpatch.Finding)
    assert (finding.model, finding.site, finding.module_type, finding.output) == (
        "SentenceTransformer",
        "0",
        "Transformer",
        "token_embeddings",
    )
    assert (finding.output_length, finding.mask_length, finding.excess) == (positions, n, M)
    assert positions == n + M
    assert (finding.adapter, finding.peft_type, finding.num_virtual_tokens, finding.explained) == (
        "default",
        "PROMPT_TUNING",
        M,
        True,
    )
    assert set(finding.policies) == {"extend", "ignore", "strip"}
    assert f"{M} leading attend entries" in finding.policies["extend"]
    assert f"{M} leading do-not-attend entries" in finding.policies["ignore"]
    assert f"first {M} positions are cut" in finding.policies["strip"]
    assert len(warned_first) == 1 and not warned_second  # once per site, however many calls
    assert "SentenceTransformer.0 (Transformer)" in str(warned_first[0].message)


def test_single_text_under_audit_is_bit_identical_to_unpatched(tiny_bert):
    """A text alone under audit gives exactly the unpatched embedding (the audit never repairs)."""
    model = add_prompt_learning(st_model(tiny_bert), m=M)
    alone = encode(model, TEXTS[:1])
    with maskpatch.audit(model):
        assert torch.equal(encode(model, TEXTS[:1]), alone)


def test_peft_model_called_directly_records_every_token_level_field():
    """logits, hidden_states and attentions of a token-classification PeftModel: one finding each, outputs unchanged."""
    pm = _token_cls_peft()
    kwargs = {"input_ids": IDS, "attention_mask": MASK, "output_hidden_states": True, "output_attentions": True}
    with torch.no_grad():
        reference = pm(**kwargs)
    with maskpatch.audit(pm) as report, torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = pm(**kwargs)
        pm(**kwargs)
    assert torch.equal(out.logits, reference.logits)
    assert all(torch.equal(a, b) for a, b in zip(out.hidden_states, reference.hidden_states, strict=True))
    n = IDS.shape[1]
    found = {f.output: (f.output_length, f.mask_length, f.explained, f.site) for f in report.findings}
    assert found == {
        "logits": (n + M, n, True, ""),
        "hidden_states": (n + M, n, True, ""),
        "attentions": (n + M, n, True, ""),
    }
    assert reference.logits.shape[1] == n + M  # the lengths recorded are those of the unpatched output
    assert sum(issubclass(w.category, maskpatch.DriftWarning) for w in caught) == 3


def test_peft_positional_arguments_are_read_too():
    """A PeftModel called with input_ids positionally is audited like a keyword call."""
    pm = _token_cls_peft()
    with maskpatch.audit(pm) as report, torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm(IDS, MASK)
    assert [(f.output, f.mask_length) for f in report.findings] == [("logits", IDS.shape[1])]


def test_no_drift_no_finding_lora_and_patched_models(tiny_bert):
    """LoRA adds no positions, and a model patched under extend shows its mask lined up: nothing recorded."""
    lora = _token_cls_peft("lora")
    with maskpatch.audit(lora) as report, torch.no_grad():
        lora(input_ids=IDS, attention_mask=MASK)
    assert report.findings == [] and not report.affected

    model = add_prompt_learning(st_model(tiny_bert), m=M)
    with maskpatch.patched(model, policy="extend"), maskpatch.audit(model) as report:
        encode(model, TEXTS)
    assert report.findings == []


class _PadLogits:
    """A user's own forward hook that appends two positions to the logits (drift no adapter explains)."""

    def __call__(self, module, args, output):
        output["logits"] = torch.cat([output["logits"], output["logits"][:, :2]], dim=1)
        return output


def test_unexplained_excess_is_recorded_as_such():
    """An excess of M + 2 is recorded with explained=False and every policy saying it raises DriftError."""
    pm = _token_cls_peft()
    user = pm.register_forward_hook(_PadLogits())
    try:
        with maskpatch.audit(pm) as report, torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pm(input_ids=IDS, attention_mask=MASK)
    finally:
        user.remove()
    (finding,) = report.findings
    assert (finding.output_length, finding.mask_length, finding.explained) == (
        IDS.shape[1] + M + 2,
        IDS.shape[1],
        False,
    )
    assert all(text.startswith("raises DriftError") for text in finding.policies.values())
    assert "NOT explained" in finding.describe()


def test_unsupported_objects_are_refused_before_any_hook():
    """A module no adapter handles raises UnsupportedModelError and keeps its hook dicts empty."""
    module = torch.nn.Linear(2, 2)
    with pytest.raises(maskpatch.UnsupportedModelError, match="no maskpatch adapter handles"):
        maskpatch.audit(module)
    assert not module._forward_hooks
    with pytest.raises(maskpatch.UnsupportedModelError, match=r"expected a torch\.nn\.Module"):
        maskpatch.audit("not a model")  # type: ignore[arg-type]


def test_session_remove_is_idempotent_and_copies_carry_the_report(tiny_bert):
    """remove() twice is fine; a deep copy of an audited model records into its own copy of the report."""
    model = add_prompt_learning(st_model(tiny_bert), m=M)
    session = maskpatch.audit(model)
    assert session.sites == 1
    twin = copy.deepcopy(model)
    session.remove()
    session.remove()
    assert not any(isinstance(h, AuditHook) for m in model.modules() for h in m._forward_hooks.values())
    hooks = [h for m in twin.modules() for h in m._forward_hooks.values() if isinstance(h, AuditHook)]
    assert len(hooks) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        encode(twin, TEXTS)
    assert len(hooks[0].report.findings) == 1 and session.report.findings == []


class _SyncCounter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.syncs = 0
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        self.syncs += func is torch.ops.aten._local_scalar_dense.default
        return func(*args, **(kwargs or {}))


def test_observers_dispatch_no_tensor_op(tiny_bert):
    """Both observers, called as torch calls them on real outputs, dispatch no aten op at all (so no host sync)."""
    model = add_prompt_learning(st_model(tiny_bert), m=M)
    with torch.no_grad():
        features = dict(model.preprocess(TEXTS))
        output = model[0](dict(features))
    report = maskpatch.AuditReport()
    observer = TransformerOutputObserver(report, "SentenceTransformer", "0", "Transformer")
    pm = _token_cls_peft()
    with torch.no_grad():
        peft_out = pm(input_ids=IDS, attention_mask=MASK)
    peft_observer = PeftOutputObserver(
        report, "PeftModel", "", "PeftModelForTokenClassification", "PeftModelForTokenClassification"
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(2):  # the first call records, the second is the steady state
            with _SyncCounter() as counter:
                assert observer(model[0], (features,), {}, output) is None
                assert peft_observer(pm, (), {"input_ids": IDS, "attention_mask": MASK}, peft_out) is None
            assert counter.ops == 0 and counter.syncs == 0
    assert len(report.findings) == 2


# --- MASKPATCH_AUTO=audit: the whole process -------------------------------------------------------


def test_auto_setting_audit_is_read_as_audit_mode():
    """MASKPATCH_AUTO=audit (any case) turns auto-enable on in audit mode; a misspelling is a problem naming 'audit'."""
    from maskpatch.auto import constants

    settings = constants.read_settings({"MASKPATCH_AUTO": " Audit ", "MASKPATCH_POLICY": "strip"})
    assert settings.enabled and settings.audit and settings.patching and not settings.problems
    assert not constants.read_settings({"MASKPATCH_AUTO": "1"}).audit
    bad = constants.read_settings({"MASKPATCH_AUTO": "audits"})
    assert not bad.patching and "'audit'" in bad.problems[0]


AUDIT_PROBE = """
import json, sys, warnings
import torch
warnings.simplefilter("always")
sys.path.insert(0, sys.argv[2])
from helpers import add_prompt_learning, st_model
import maskpatch
from maskpatch.auto import autoenable
from maskpatch.auditing import AuditHook

model = add_prompt_learning(st_model(sys.argv[1]), m=4)
texts = ["hello world", "a considerably longer sentence so that the first one is padded"]
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    audited = model.encode(texts, convert_to_tensor=True)
    model.encode(texts, convert_to_tensor=True)
drift = [str(w.message) for w in caught if issubclass(w.category, maskpatch.DriftWarning)]
report = autoenable.process_audit_report()
for module in model.modules():  # take the observers off by hand: the unpatched reference
    for key in [k for k, h in module._forward_hooks.items() if isinstance(h, AuditHook)]:
        del module._forward_hooks[key]
        module._forward_hooks_with_kwargs.pop(key, None)
plain = model.encode(texts, convert_to_tensor=True)
print(json.dumps({
    "patched": maskpatch.is_patched(model),
    "config_audit": autoenable.current_config().audit,
    "identical": bool(torch.equal(audited, plain)),
    "warnings": len(drift),
    "findings": [[f.model, f.site, f.output_length - f.mask_length, f.num_virtual_tokens] for f in report.findings],
}))
"""


@pytest.mark.slow
def test_maskpatch_auto_audit_reports_every_created_model_and_changes_nothing(tiny_bert):
    """Under MASKPATCH_AUTO=audit a new SentenceTransformer is audited, not patched: same output, one finding, one warning."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    env = {k: v for k, v in os.environ.items() if not k.startswith("MASKPATCH_") and k != "PYTHONPATH"}
    env.update(MASKPATCH_AUTO="audit", HF_HUB_OFFLINE="1", PYTHONPATH=str(root))
    result = subprocess.run(
        [sys.executable, "-c", AUDIT_PROBE, tiny_bert, str(root / "tests")],
        capture_output=True,
        text=True,
        env=env,
        cwd=str(root),
        timeout=240,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out == {
        "patched": False,
        "config_audit": True,
        "identical": True,
        "warnings": 1,
        "findings": [["SentenceTransformer", "0", 4, 4]],
    }


def test_launcher_audit_option_sets_the_variable():
    """`maskpatch run --audit` sets MASKPATCH_AUTO=audit (and the default stays 1)."""
    from maskpatch.auto import launcher

    options = launcher.build_parser().parse_args(["--audit", "--", "python", "x.py"])
    assert options.audit is True
    assert launcher.launch_environment({}, audit=True)["MASKPATCH_AUTO"] == "audit"
    assert launcher.launch_environment({})["MASKPATCH_AUTO"] == "1"
