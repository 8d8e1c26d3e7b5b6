"""README.md's Results section tells the truth: every results block equals what
`python docs/results.py render` writes from docs/results/*.json (and the bench rows it names).

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
BLOCKS_IN_README = results.doc_blocks()  # README.md's and docs/real-digits.md's


def _results_section() -> str:
    start = README_TEXT.index("\n## Results\n")
    end = README_TEXT.index("\n## ", start + 1)
    return README_TEXT[start:end]


def test_every_block_has_markers_once_and_a_renderer():
    opened_all = []
    for doc, text in DOC_TEXTS.items():
        opened = re.findall(r"<!-- results:([\w-]+) -->", text)
        closed = re.findall(r"<!-- /results:([\w-]+) -->", text)
        assert sorted(opened) == sorted(closed), f"unpaired results markers in {doc.name}"
        assert sorted(opened) == sorted(results.readme_blocks(text)), "a results marker pair does not enclose its block"
        opened_all += opened
        if doc == results.README:
            for block in opened:
                assert block in _results_section(), f"block {block} is outside the Results section"
    assert len(opened_all) == len(set(opened_all)), "a results block appears twice"
    assert set(opened_all) == set(results.BLOCKS), (
        f"the docs' blocks {sorted(opened_all)} differ from docs/results.py's {sorted(results.BLOCKS)}")


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
    assert BLOCKS_IN_README.get(block) == expected, (
        f"README.md's {block} block is stale: run `python docs/results.py render`")


def test_render_is_idempotent_on_the_docs():
    for doc, text in DOC_TEXTS.items():
        assert results.render_text(text) == text, f"{doc.name}: run `python docs/results.py render`"


def test_results_prose_outside_blocks_has_no_measured_numbers():
    """Numbers outside the rendered blocks would be hand-typed: only settings may appear there."""
    text = results.MARKER.sub("", _results_section() + DOC_TEXTS[results.DOCS[1]])
    text = re.sub(r"`[^`]*`", "", text)  # commands and option values
    text = re.sub(r"!\[[^\]]*\]\([^)]*\)", "", text)  # figures
    suspicious = re.findall(r"\d+\.\d+\s*(?:%|x|s\b)|\d+(?:\.\d+)?x\b|\d+ min|\bTPR \d", text)
    assert not suspicious, f"hand-typed measurements outside the results blocks: {suspicious}"
