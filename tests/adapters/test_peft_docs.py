"""The runnable example of docs/families/peft.md runs as written and prints what the page says."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import pytest

PAGE = Path(__file__).resolve().parents[2] / "docs" / "families" / "peft.md"


def _example() -> str:
    section = PAGE.read_text(encoding="utf-8").split("## Example", 1)[1]
    return re.search(r"```python\n(.*?)```", section, flags=re.DOTALL).group(1)


@pytest.mark.filterwarnings("ignore")
def test_docs_example_runs(capsys):
    """Executing the page's example succeeds (its own asserts included) and prints the documented mask."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exec(compile(_example(), str(PAGE), "exec"), {"__name__": "peft_docs_example"})
    printed = capsys.readouterr().out
    assert "torch.Size([2, 4, 3])" in printed
    assert "tensor([[1, 1, 1, 1, 1, 1, 1, 0],\n        [1, 1, 1, 1, 1, 1, 1, 1]])" in printed
