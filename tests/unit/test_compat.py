"""The compat layer's pure parts: the supported ranges, the one version error, the inline-mask repair.

Invariants protected:

* one :class:`UnsupportedVersionError` names *every* library out of range (not one at a time),
  and ``apply`` raises it before looking for an adapter; ``check_versions=False`` skips it;
* only imported libraries are checked; local version labels (``2.13.0+cpu``) count as in range;
* transformers 5 with torch older than 2.6 is refused (transformers disables such a torch);
* the extras in ``pyproject.toml`` declare exactly the supported ranges, so installing maskpatch
  never moves a supported stack;
* on sentence-transformers 3.3 - 6.1 the caller's mask is taken back out of the inline extension
  (literal tensors), and an extension of another width raises :class:`DriftError`.
"""

from __future__ import annotations

import tomllib
import types
from pathlib import Path

import pytest
import torch

import maskpatch
from maskpatch.compat import versions
from maskpatch.compat.st_inline_mask import caller_mask
from maskpatch.errors import DriftError, UnsupportedVersionError

pytestmark = pytest.mark.compat

OLD = {"torch": "2.13.0+cpu", "transformers": "4.40.0", "sentence-transformers": "2.7.0", "peft": "0.12.0"}
ALL_IMPORTED = {"torch": 1, "transformers": 1, "sentence_transformers": 1, "peft": 1}


def test_one_error_names_every_library_out_of_range():
    """transformers, sentence-transformers and peft too old: all three in one message, torch not."""
    with pytest.raises(UnsupportedVersionError) as info:
        versions.check_environment(lookup=OLD.get, modules=ALL_IMPORTED)
    message = str(info.value)
    for found in ("transformers==4.40.0", "sentence-transformers==2.7.0", "peft==0.12.0"):
        assert found in message
    assert "torch==" not in message.split("out of range here:")[1]
    assert "check_versions=False" in message


def test_only_imported_libraries_are_checked():
    """An old sentence-transformers that was never imported does not block apply(peft_model)."""
    installed = {**OLD, "transformers": "5.23.0", "peft": "0.21.2"}
    versions.check_environment(lookup=installed.get, modules={"torch": 1, "transformers": 1, "peft": 1})
    with pytest.raises(UnsupportedVersionError, match=r"sentence-transformers==2\.7\.0"):
        versions.check_environment(lookup=installed.get, modules=ALL_IMPORTED)


def test_transformers_5_with_torch_older_than_2_6_is_refused():
    installed = {"torch": "2.5.1", "transformers": "5.23.0"}
    problems = versions.out_of_range(["torch", "transformers"], lookup=installed.get)
    expected = (
        "torch==2.5.1 with transformers==5.23.0 (needs torch>=2.6: transformers 5 disables PyTorch older "
        "than 2.6 (it then has no models))"
    )
    assert problems == [expected]
    assert (
        versions.out_of_range(["torch", "transformers"], lookup={"torch": "2.5.1", "transformers": "4.57.6"}.get) == []
    )


@pytest.mark.parametrize(
    ("version", "spec", "expected"),
    [
        ("2.13.0+cpu", ">=2.4", True),
        ("5.24.0", ">=4.46,<6", True),
        ("5.25.0rc1", ">=4.46,<6", True),
        ("6.0.0rc1", ">=4.46,<6", False),
        ("0.22.0", ">=0.13,<0.22", False),
        ("3.0.1", ">=3.0,<7", True),
        ("not-a-version", ">=1", False),
    ],
)
def test_in_range(version, spec, expected):
    assert versions.in_range(version, spec) is expected


def test_apply_raises_the_one_error_before_looking_for_an_adapter(monkeypatch, tiny_model_dir):
    """apply on a model checks every imported library first; check_versions=False still patches."""
    import peft  # noqa: F401  (imported: checked)
    import transformers

    model = transformers.AutoModel.from_pretrained(tiny_model_dir("bert"))
    monkeypatch.setattr(versions, "installed_version", OLD.get)
    with pytest.raises(UnsupportedVersionError) as info:
        maskpatch.apply(model)  # a plain model: no adapter matches, but the version error comes first
    assert "transformers==4.40.0" in str(info.value) and "peft==0.12.0" in str(info.value)


def test_pyproject_extras_declare_the_supported_ranges():
    """pip install maskpatch[st] must accept every supported release, and only those."""
    pyproject = tomllib.loads((Path(__file__).parents[2] / "pyproject.toml").read_text())
    st_extra = pyproject["project"]["optional-dependencies"]["st"]
    declared = dict(entry.split(">=", 1) for entry in st_extra)
    assert {dist: ">=" + spec for dist, spec in declared.items()} == {
        d: s for d, s in versions.SUPPORTED.items() if d != "torch"
    }
    assert f"torch{versions.SUPPORTED['torch']}" in pyproject["project"]["dependencies"]


def _inner(m: int, *, prompt_learning: bool = True):
    config = types.SimpleNamespace(is_prompt_learning=prompt_learning, num_virtual_tokens=m)
    return types.SimpleNamespace(active_peft_config=config)


def test_caller_mask_takes_the_callers_columns_back_out_of_the_inline_extension():
    """ST 3.3-6.1 prepended 2 ones to a (2, 3) mask: the caller's mask is the last 3 columns."""
    ids = torch.tensor([[5, 6, 7], [5, 6, 0]])
    extended = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]])
    assert torch.equal(caller_mask(extended, ids, _inner(2), where="x"), torch.tensor([[1, 1, 1], [1, 1, 0]]))
    # prefix tuning and disable_adapter(): ST extends by the config's M although nothing was prepended
    same = torch.tensor([[1, 1, 1], [1, 1, 0]])
    assert caller_mask(same, ids, _inner(2), where="x") is same


def test_caller_mask_refuses_an_extension_of_another_width():
    ids = torch.tensor([[5, 6, 7]])
    with pytest.raises(DriftError, match="attention_mask has 6 columns but input_ids 3"):
        caller_mask(torch.ones(1, 6, dtype=torch.long), ids, _inner(2), where="Transformer output")


def test_doctor_env_reports_the_installed_versions_as_json(capsys):
    """maskpatch doctor --env: the versions package metadata gives, and exit 0 on a supported stack."""
    import importlib.metadata
    import json

    from maskpatch.cli import doctor

    assert doctor.main(["--env", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    for dist in ("torch", "transformers", "sentence-transformers", "peft"):
        assert report["versions"][dist] == importlib.metadata.version(dist)
    assert report["supported"] is True and report["out_of_range"] == []


def test_doctor_env_names_what_is_out_of_range_and_the_known_problems(monkeypatch, capsys):
    """An old stack: exit 1, each out-of-range library named, and the problems of its releases listed."""
    from maskpatch.cli import doctor, doctor_env

    fake = {"torch": "2.13.0", "transformers": "4.40.0", "sentence-transformers": "3.1.0", "peft": "0.17.1"}
    monkeypatch.setattr(doctor_env, "installed_version", fake.get)
    monkeypatch.setattr(versions, "installed_version", fake.get)
    assert doctor.main(["--env"]) == 1
    out = capsys.readouterr().out
    assert "transformers           4.40.0         OUT OF RANGE (supported: transformers>=4.46,<6)" in out
    assert "not a tested row" in out
    assert "sentence-transformers <3.3: unpatched, Pooling crashes" in out
    assert "peft <0.18: peft keeps no _adapters_disabled flag" in out
