"""Every ```python block of the README and of the user guide (docs/guide.md) runs, in
order, in one namespace per block, and checks what it shows with ``assert`` lines: a block
that only printed would pass whatever fastft computed."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCUMENTS = [ROOT / "README.md", ROOT / "docs" / "guide.md"]
BLOCKS = [
    (doc.name, block)
    for doc in DOCUMENTS
    for block in re.findall(r"```python\n(.*?)```", doc.read_text(), re.S)
]


def test_readme_and_guide_have_code():
    assert {name for name, _ in BLOCKS} == {"README.md", "guide.md"} and len(BLOCKS) >= 4


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_block_runs(index, tmp_path, monkeypatch):
    name, block = BLOCKS[index]
    assert re.search(r"^assert ", block, re.M), f"{name} block {index} asserts nothing"
    monkeypatch.chdir(tmp_path)
    exec(compile(block, f"{name} block {index}", "exec"), {"__name__": "__readme__"})
