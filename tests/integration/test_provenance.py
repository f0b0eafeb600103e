"""The policy a prompt was trained with travels with its adapter (``maskpatch.json``), and loading warns.

Invariants protected here:

* a patched model's adapter save writes ``maskpatch.json`` (the policy, the adapter, its type and
  M) beside the adapter, and every file PEFT writes is byte-identical to an unpatched save;
  sentence-transformers' ``model.save`` writes it too;
* ``PeftModel.save_pretrained`` is the very same function object again after ``remove()``, and a
  save after that writes no sidecar;
* loading such an adapter into an unpatched model (``from_pretrained`` or ``load_adapter``) issues
  exactly one MaskpatchWarning naming the recorded policy and ``maskpatch.apply``; none when the
  model is patched with that policy; one naming both policies when patched with another;
* under auto-enable, ``from_pretrained`` serves the adapter with its recorded policy;
* ``maskpatch doctor`` reports the recorded policy; an unreadable sidecar is reported, not ignored.
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

import maskpatch
from maskpatch import cli, provenance
from maskpatch.auto import autoenable
from maskpatch.cli import doctor
from tests.helpers import add_prompt_learning, class_state, residue_snapshot, st_model

M = 4
SIDECAR = "maskpatch.json"  # the documented file name, written out here rather than read from the code


def files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file()}


def mp_warnings(record: list[warnings.WarningMessage]) -> list[str]:
    return [str(w.message) for w in record if issubclass(w.category, maskpatch.MaskpatchWarning)]


@pytest.fixture
def prompt_model(tiny_model_dir):
    """A SentenceTransformer (tiny BERT, mean pooling) with an M=4 prompt-tuning adapter on model[0]."""
    return add_prompt_learning(st_model(tiny_model_dir("bert")), m=M)


@pytest.fixture
def saved_ignore(prompt_model, tmp_path: Path) -> Path:
    """The adapter of ``prompt_model`` saved while it is patched with policy 'ignore'."""
    with maskpatch.patched(prompt_model, policy="ignore"):
        prompt_model[0].model.save_pretrained(str(tmp_path / "ignore"))
    return tmp_path / "ignore"


def load(model, directory: Path, **kwargs):
    from peft import PeftModel

    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        model[0].model = PeftModel.from_pretrained(model[0].model, str(directory), **kwargs)
    return mp_warnings(record)


def test_patched_save_adds_sidecar_and_leaves_adapter_files_byte_identical(prompt_model, tmp_path: Path):
    """Unpatched vs patched save of one prompt: PEFT's files equal byte for byte; only maskpatch.json is new."""
    pm = prompt_model[0].model
    pm.save_pretrained(str(tmp_path / "plain"))
    handle = maskpatch.apply(prompt_model, policy="strip")
    pm.save_pretrained(str(tmp_path / "patched"))
    prompt_model.save(str(tmp_path / "st"))
    handle.remove()
    plain, patched = files(tmp_path / "plain"), files(tmp_path / "patched")
    assert SIDECAR not in plain
    assert set(patched) == set(plain) | {SIDECAR}
    assert all(patched[name] == content for name, content in plain.items())
    record = json.loads(patched[SIDECAR])
    assert (record["policy"], record["adapter_name"], record["peft_type"], record["num_virtual_tokens"]) == (
        "strip",
        "default",
        "PROMPT_TUNING",
        M,
    )
    assert json.loads((tmp_path / "st" / SIDECAR).read_text())["policy"] == "strip"


def test_a_second_prompt_adapter_gets_its_sidecar_in_its_own_directory(prompt_model, tmp_path: Path):
    """PEFT saves a non-default adapter in DIR/<name>/; its maskpatch.json sits there, naming it."""
    from peft import PromptTuningConfig, TaskType

    pm = prompt_model[0].model
    pm.add_adapter("second", PromptTuningConfig(task_type=TaskType.FEATURE_EXTRACTION, num_virtual_tokens=M + 2))
    with maskpatch.patched(prompt_model, policy="ignore"):
        pm.save_pretrained(str(tmp_path / "both"))
    first = json.loads((tmp_path / "both" / SIDECAR).read_text())
    second = json.loads((tmp_path / "both" / "second" / SIDECAR).read_text())
    assert (first["adapter_name"], first["num_virtual_tokens"]) == ("default", M)
    assert (second["adapter_name"], second["num_virtual_tokens"], second["policy"]) == ("second", M + 2, "ignore")


REMOVE_PROBE = """
import json, sys, warnings
sys.path.insert(0, sys.argv[1])
warnings.simplefilter("ignore")
import torch
torch.set_num_threads(1)
import maskpatch
from peft import PeftModel
from tests.helpers import add_prompt_learning, class_state, residue_snapshot, st_model

model = add_prompt_learning(st_model(sys.argv[2]), m=4)
before = PeftModel.__dict__["save_pretrained"]
out = {"plain_function": type(before).__name__ == "function"}
handle = maskpatch.apply(model, policy="extend")
out["wrapped_while_patched"] = PeftModel.__dict__["save_pretrained"] is not before
handle.remove()
out["same_object_after_remove"] = PeftModel.__dict__["save_pretrained"] is before
with maskpatch.patched(model, policy="ignore"):
    pass
out["same_object_after_patched_block"] = PeftModel.__dict__["save_pretrained"] is before
model[0].model.save_pretrained(sys.argv[3])
print(json.dumps(out))
"""


def test_remove_restores_save_pretrained_exactly_and_later_saves_write_no_sidecar(tiny_model_dir, tmp_path: Path):
    """In a fresh interpreter (no other patched model alive): the very same ``save_pretrained`` after remove().

    The wrapper stays while any patched model lives, so this runs where the test's model is the only one.
    """
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(root)}
    for name in ("MASKPATCH_AUTO", "MASKPATCH_POLICY", "MASKPATCH_STRICT", "MASKPATCH_DISABLED_ADAPTERS"):
        env.pop(name, None)
    command = [sys.executable, "-c", REMOVE_PROBE, str(root), tiny_model_dir("bert"), str(tmp_path / "after")]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out == {
        "plain_function": True,
        "wrapped_while_patched": True,
        "same_object_after_remove": True,
        "same_object_after_patched_block": True,
    }
    assert (tmp_path / "after" / "adapter_config.json").exists()
    assert not (tmp_path / "after" / SIDECAR).exists()


def test_unpatched_save_while_another_model_is_patched_clears_a_stale_sidecar(tiny_model_dir, tmp_path: Path):
    """A directory saved patched, then re-saved from an unpatched model, holds no sidecar claiming a policy."""
    first = add_prompt_learning(st_model(tiny_model_dir("bert")), m=M)
    other = add_prompt_learning(st_model(tiny_model_dir("bert")), m=M, seed=1)
    with maskpatch.patched(first, policy="ignore"), maskpatch.patched(other, policy="ignore"):
        first[0].model.save_pretrained(str(tmp_path / "a"))
        assert (tmp_path / "a" / SIDECAR).exists()
        maskpatch.remove(first)
        first[0].model.save_pretrained(str(tmp_path / "a"))
    assert not (tmp_path / "a" / SIDECAR).exists()


def test_loading_into_an_unpatched_model_warns_exactly_once(tiny_model_dir, saved_ignore: Path):
    """from_pretrained (which calls load_adapter inside) gives one warning naming 'ignore' and maskpatch.apply."""
    messages = load(st_model(tiny_model_dir("bert")), saved_ignore)
    assert len(messages) == 1, messages
    assert "'ignore'" in messages[0] and "unpatched" in messages[0]
    assert "maskpatch.apply(model, policy='ignore')" in messages[0]


def test_load_adapter_into_an_unpatched_peft_model_warns_once(prompt_model, saved_ignore: Path):
    """``load_adapter`` of a second adapter from a sidecar directory warns once, naming that adapter."""
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        prompt_model[0].model.load_adapter(str(saved_ignore), adapter_name="second")
    messages = mp_warnings(record)
    assert len(messages) == 1 and "'second'" in messages[0] and "'ignore'" in messages[0], messages


def test_no_warning_when_patched_with_the_recorded_policy(tiny_model_dir, saved_ignore: Path):
    """Patched before loading, with the recorded policy: nothing to warn about."""
    model = st_model(tiny_model_dir("bert"))
    with maskpatch.patched(model, policy="ignore"):
        assert load(model, saved_ignore) == []


def test_patched_with_another_policy_warns_naming_both(tiny_model_dir, saved_ignore: Path):
    """Patched with 'extend', loading an adapter trained under 'ignore': one warning naming both."""
    model = st_model(tiny_model_dir("bert"))
    with maskpatch.patched(model, policy="extend"):
        messages = load(model, saved_ignore)
    assert len(messages) == 1 and "'ignore'" in messages[0] and "policy 'extend'" in messages[0], messages


def test_auto_enable_serves_a_loaded_adapter_with_its_recorded_policy(tiny_model_dir, saved_ignore: Path):
    """Auto-enable on with 'extend': a PeftModel loaded from an 'ignore' adapter is patched with 'ignore', silently."""
    from peft import PeftModel
    from transformers import AutoModel

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base = AutoModel.from_pretrained(tiny_model_dir("bert"))
    autoenable.enable(policy="extend")
    try:
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            pm = PeftModel.from_pretrained(base, str(saved_ignore))
    finally:
        autoenable.disable()
    try:
        assert mp_warnings(record) == []
        assert provenance.served_policy(pm) == "ignore"
    finally:
        maskpatch.remove(pm)


def test_unguard_loads_restores_both_methods_exactly_and_guard_loads_rewraps():
    """With no install alive, ``unguard_loads`` puts the very same class attributes back; ``guard_loads`` wraps again."""
    from peft import PeftModel

    gc.collect()  # models of earlier tests, dropped without remove(), hold the guard until collected
    wrapped = {name: PeftModel.__dict__[name] for name in ("from_pretrained", "load_adapter")}
    provenance.unguard_loads()
    try:
        originals = {name: PeftModel.__dict__[name] for name in wrapped}
        assert all(originals[name] is not wrapped[name] for name in wrapped)
        assert isinstance(originals["from_pretrained"], classmethod)
    finally:
        provenance.guard_loads()
    assert all(PeftModel.__dict__[name] is not originals[name] for name in wrapped)


@pytest.fixture
def process_guard_off():
    """The process-wide load guard off (as after ``unguard_loads()``), and ``PeftModel.__dict__`` before any install."""
    from peft import PeftModel

    residue_snapshot()  # settles: class wrappers held only by installs of earlier tests come off
    provenance.unguard_loads()
    try:
        yield class_state(PeftModel)
    finally:
        provenance.guard_loads()


def test_an_install_holds_the_load_guard_and_its_removal_restores_peft_model_exactly(
    tiny_model_dir, saved_ignore: Path, process_guard_off
):
    """Process-wide guard off: while a model is patched, a load into it with another policy still warns;
    after its install is removed, ``PeftModel.__dict__`` is exactly as before the install (every entry)."""
    from peft import PeftModel

    before = process_guard_off
    assert class_state(PeftModel) == before
    model = st_model(tiny_model_dir("bert"))
    handle = maskpatch.apply(model, policy="extend")
    messages = load(model, saved_ignore)
    assert len(messages) == 1 and "'ignore'" in messages[0] and "policy 'extend'" in messages[0], messages
    handle.remove()
    assert class_state(PeftModel) == before
    assert load(st_model(tiny_model_dir("bert")), saved_ignore) == []  # off: an unpatched load is not checked


def test_nested_installs_keep_the_load_guard_until_the_last_is_removed(
    tiny_model_dir, saved_ignore: Path, process_guard_off
):
    """Two installs hold the guard: removing one (``maskpatch.remove``) keeps it, the last one's block exit restores
    ``PeftModel.__dict__`` exactly."""
    from peft import PeftModel

    before = process_guard_off
    first, second = st_model(tiny_model_dir("bert")), st_model(tiny_model_dir("bert"))
    with maskpatch.patched(first, policy="strip"):
        maskpatch.apply(second, policy="extend")
        assert maskpatch.remove(second)
        messages = load(first, saved_ignore)
        assert len(messages) == 1 and "policy 'strip'" in messages[0], messages
        assert class_state(PeftModel) != before
    assert class_state(PeftModel) == before


def test_an_install_dropped_without_remove_is_released_by_the_next_removal(tiny_model_dir, process_guard_off):
    """A patched model garbage collected without remove() holds nothing: the removal of another install afterwards
    leaves ``PeftModel.__dict__`` exactly as before (the load guard and every other class wrapper)."""
    from peft import PeftModel

    before = process_guard_off
    maskpatch.apply(add_prompt_learning(st_model(tiny_model_dir("bert")), m=M), policy="extend")
    assert class_state(PeftModel)["from_pretrained"] != before["from_pretrained"]  # held while it lived
    gc.collect()
    with maskpatch.patched(add_prompt_learning(st_model(tiny_model_dir("bert")), m=M), policy="extend"):
        assert class_state(PeftModel) != before
    assert class_state(PeftModel) == before


def test_doctor_reports_the_recorded_policy(tiny_model_dir, saved_ignore: Path, tmp_path: Path, capsys):
    """``maskpatch doctor MODEL --adapter DIR`` names the policy in maskpatch.json (text and JSON)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        st_model(tiny_model_dir("bert")).save(str(tmp_path / "model"))
    assert cli.main(["doctor", str(tmp_path / "model"), "--adapter", str(saved_ignore)]) == 0
    out = capsys.readouterr().out
    assert "trained with:   maskpatch policy 'ignore'" in out
    report = doctor.diagnose(tmp_path / "model", adapter_dir=saved_ignore)
    assert report.trained_with is not None and report.trained_with["policy"] == "ignore"
    assert report.trained_with["num_virtual_tokens"] == M


def test_an_unreadable_sidecar_is_reported_not_ignored(tiny_model_dir, saved_ignore: Path):
    """A sidecar with an unknown policy: read_sidecar raises SidecarError, loading warns that it is ignored."""
    (saved_ignore / SIDECAR).write_text(json.dumps({"format": 1, "policy": "sideways"}))
    with pytest.raises(maskpatch.SidecarError, match="known policy"):
        provenance.read_sidecar(saved_ignore)
    messages = load(st_model(tiny_model_dir("bert")), saved_ignore)
    assert len(messages) == 1 and "ignoring the maskpatch sidecar" in messages[0], messages
