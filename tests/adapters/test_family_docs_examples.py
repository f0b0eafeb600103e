"""The runnable examples of the key-padding, x-transformers and "Am I affected?" pages run as written.

Each page's ``## Example`` block is executed (its own asserts included) and must print what the
page says it prints, so the docs cannot drift from the code.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parents[2] / "docs"

#: page -> text the example must print (copied from the page's comments)
PAGES = {
    "families/key-padding.md": [
        "unpatched: torch refuses the mask",
        "torch.Size([2, 4, 16])",
        "tensor([[ True,  True, False, False, False,  True],\n        [ True,  True, False, False, False, False]])",
    ],
    "families/x-transformers.md": [
        "torch.Size([2, 7, 50])",
        "torch.Size([2, 4, 50]) torch.Size([2, 4, 16])",
        "tensor([[ True,  True,  True,  True,  True,  True, False],\n"
        "        [ True,  True,  True,  True,  True,  True,  True]])",
    ],
    "am-i-affected.md": [
        "logits 8 4 4 True",
        "the first 4 positions are cut from 'logits' (8 -> 4)",
        "\n1\n",
    ],
}


def _example(page: Path) -> str:
    section = page.read_text(encoding="utf-8").split("## Example", 1)[1]
    return re.search(r"```python\n(.*?)```", section, flags=re.DOTALL).group(1)


@pytest.mark.parametrize("name", sorted(PAGES))
def test_docs_example_runs_and_prints_what_the_page_says(name, capsys):
    """Executing the page's example succeeds and prints the documented values."""
    page = DOCS / name
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exec(compile(_example(page), str(page), "exec"), {"__name__": "docs_example"})
    printed = capsys.readouterr().out
    for expected in PAGES[name]:
        assert expected in printed, (name, expected, printed)
    for expected in PAGES[name]:  # the page shows the same output in its comments
        if "\n" not in expected.strip():
            assert expected.strip() in page.read_text(encoding="utf-8")
