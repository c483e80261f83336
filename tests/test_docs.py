"""The docs stay true: they build without a warning, their links resolve, their Python blocks
run, and their benchmark tables are what bench/report.py makes of bench/results.

Python blocks: each page's ```python blocks run in order, in one namespace per page, in a
fresh directory, with a fixed seed (as tests/test_guides.py does for docs/guides/). A block
that needs what a test cannot have (a GPU, a torchrun job, a long training run, files of
the reader's own) is preceded by a line `<!-- no-run: why -->`, invisible in the rendered
page; it is still compiled, so its syntax stays valid.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
DOCS = REPO / "docs"
# the guides run in tests/test_guides.py
PAGES = ["README.md"] + sorted(p.relative_to(REPO).as_posix() for p in DOCS.rglob("*.md")
                               if "guides" not in p.relative_to(DOCS).parts)

BLOCK = re.compile(r"(?:^<!-- no-run: (?P<why>.*?) -->\n)?^```python\n(?P<code>.*?)^```$", re.S | re.M)

pytestmark = pytest.mark.usefixtures("one_thread")


def python_blocks(page: Path) -> list[tuple[int, str, str | None]]:
    """(first line, code, reason not to run or None) of each ```python block, in order."""
    text = page.read_text()
    return [(text.count("\n", 0, m.start("code")) + 1, m.group("code"), m.group("why"))
            for m in BLOCK.finditer(text)]


@pytest.mark.parametrize("name", [name for name in PAGES if python_blocks(REPO / name)])
def test_python_blocks_run(name, tmp_path, monkeypatch):
    page = REPO / name
    blocks = python_blocks(page)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    torch.manual_seed(0)
    namespace: dict = {"__name__": f"docs_{re.sub(r'[^a-z0-9]', '_', name.lower())}"}
    skipped = []
    for line, code, why in blocks:
        compiled = compile("\n" * (line - 1) + code, str(page), "exec")
        if why is None:
            exec(compiled, namespace)
        else:
            skipped.append(f"line {line}: {why}")
    assert len(skipped) < len(blocks) or len(blocks) == 1, f"{name}: every block is marked no-run"


@pytest.mark.parametrize("shard", [False, True], ids=["replicated", "sharded"])
def test_the_distributed_pages_job_runs_under_torchrun(tmp_path, shard):
    from tests.helpers import free_port

    (_, code, why), = python_blocks(DOCS / "distributed.md")
    assert "torchrun" in why
    if shard:  # the switch its comment names
        assert code.count("process_group=pg)") == 1
        code = code.replace("process_group=pg)", "process_group=pg, shard=True)")
    (tmp_path / "twa_dist.py").write_text(code)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "PYTHONFAULTHANDLER": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           "twa_dist.py"]
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    printed = re.search(r"accuracy (\d\.\d{3}) on 1200 examples, 2 ranks", done.stdout)
    assert printed, done.stdout
    # what it printed is the accuracy of the weights it saved, on the whole data
    torch.manual_seed(0)
    x = torch.randn(1200, 20)
    y = x[:, :3].argmax(1)
    model = torch.nn.Sequential(torch.nn.Linear(20, 32), torch.nn.BatchNorm1d(32), torch.nn.ReLU(),
                                torch.nn.Linear(32, 3))
    model.load_state_dict(torch.load(tmp_path / "twa.pt", weights_only=True))
    with torch.no_grad():
        accuracy = (model.eval()(x).argmax(1) == y).float().mean().item()
    assert abs(accuracy - float(printed.group(1))) < 2 / 1200  # an argmax tie may fall otherwise in a batch of 32
    assert accuracy > 0.8  # the checkpoints learnt the task, and so did their average


def test_the_extractor_reads_markers_and_lines(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("x\n\n```python\na = 1\n```\n\n<!-- no-run: needs a GPU -->\n```python\nb = 2\n```\n")
    assert python_blocks(page) == [(4, "a = 1\n", None), (9, "b = 2\n", "needs a GPU")]


def _links(page: Path) -> list[str]:
    text = re.sub(r"^```.*?^```$", "", page.read_text(), flags=re.S | re.M)
    return [m.group(1) for m in re.finditer(r"\]\(([^)\s]+)\)", text)]


def test_readme_links_resolve():
    missing = []
    for target in _links(REPO / "README.md"):
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue
        path = target.split("#")[0]
        if not (REPO / path).exists():
            missing.append(target)
    assert not missing, f"README.md links to files that do not exist: {missing}"


def test_readme_is_short():
    assert len((REPO / "README.md").read_text().splitlines()) <= 300


@pytest.mark.skipif(importlib.util.find_spec("mkdocs") is None or importlib.util.find_spec("material") is None,
                    reason="mkdocs and mkdocs-material come with the test extra")
def test_the_docs_build_strict_without_warnings(tmp_path):
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}  # Material's notice about its successor, not a docs problem
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                          cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    log = done.stdout + done.stderr
    assert done.returncode == 0, log
    assert "WARNING" not in log, log
    assert (tmp_path / "site" / "index.html").is_file()


def test_the_docs_tables_match_bench_results():
    sys.path.insert(0, str(REPO / "bench"))
    try:
        import report
    finally:
        sys.path.remove(str(REPO / "bench"))
    assert report.check_pages(write=False) == [], "the tables differ from bench/results: run python " \
        "bench/report.py --write"


def test_a_table_that_lost_its_closing_marker_is_refused(tmp_path, monkeypatch):
    # render() skipped a section it could not match, so an edited table passed the check
    sys.path.insert(0, str(REPO / "bench"))
    try:
        import report
    finally:
        sys.path.remove(str(REPO / "bench"))
    rel, names = next(iter(report.PAGES.items()))
    for page in report.PAGES:
        (tmp_path / page).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / page).write_text((REPO / page).read_text())
    (tmp_path / rel).write_text((REPO / rel).read_text().replace(f"<!-- /report:{names[0]} -->", ""))
    monkeypatch.setattr(report, "REPO", tmp_path)
    with pytest.raises(SystemExit, match=f"the section {names[0]} must open .* found 1 and 0"):
        report.check_pages(write=False)


def test_a_result_from_a_changed_tree_says_so_wherever_its_commit_is_quoted():
    # the roofline sentence quoted the commit of an interleaved run without "with local changes"
    sys.path.insert(0, str(REPO / "bench"))
    try:
        import report
    finally:
        sys.path.remove(str(REPO / "bench"))
    changed = {"datetime": "2026-12-01T10:00:00+00:00", "commit": "0123456789abcdef", "clean": False}
    assert report.date_and_commit(changed) == "2026-12-01, commit 0123456 with local changes"
    assert report.stamp_line(changed, "cpu-epyc-2core").endswith("2026-12-01, commit 0123456 with local changes")
    assert report.date_and_commit({**changed, "clean": True}) == "2026-12-01, commit 0123456"
    assert report.date_and_commit(None) == "date not recorded, commit not recorded"
