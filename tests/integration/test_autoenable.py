"""Process-wide auto-enable, driven only by environment variables in fresh interpreters.

Every test here starts this environment's own interpreter (``sys.executable``, the project's
``.venv``) or its ``maskpatch`` console script with ``MASKPATCH_*`` variables set, exactly as a user
would; nothing calls maskpatch's start-up code in-process (one test covers the programmatic
``autoenable.enable()``/``disable()`` in-process). Invariants protected:

* with ``MASKPATCH_AUTO`` unset, the installed ``maskpatch_auto.pth`` imports nothing; set, it
  imports its bootstrap only (not wrapt, torch, maskpatch or the libraries) at start;
* every bad value (and combination) gives exactly one warning and no patching, and the
  interpreter always starts, also under ``-W error`` and through ``maskpatch run``;
* with ``MASKPATCH_AUTO=1`` every sentence-transformers model and prompt-learning PeftModel
  created is patched (LoRA ones are not), with ``MASKPATCH_POLICY``'s policy, except the adapters
  ``MASKPATCH_DISABLED_ADAPTERS`` names; results equal a hand-computed reference;
* a PeftModel is never patched twice inside a sentence-transformers model, in either order;
* ``MASKPATCH_STRICT=1`` turns problems into errors where the docs say, and only there;
* ``maskpatch run`` works without the ``.pth`` and still runs the user's own ``sitecustomize``;
* child processes inherit auto-enable; a regular (non-editable) wheel install ships the ``.pth``;
* ``autoenable.disable()`` puts back the very same constructor objects.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

import pytest

from maskpatch.auto import constants
from maskpatch.handle import iter_hooks

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
TESTS = ROOT / "tests"
VARIABLES = (
    constants.MASKPATCH_AUTO,
    constants.MASKPATCH_POLICY,
    constants.MASKPATCH_STRICT,
    constants.MASKPATCH_DISABLED_ADAPTERS,
)


def clean_env(**variables: str) -> dict[str, str]:
    """This process's environment without any MASKPATCH_* or PYTHONPATH, plus ``variables``."""
    env = {k: v for k, v in os.environ.items() if k not in VARIABLES and k != "PYTHONPATH"}
    env["HF_HUB_OFFLINE"] = "1"
    env.update(variables)
    return env


def run_python(code: str, *args: str, env: dict[str, str], python: str = sys.executable, flags: tuple[str, ...] = ()):
    return subprocess.run(
        [python, *flags, "-c", textwrap.dedent(code), *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=str(ROOT),
        timeout=240,
    )


def last_json(stdout: str) -> dict:
    return json.loads(stdout.strip().splitlines()[-1])


# --- start-up: cost and bad values -----------------------------------------------------------------

START_PROBE = """
import json, sys
boot = sys.modules.get("maskpatch.auto.bootstrap")
settings = getattr(boot, "_settings", None)
print(json.dumps({
    "modules": sorted(m for m in sys.modules if m.split(".")[0] in
                      ("torch", "maskpatch", "wrapt", "sentence_transformers", "peft",
                       "transformers")),
    "patching": bool(settings is not None and settings.patching),
}))
"""


def test_constants_agree_with_the_library():
    """The policies MASKPATCH_POLICY accepts are the library's; the registry knows the adapters the docs name."""
    import maskpatch

    assert tuple(maskpatch.POLICIES) == constants.POLICY_VALUES
    assert {"sentence-transformers", "peft"} <= {a.name for a in maskpatch.registered_adapters()}


def test_pth_is_installed_next_to_the_packages_with_one_import_line():
    """The installed .pth holds one import line, guarded by the variable's documented name."""
    pth = Path(sysconfig.get_paths()["purelib"]) / "maskpatch_auto.pth"
    lines = [line for line in pth.read_text().splitlines() if line.strip() and not line.startswith("#")]
    assert len(lines) == 1 and lines[0].startswith("import ")
    assert f'"{constants.MASKPATCH_AUTO}" in os.environ' in lines[0]
    assert "maskpatch.auto.bootstrap" in lines[0]


def test_unset_variable_imports_nothing_at_start():
    """With MASKPATCH_AUTO unset the .pth line imports nothing at all (not even its bootstrap)."""
    result = run_python(START_PROBE, env=clean_env())
    assert result.returncode == 0, result.stderr
    assert last_json(result.stdout) == {"modules": [], "patching": False}
    assert result.stderr == ""


def test_set_variable_imports_only_the_bootstrap_at_start():
    """MASKPATCH_AUTO=1 imports the stdlib-only start-up modules alone (the lazy package, maskpatch.auto, its
    bootstrap and constants): wrapt, torch, maskpatch's core and the libraries wait for their import."""
    result = run_python(START_PROBE, env=clean_env(MASKPATCH_AUTO="1"))
    assert result.returncode == 0, result.stderr
    found = last_json(result.stdout)
    assert found["patching"] is True
    assert found["modules"] == ["maskpatch", "maskpatch.auto", "maskpatch.auto.bootstrap", "maskpatch.auto.constants"]
    assert result.stderr == ""


# (variables, the variables the one warning must name)
BAD_VALUES = [
    ({"MASKPATCH_AUTO": "banana"}, ["MASKPATCH_AUTO"]),
    ({"MASKPATCH_AUTO": "2"}, ["MASKPATCH_AUTO"]),
    ({"MASKPATCH_AUTO": "yes please", "MASKPATCH_STRICT": "1"}, ["MASKPATCH_AUTO"]),
    ({"MASKPATCH_AUTO": "1", "MASKPATCH_POLICY": "banana"}, ["MASKPATCH_POLICY"]),
    ({"MASKPATCH_AUTO": "1", "MASKPATCH_POLICY": "Extend please"}, ["MASKPATCH_POLICY"]),
    ({"MASKPATCH_AUTO": "1", "MASKPATCH_POLICY": "\u00e9tendre\u2603"}, ["MASKPATCH_POLICY"]),
    ({"MASKPATCH_AUTO": "1", "MASKPATCH_STRICT": "maybe"}, ["MASKPATCH_STRICT"]),
    (
        {"MASKPATCH_AUTO": "1", "MASKPATCH_POLICY": "banana", "MASKPATCH_STRICT": "maybe"},
        ["MASKPATCH_POLICY", "MASKPATCH_STRICT"],
    ),
    ({"MASKPATCH_AUTO": "1", "MASKPATCH_POLICY": "banana", "MASKPATCH_STRICT": "1"}, ["MASKPATCH_POLICY"]),
]


@pytest.mark.parametrize("flags", [(), ("-W", "error")], ids=["default", "W-error"])
def test_interpreter_starts_with_every_bad_value(flags):
    """Each bad value (and combination) leaves the interpreter working, with one warning naming it, and no patching."""
    for variables, named in BAD_VALUES:
        result = run_python(START_PROBE, env=clean_env(**variables), flags=flags)
        assert result.returncode == 0, (variables, result.stderr)
        assert last_json(result.stdout)["patching"] is False, variables
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert len(lines) == 1, (variables, result.stderr)
        assert "no model will be patched" in lines[0]
        for name in named:
            assert f"{name}={variables[name]!r}" in lines[0], (variables, lines[0])


def test_good_values_in_any_spelling_start_quietly():
    """Documented spellings (any case, spaces around, empty policy) are accepted without a warning."""
    for variables, patching in [
        ({"MASKPATCH_AUTO": " TRUE ", "MASKPATCH_POLICY": "Strip"}, True),
        ({"MASKPATCH_AUTO": "on", "MASKPATCH_POLICY": "", "MASKPATCH_STRICT": "off"}, True),
        ({"MASKPATCH_AUTO": "0", "MASKPATCH_POLICY": "banana"}, False),  # off: the rest is not read
        ({"MASKPATCH_AUTO": ""}, False),
    ]:
        result = run_python(START_PROBE, env=clean_env(**variables))
        assert result.returncode == 0 and result.stderr == "", (variables, result.stderr)
        assert last_json(result.stdout)["patching"] is patching, variables


def test_child_processes_inherit_auto_enable():
    """A process started by a process with MASKPATCH_AUTO=1 starts auto-enable too."""
    code = f"""
    import subprocess, sys
    print(subprocess.run([sys.executable, "-c", {START_PROBE!r}], capture_output=True, text=True).stdout)
    """
    result = run_python(code, env=clean_env(MASKPATCH_AUTO="1", MASKPATCH_POLICY="ignore"))
    assert result.returncode == 0, result.stderr
    assert last_json(result.stdout)["patching"] is True


# --- models created with auto-enable on ------------------------------------------------------------

MODEL_PROBE = """
import json, sys, warnings
torch_at_start = "torch" in sys.modules
sys.path.insert(0, sys.argv[2])
warnings.simplefilter("ignore")
import torch
from peft import LoraConfig, PromptTuningConfig, TaskType, get_peft_model
from sentence_transformers import SentenceTransformer
from sentence_transformers.base.modules.transformer import Transformer
from sentence_transformers.sentence_transformer.modules.pooling import Pooling
from transformers import AutoModel, AutoTokenizer
import maskpatch
from maskpatch.handle import iter_hooks
warnings.filterwarnings("error", category=maskpatch.MaskpatchWarning)  # auto-enable must not warn here
from helpers import peft_token_embeddings, policy_mask, pool_by_hand, encode

path, M = sys.argv[1], 4
TEXTS = ["hello world", "a considerably longer sentence, so that the first one gets padded in a batch"]
def prompt():
    torch.manual_seed(0)
    return PromptTuningConfig(task_type=TaskType.FEATURE_EXTRACTION, num_virtual_tokens=M)
def randomize(pm):
    with torch.no_grad():
        for p in pm.prompt_encoder.parameters():
            p.normal_(0, 1.0)
def st(transformer=None):
    transformer = transformer or Transformer(path)
    return SentenceTransformer(modules=[transformer, Pooling(transformer.get_embedding_dimension())], device="cpu")
def adapters(model):
    return sorted({hook.record.adapter for _, _, hook in iter_hooks(model)})
def check(model, policy):
    # batch invariance, and equality with the PEFT model run by hand and pooled as the policy says
    alone, batch = encode(model, TEXTS[:1]), encode(model, TEXTS)
    feats = model.tokenize(TEXTS)
    tokens = peft_token_embeddings(model, feats)
    pooled = tokens if policy != "strip" else tokens[:, M:]
    ref = pool_by_hand(pooled, policy_mask(feats["attention_mask"], M, policy), "mean")
    return {"batch": float((alone[0] - batch[0]).abs().max()), "ref": float((batch - ref).abs().max())}

out = {"torch_at_start": torch_at_start}

# 1. a SentenceTransformer, then a prompt-tuning adapter put on its Transformer
a = st()
out["st_patched"] = maskpatch.is_patched(a)
pm = get_peft_model(a[0].model, prompt()); randomize(pm)
out["inner_pm_patched_on_its_own"] = maskpatch.is_patched(pm)
a[0].model = pm
out["st_then_peft"] = check(a, sys.argv[3])
out["st_then_peft_adapters"] = adapters(a)

# 2. a Transformer holding a PeftModel first, the SentenceTransformer around it after
t = Transformer(path)
t.model = get_peft_model(t.model, prompt()); randomize(t.model)
out["lone_pm_adapters"] = adapters(t.model)
b = st(t)
out["peft_then_st_adapters"] = adapters(b)
out["peft_then_st"] = check(b, sys.argv[3])

# 3. bare PeftModels: prompt tuning is patched, LoRA is not
bare = get_peft_model(AutoModel.from_pretrained(path), prompt()); randomize(bare)
batch = AutoTokenizer.from_pretrained(path)(TEXTS, padding=True, return_tensors="pt")
with torch.no_grad():
    hidden = bare(**batch).last_hidden_state
out["bare_pm_patched"] = maskpatch.is_patched(bare)
out["bare_positions"] = [int(hidden.shape[1]), int(batch["attention_mask"].shape[1])]
lora_config = LoraConfig(task_type=TaskType.FEATURE_EXTRACTION, r=2, target_modules=["query"])
lora = get_peft_model(AutoModel.from_pretrained(path), lora_config)
out["lora_patched"] = maskpatch.is_patched(lora)

# 4. the copy of a model is patched already: no second install, and remove() is complete
maskpatch.remove(a)
out["removed"] = maskpatch.is_patched(a)
print(json.dumps(out))
"""


def run_model_probe(tiny_model_dir, policy: str, **variables: str) -> dict:
    env = clean_env(MASKPATCH_AUTO="1", **variables)
    result = run_python(MODEL_PROBE, tiny_model_dir("bert"), str(TESTS), policy, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    return last_json(result.stdout)


def test_auto_enable_patches_every_model_created(tiny_model_dir):
    """MASKPATCH_AUTO=1 alone: ST models and prompt-learning PeftModels are patched and give the reference."""
    out = run_model_probe(tiny_model_dir, "extend")
    assert out["torch_at_start"] is False
    assert out["st_patched"] is True
    for case in ("st_then_peft", "peft_then_st"):
        assert out[case]["batch"] <= 1e-5, (case, out[case])
        assert out[case]["ref"] <= 1e-5, (case, out[case])
    # one install per model: the ST one covers the PeftModel inside, in either order
    assert out["inner_pm_patched_on_its_own"] is False
    assert out["st_then_peft_adapters"] == ["sentence-transformers"]
    assert out["lone_pm_adapters"] == ["peft"]
    assert out["peft_then_st_adapters"] == ["sentence-transformers"]
    assert out["bare_pm_patched"] is True
    assert out["bare_positions"][0] == out["bare_positions"][1] + 4  # extend keeps N + M positions
    assert out["lora_patched"] is False
    assert out["removed"] is False


def test_enable_and_disable_from_code_restore_the_constructors_exactly(tiny_model_dir):
    """autoenable.enable() patches new models in this process; disable() puts back the very same __init__ objects."""
    from peft import PeftModel, PeftModelForFeatureExtraction
    from sentence_transformers.base.model import BaseModel

    import maskpatch
    from maskpatch.auto import autoenable

    from helpers import st_model

    classes = (BaseModel, PeftModel, PeftModelForFeatureExtraction)
    before = [cls.__dict__["__init__"] for cls in classes]
    assert not autoenable.is_enabled()
    for _ in range(2):  # a second enable after disable works the same
        try:
            autoenable.enable(policy="strip")
            assert all(cls.__dict__["__init__"] is not b for cls, b in zip(classes, before, strict=True))
            model = st_model(tiny_model_dir("bert"))
            assert maskpatch.is_patched(model)
            assert {hook.record.policy for _, _, hook in iter_hooks(model)} == {"strip"}
        finally:
            autoenable.disable()
        assert all(cls.__dict__["__init__"] is b for cls, b in zip(classes, before, strict=True))
        assert not maskpatch.is_patched(st_model(tiny_model_dir("bert")))
        assert maskpatch.is_patched(model)  # models patched so far stay patched


# --- strict mode ------------------------------------------------------------------------------

PEFT_PROBE = """
import json, sys, warnings
import maskpatch
from maskpatch import MaskpatchError
if len(sys.argv) > 2:  # replace the PEFT adapter by one that cannot patch anything
    from maskpatch.adapters.peft import PeftAdapter
    class Failing(PeftAdapter):
        def plan(self, model, record):
            raise MaskpatchError("this adapter cannot patch " + type(model).__name__)
    maskpatch.register_adapter(Failing(), replace=True)
from peft import PromptTuningConfig, TaskType, get_peft_model
from transformers import AutoModel
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    config = PromptTuningConfig(task_type=TaskType.FEATURE_EXTRACTION, num_virtual_tokens=4)
    pm = get_peft_model(AutoModel.from_pretrained(sys.argv[1]), config)
print(json.dumps({"patched": maskpatch.is_patched(pm),
                  "warnings": [str(w.message) for w in caught if isinstance(w.message, maskpatch.MaskpatchWarning)]}))
"""


@pytest.fixture
def stand_in_peft(tmp_path) -> str:
    """A folder with an empty module called ``peft``: importing it fires the post-import hooks like
    the real library does, in a fraction of the time (the import itself is what is tested)."""
    (tmp_path / "peft.py").write_text("")
    return str(tmp_path)


def test_unknown_disabled_adapter_warns_once_and_patches_nothing(stand_in_peft):
    """A name no adapter has is a bad value: one warning when the library is imported, and auto-enable stays off."""
    env = clean_env(
        MASKPATCH_AUTO="1", MASKPATCH_DISABLED_ADAPTERS="sentence-transformers,nope", PYTHONPATH=stand_in_peft
    )
    code = "import peft\nfrom maskpatch.auto import autoenable\nprint(autoenable.is_enabled())"
    result = run_python(code, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "False"
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "'nope'" in lines[0] and "auto-enable failed" in lines[0], result.stderr[-3000:]


def test_strict_unknown_disabled_adapter_fails_the_import(stand_in_peft):
    """Under MASKPATCH_STRICT=1 a name no adapter has raises PolicyError from `import peft`."""
    env = clean_env(
        MASKPATCH_AUTO="1", MASKPATCH_STRICT="1", MASKPATCH_DISABLED_ADAPTERS="nope", PYTHONPATH=stand_in_peft
    )
    result = run_python("import peft", env=env)
    assert result.returncode != 0
    assert "PolicyError" in result.stderr and "'nope'" in result.stderr


def test_strict_bad_value_starts_the_interpreter_but_fails_the_library_import(stand_in_peft):
    """STRICT=1 with a bad value: `python -c` still works (one warning); importing peft raises PolicyError."""
    env = clean_env(MASKPATCH_AUTO="1", MASKPATCH_STRICT="1", MASKPATCH_POLICY="banana", PYTHONPATH=stand_in_peft)
    started = run_python("print('ok')", env=env)
    assert started.returncode == 0 and started.stdout.strip() == "ok"
    assert len(started.stderr.strip().splitlines()) == 1
    imported = run_python("import peft", env=env)
    assert imported.returncode != 0
    assert "PolicyError" in imported.stderr and "MASKPATCH_POLICY='banana'" in imported.stderr
    relaxed = run_python("import peft", env={**env, "MASKPATCH_STRICT": "0"})
    assert relaxed.returncode == 0, relaxed.stderr


@pytest.mark.parametrize("strict", ["0", "1"])
def test_a_model_that_cannot_be_patched_warns_or_raises(tiny_model_dir, strict):
    """A failing install warns and leaves the model unpatched; under MASKPATCH_STRICT=1 the constructor raises."""
    env = clean_env(MASKPATCH_AUTO="1", MASKPATCH_STRICT=strict)
    result = run_python(PEFT_PROBE, tiny_model_dir("bert"), "fail", env=env)
    if strict == "1":
        assert result.returncode != 0
        assert "MaskpatchError: this adapter cannot patch PeftModelForFeatureExtraction" in result.stderr
        return
    assert result.returncode == 0, result.stderr[-3000:]
    out = last_json(result.stdout)
    assert out["patched"] is False
    assert len(out["warnings"]) == 1 and "cannot patch PeftModelForFeatureExtraction" in out["warnings"][0]


# --- the launcher ----------------------------------------------------------------------------------


def console_script() -> str:
    script = Path(sys.executable).with_name("maskpatch")
    assert script.exists(), f"console script not installed next to {sys.executable}"
    return str(script)


@pytest.fixture(scope="module")
def venv_without_pth(tmp_path_factory) -> Path:
    """A venv that sees this environment's packages but processes none of its .pth files.

    A ``.pth`` path line adds a folder to ``sys.path`` without reading the ``.pth`` files in it, so
    ``maskpatch_auto.pth`` never runs there: the situation PEP 829 leads to.
    """
    root = tmp_path_factory.mktemp("nopth")
    base = getattr(sys, "_base_executable", sys.executable)
    subprocess.run([base, "-m", "venv", "--without-pip", str(root / "venv")], check=True, timeout=120)
    python = root / "venv" / "bin" / "python"
    purelib = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    import maskpatch

    package_parent = Path(maskpatch.__file__).resolve().parents[1]
    ours = sysconfig.get_paths()["purelib"]
    Path(purelib, "link.pth").write_text(f"{package_parent}\n{ours}\n")
    return python


def test_launcher_works_without_the_pth_with_policy_and_disabled_adapters(venv_without_pth, tmp_path, tiny_model_dir):
    """`maskpatch run` in an interpreter that never reads maskpatch_auto.pth: models are patched with
    MASKPATCH_POLICY's policy, MASKPATCH_DISABLED_ADAPTERS is honoured, the user's sitecustomize still runs."""
    python = str(venv_without_pth)
    user = tmp_path / "user"
    user.mkdir()
    (user / "sitecustomize.py").write_text("import os\nos.environ['USER_SITECUSTOMIZE_RAN'] = 'yes'\n")
    env = clean_env(PYTHONPATH=str(user), MASKPATCH_POLICY="strip", MASKPATCH_DISABLED_ADAPTERS=" peft , ")
    # Control: in that venv MASKPATCH_AUTO=1 alone does nothing (the .pth is not read there).
    control = run_python(START_PROBE, env={**env, "MASKPATCH_AUTO": "1"}, python=python)
    assert control.returncode == 0 and last_json(control.stdout)["patching"] is False
    probe = MODEL_PROBE.replace(
        "print(json.dumps(out))", "out['user'] = os.environ.get('USER_SITECUSTOMIZE_RAN')\nprint(json.dumps(out))"
    )
    result = subprocess.run(
        [
            console_script(),
            "run",
            "--",
            python,
            "-c",
            "import os\n" + probe,
            tiny_model_dir("bert"),
            str(TESTS),
            "strip",
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=str(ROOT),
        timeout=240,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = last_json(result.stdout)
    assert out["user"] == "yes"
    assert out["st_patched"] is True
    for case in ("st_then_peft", "peft_then_st"):  # strip: the reference pools the real tokens only
        assert out[case]["batch"] <= 1e-5 and out[case]["ref"] <= 1e-5, (case, out[case])
    assert out["bare_pm_patched"] is False  # the peft adapter is disabled
    assert out["lone_pm_adapters"] == []
    assert out["bare_positions"][0] == out["bare_positions"][1] + 4


def test_launcher_options_set_the_variables():
    """--policy, --strict and --disable-adapters reach the command's environment and its auto-enable."""
    code = (
        START_PROBE + "s = sys.modules['maskpatch.auto.bootstrap']._settings\n"
        "print(json.dumps([s.policy, s.strict, sorted(s.disabled_adapters)]))\n"
    )
    result = subprocess.run(
        [
            console_script(),
            "run",
            "--policy",
            "ignore",
            "--strict",
            "--disable-adapters",
            "peft,x",
            "--",
            sys.executable,
            "-c",
            code,
        ],
        capture_output=True,
        text=True,
        env=clean_env(),
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.splitlines()[0])["patching"] is True
    assert json.loads(result.stdout.splitlines()[1]) == ["ignore", True, ["peft", "x"]]


def test_launcher_with_pth_starts_once_and_reports_bad_values_once():
    """With the .pth and the launcher both active, auto-enable starts once: one warning for a bad value."""
    env = clean_env(MASKPATCH_POLICY="banana")
    result = subprocess.run(
        [console_script(), "run", "--", sys.executable, "-c", START_PROBE],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert last_json(result.stdout)["patching"] is False
    assert len([line for line in result.stderr.splitlines() if line.strip()]) == 1


def test_launcher_usage_errors():
    """No command is a usage error (2); a missing command exits 127 like a shell; a bad --policy is refused."""
    script = console_script()
    assert subprocess.run([script, "run"], capture_output=True, timeout=120).returncode == 2
    missing = subprocess.run([script, "run", "--", "no-such-command-xyz"], capture_output=True, text=True, timeout=120)
    assert missing.returncode == 127 and "no-such-command-xyz" in missing.stderr
    bad = subprocess.run(
        [script, "run", "--policy", "banana", "--", "true"], capture_output=True, text=True, timeout=120
    )
    assert bad.returncode == 2 and "banana" in bad.stderr


# --- packaging -------------------------------------------------------------------------------------


def test_regular_wheel_installs_the_pth_and_pip_removes_it(tmp_path):
    """A regular wheel puts maskpatch_auto.pth in site-packages, it starts auto-enable there, uninstall removes it."""
    # With build isolation, as pip builds for users: the backend gets the setuptools it asks for.
    wheel_command = [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(ROOT)]
    subprocess.run(wheel_command, check=True, capture_output=True, timeout=240)
    (wheel,) = tmp_path.glob("maskpatch-*.whl")
    base = getattr(sys, "_base_executable", sys.executable)
    subprocess.run([base, "-m", "venv", "--without-pip", str(tmp_path / "venv")], check=True, timeout=120)
    python = str(tmp_path / "venv" / "bin" / "python")
    pip = [sys.executable, "-m", "pip", "--python", python]
    # Without PYTHONPATH: a checkout on it (with the egg-info the build leaves) would pass for installed.
    pip_env = clean_env()
    subprocess.run(
        [*pip, "install", "--no-deps", "-q", str(wheel)], check=True, capture_output=True, timeout=240, env=pip_env
    )
    purelib = Path(
        run_python(
            "import sysconfig; print(sysconfig.get_paths()['purelib'])", env=clean_env(), python=python
        ).stdout.strip()
    )
    assert (purelib / "maskpatch_auto.pth").read_text() == (ROOT / "maskpatch_auto.pth").read_text()
    # wrapt (the one thing the bootstrap imports) comes from this environment; no .pth of it is read
    (purelib / "00_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")  # read before maskpatch_auto.pth
    probe = START_PROBE + "print(sys.modules['maskpatch.auto.bootstrap'].__file__)\n"
    started = run_python(probe, env=clean_env(MASKPATCH_AUTO="1"), python=python)
    assert started.returncode == 0 and started.stderr == "", started.stderr
    assert json.loads(started.stdout.splitlines()[0])["patching"] is True
    assert Path(started.stdout.splitlines()[1]) == purelib / "maskpatch" / "auto" / "bootstrap.py"
    subprocess.run(
        [*pip, "uninstall", "-y", "-q", "maskpatch"], check=True, capture_output=True, timeout=240, env=pip_env
    )
    assert not (purelib / "maskpatch_auto.pth").exists()
    assert not (purelib / "maskpatch").exists()
