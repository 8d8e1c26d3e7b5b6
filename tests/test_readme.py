"""The docs tell the truth: every results block (README.md's claims table, docs/results.md,
docs/performance.md's measured tables, docs/real-digits.md) equals what
`python docs/results.py render` writes from docs/results/*.json (and the bench rows it names),
and the README stays short.

No experiment runs here. A block whose result file is absent is skipped (it shows the
"not measured yet" placeholder until `make results` writes the file).
"""
import importlib.util
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("readme_results", ROOT / "docs" / "results.py")
results = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(results)

README_TEXT = (ROOT / "README.md").read_text()
DOC_TEXTS = {doc: doc.read_text() for doc in results.DOCS}
BLOCKS_IN_DOCS = results.doc_blocks()  # every DOCS file's blocks
RESULTS_MD = ROOT / "docs" / "results.md"
PERFORMANCE_MD = ROOT / "docs" / "performance.md"
REAL_DIGITS_MD = ROOT / "docs" / "real-digits.md"
README_MAX_LINES = 260


def _doc_of(block: str) -> Path:
    """Where each block belongs: the claims table in the README, the hardware tables in
    docs/performance.md, the real-digit tables in docs/real-digits.md, the rest in docs/results.md."""
    if block == "claims":
        return results.README
    if block in ("verified", "throughput", "roofline"):
        return PERFORMANCE_MD
    if block.startswith("real-"):
        return REAL_DIGITS_MD
    return RESULTS_MD


def _section(text: str, heading: str) -> str:
    start = text.index(f"\n{heading}\n")
    level = heading.split(" ", 1)[0]
    nxt = re.search(rf"\n#{{1,{len(level)}}} ", text[start + 1:])
    return text[start:start + 1 + nxt.start()] if nxt else text[start:]


def _rel(doc: Path) -> str:
    return doc.relative_to(ROOT).as_posix()


def test_docs_hold_every_results_file():
    assert set(results.DOCS) == {results.README, RESULTS_MD, PERFORMANCE_MD, REAL_DIGITS_MD}
    for doc in results.DOCS:
        assert doc.exists(), f"{_rel(doc)} is missing"


def test_every_block_has_markers_once_and_a_renderer():
    opened_all = []
    for doc, text in DOC_TEXTS.items():
        opened = re.findall(r"<!-- results:([\w-]+) -->", text)
        closed = re.findall(r"<!-- /results:([\w-]+) -->", text)
        assert sorted(opened) == sorted(closed), f"unpaired results markers in {_rel(doc)}"
        assert sorted(opened) == sorted(results.readme_blocks(text)), (
            f"{_rel(doc)}: a results marker pair does not enclose its block")
        for block in opened:
            assert _doc_of(block) == doc, f"block {block} is in {_rel(doc)}, it belongs in {_rel(_doc_of(block))}"
        opened_all += opened
    assert len(opened_all) == len(set(opened_all)), "a results block appears twice"
    assert set(opened_all) == set(results.BLOCKS), (
        f"the docs' blocks {sorted(opened_all)} differ from docs/results.py's {sorted(results.BLOCKS)}")


def test_readme_claims_block_is_in_its_section():
    assert "claims" in _section(README_TEXT, "## Paper claims on real digits")


def test_performance_blocks_are_in_their_sections():
    text = DOC_TEXTS[PERFORMANCE_MD]
    assert "<!-- results:verified -->" in _section(text, "## Backends verified")
    assert "<!-- results:throughput -->" in _section(text, "## Throughput on the CPU")
    assert "<!-- results:roofline -->" in _section(text, "## Roofline")


def test_readme_is_short():
    lines = README_TEXT.count("\n") + (not README_TEXT.endswith("\n"))
    assert lines <= README_MAX_LINES, (
        f"README.md has {lines} lines (at most {README_MAX_LINES}): move the detail into docs/")


def test_every_result_file_belongs_to_an_entry():
    for path in (ROOT / "docs" / "results").glob("*.json"):
        assert path.stem in results.ENTRIES, f"{path} is no entry of docs/results.py"
        rec = results.load(path.stem)
        assert rec["command"] == f"shortcut-fast {results.ENTRIES[path.stem]['command']}", (
            f"{path}: recorded for another command than the entry's; rerun `python docs/results.py run {path.stem}`")


def test_every_block_reads_an_entry_or_the_bench_file():
    for block, (files, _) in results.BLOCKS.items():
        for name in files:
            assert name in results.ENTRIES, f"block {block} reads {name}, which no entry writes"
        if not files:
            assert results.BENCH.exists(), f"block {block}: {results.BENCH} is missing"


@pytest.mark.parametrize("block", sorted(results.BLOCKS))
def test_block_matches_its_result_files(block):
    missing = [n for n in results.block_files(block) if not (results.RESULTS / f"{n}.json").exists()]
    assert not missing, (f"{', '.join(f'docs/results/{n}.json' for n in missing)} absent: run "
                         f"`python docs/results.py run {' '.join(missing)}` and commit the files")
    expected = results.render_block(block)
    assert BLOCKS_IN_DOCS.get(block) == expected, (
        f"{_rel(_doc_of(block))}'s {block} block is stale: run `python docs/results.py render`")


def test_render_is_idempotent_on_the_docs():
    for doc, text in DOC_TEXTS.items():
        assert results.render_text(text) == text, f"{_rel(doc)}: run `python docs/results.py render`"


@pytest.mark.parametrize("doc", [results.README, RESULTS_MD, PERFORMANCE_MD, REAL_DIGITS_MD], ids=_rel)
def test_prose_outside_blocks_has_no_measured_numbers(doc):
    """Numbers outside the rendered blocks would be hand-typed: only settings may appear there."""
    text = results.MARKER.sub("", DOC_TEXTS[doc])
    text = re.sub(r"`[^`]*`", "", text)  # commands and option values
    text = re.sub(r"!\[[^\]]*\]\([^)]*\)", "", text)  # figures
    suspicious = re.findall(r"\d+\.\d+\s*(?:%|x|s\b)|\d+(?:\.\d+)?x\b|\d+ min|\bTPR \d", text)
    assert not suspicious, f"{_rel(doc)}: hand-typed measurements outside the results blocks: {suspicious}"


def test_readme_python_example_runs(tmp_path):
    """The README's Python example, as printed, runs and writes what it says (about 30 s on a CPU)."""
    import json
    import os
    import subprocess
    import sys

    blocks = re.findall(r"```python\n(.*?)```", README_TEXT, re.S)
    assert len(blocks) == 1, "the README holds one Python example"
    assert len(blocks[0].strip().splitlines()) <= 12
    (tmp_path / "example.py").write_text(blocks[0])
    env = {**os.environ, "OMP_NUM_THREADS": "2", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "example.py"], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads((tmp_path / "runs" / "my-probe" / "result.json").read_text())
    assert record["command"] == "freq-probe" and record["result"]["num_classes"] == 10
    assert len(record["result"]["classes"]) == 10  # a DFM per class
    assert "band-stop" in proc.stdout
