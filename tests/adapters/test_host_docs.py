"""The runnable examples of docs/families/pipelines.md and docs/families/trainer.md run as written and
print what the pages say they print (the ``# ...`` lines at the end of each example)."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parents[2] / "docs" / "families"


def _example(page: Path) -> tuple[str, list[str]]:
    """The page's example code and the output it documents (its trailing ``# `` comment lines)."""
    section = page.read_text(encoding="utf-8").split("## Example", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, flags=re.DOTALL).group(1)
    lines = code.rstrip("\n").split("\n")
    printed = []
    while lines and lines[-1].startswith("# "):
        printed.insert(0, lines.pop()[2:])
    return code, printed


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("name", ["pipelines", "trainer"])
def test_docs_example_runs_and_prints_what_the_page_says(name, capsys):
    """Executing the example succeeds and its output ends with the lines the page documents."""
    page = DOCS / f"{name}.md"
    code, documented = _example(page)
    assert documented, f"{page} documents no output"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exec(compile(code, str(page), "exec"), {"__name__": f"{name}_docs_example"})
    printed = [line for line in capsys.readouterr().out.splitlines() if line.strip()]
    assert printed[-len(documented) :] == documented
