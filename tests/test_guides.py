"""The guides in docs/guides/ run as written: each page's ```python blocks are executed in
order, in one namespace per page, in a fresh directory, with a fixed seed. Each page ends
with asserts on its own result, so a guide whose code stops working fails here. Models are
tiny and built from configs: nothing is downloaded."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

GUIDES = Path(__file__).resolve().parent.parent / "docs" / "guides"
PAGES = sorted(page.name for page in GUIDES.glob("*.md"))  # every page, so none is left untested

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    # raised inside lightning by its own use of torch's pytree, not by the guides
    pytest.mark.filterwarnings(r"ignore:`isinstance\(treespec, LeafSpec\)` is deprecated"),
]


def python_blocks(page: Path) -> list[tuple[int, str]]:
    """(first line, code) of each ```python block of a Markdown page, in order."""
    text = page.read_text()
    return [(text.count("\n", 0, m.start()) + 2, m.group(1))
            for m in re.finditer(r"^```python\n(.*?)^```$", text, flags=re.S | re.M)]


def run_page(page: Path) -> dict:
    """Run the page's blocks in one namespace; an error's traceback names the page and line."""
    namespace: dict = {"__name__": f"guide_{page.stem.replace('-', '_')}"}
    blocks = python_blocks(page)
    assert blocks, f"{page.name} has no python block"
    for line, code in blocks:
        exec(compile("\n" * (line - 1) + code, str(page), "exec"), namespace)
    return namespace


@pytest.mark.parametrize("name", PAGES)
def test_guide_runs(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the pages load local directories; never the hub
    torch.manual_seed(0)
    run_page(GUIDES / name)


def test_the_guides_are_found():
    assert {"huggingface.md", "lightning.md", "batchnorm-models.md"} <= set(PAGES)


def test_the_extractor_finds_every_block_and_reports_the_page_line(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("text\n\n```python\nx = 1\n```\n\n```bash\nnot python\n```\n\n```python\n"
                    "y = x + 1\nassert y == 3, 'wrong'\n```\n")
    assert [code for _, code in python_blocks(page)] == ["x = 1\n", "y = x + 1\nassert y == 3, 'wrong'\n"]
    with pytest.raises(AssertionError, match="wrong") as caught:
        run_page(page)
    frame = caught.traceback[-1]
    assert Path(str(frame.path)).name == "page.md" and frame.lineno + 1 == 13
