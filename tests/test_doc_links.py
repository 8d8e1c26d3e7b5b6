"""Every file or section the docs and the code cite exists in the repository.

- Markdown files (README.md, docs/, examples/, bench/, ...): every relative link target
  `[text](path)`, `[text](path#anchor)`, `[text](#anchor)` and `[ref]: path` exists, inside
  the repository, and its anchor is a heading of the target file (GitHub's slug rules); every
  bare mention of a `*.md` file name (`docs/cli.md`, `EXPERIMENTS.md`) names a file of the
  repository, relative to the repository root or to the mentioning file.
- Docstrings and comments of the .py, .cpp, .cu, .h and .sh files: every cited `*.md` file
  exists the same way, and the section it names (`docs/experiments.md#feature-complexity`,
  `FILE.md section "Title"`, `FILE.md, "Title"`, `FILE.md section 2`, `FILE.md's Title
  section`) is a heading of that file.

Failures list file:line and the missing target.
"""
from __future__ import annotations

import io
import re
import sys
import tokenize
from pathlib import Path
from urllib.parse import unquote

import pytest

ROOT = Path(__file__).resolve().parent.parent
SKIP_DIRS = {".venv", "venv", "build", "dist", "runs", "node_modules", "__pycache__"}
CODE_SUFFIXES = {".py", ".cpp", ".cu", ".h", ".sh"}
FENCE = re.compile(r"^\s*(```|~~~)")
ATX = re.compile(r"^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
INLINE_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^()\s<>]*(?:\([^()\s]*\)[^()\s<>]*)*)>?(?:\s+[\"'(][^)]*)?\)")
REF_DEF = re.compile(r"^ {0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+[\"'(].*)?$")
URL = re.compile(r"\b[a-z][a-z0-9+.-]*://\S+", re.I)
MD_NAME = r"(?<![\w./-])((?:\.{1,2}/)?(?:[\w.-]+/)*[\w.-]*[\w-]\.md)(?![\w-])"
MD_MENTION = re.compile(MD_NAME + r"(?:#([\w-]+))?")
# A citation in code: FILE.md, then optionally #anchor, section "T", section N, , "T", 's T section
CODE_CITATION = re.compile(
    MD_NAME + r"(?:#(?P<anchor>[\w-]+)"
    r"|,?\s+section\s+\"(?P<quoted>[^\"]+)\""
    r"|,?\s+section\s+(?P<number>\d+(?:\.\d+)*)"
    r"|,\s+\"(?P<title>[^\"]+)\""
    r"|'s\s+(?P<named>[A-Z][\w`' -]*?)\s+section\b)?")


# ---------------------------------------------------------------------------------------
# Markdown: headings and their anchors


def _without_fences(text: str) -> list[tuple[int, str]]:
    """(line number, line) of every line outside fenced code blocks."""
    out, fence = [], None
    for i, line in enumerate(text.split("\n"), 1):
        m = FENCE.match(line)
        if m:
            if fence is None:
                fence = m.group(1)
            elif m.group(1) == fence:
                fence = None
            continue
        if fence is None:
            out.append((i, line))
    return out


def _plain(heading: str) -> str:
    """The text GitHub renders for a heading's markdown."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # links and images: their text
    text = re.sub(r"<[^>]+>", "", text)  # inline html
    return text.replace("`", "")


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = _plain(heading).strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def headings(text: str) -> list[str]:
    lines = _without_fences(text)
    out = []
    for k, (i, line) in enumerate(lines):
        m = ATX.match(line)
        if m:
            out.append(m.group(2))
            continue
        # setext: a paragraph line underlined by === or ---
        if re.fullmatch(r"\s*(=+|-{3,})\s*", line) and k and lines[k - 1][0] == i - 1:
            prev = lines[k - 1][1]
            if prev.strip() and not prev.lstrip().startswith(("|", "-", "*", ">", "#")):
                out.append(prev.strip())
    return out


def anchors(text: str) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for h in headings(text):
        s = slug(h)
        n = seen.get(s, 0)
        seen[s] = n + 1
        out.add(s if n == 0 else f"{s}-{n}")
    out.update(re.findall(r"<a\s+(?:name|id)=\"([^\"]+)\"", text))
    return out


_ANCHORS: dict[Path, set[str]] = {}


def _anchors_of(path: Path) -> set[str]:
    if path not in _ANCHORS:
        _ANCHORS[path] = anchors(path.read_text(encoding="utf-8", errors="replace"))
    return _ANCHORS[path]


def _headings_of(path: Path) -> list[str]:
    return headings(path.read_text(encoding="utf-8", errors="replace"))


# ---------------------------------------------------------------------------------------
# Files of the repository


def _walk(suffixes: set[str]) -> list[Path]:
    out = []

    def visit(folder: Path):
        for p in sorted(folder.iterdir()):
            if p.is_dir():
                if p.name.startswith(".") or p.name in SKIP_DIRS or p.name.endswith(".egg-info"):
                    continue
                visit(p)
            elif p.suffix in suffixes:
                out.append(p)

    visit(ROOT)
    return out


def _rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def _inside(path: Path) -> bool:
    try:
        path.resolve().relative_to(ROOT)
        return True
    except ValueError:
        return False


def _resolve(name: str, base: Path, *, root_too: bool) -> Path | None:
    """The file or folder `name` names, relative to `base` (and to the repository root when
    root_too), if it exists inside the repository."""
    candidates = [base / name] + ([ROOT / name] if root_too else [])
    for c in candidates:
        if c.exists() and _inside(c):
            return c.resolve()
    return None




# ---------------------------------------------------------------------------------------
# Checks


def check_markdown(path: Path) -> list[str]:
    """Problems of one Markdown file: broken relative links and anchors, mentions of
    *.md files that are not in the repository."""
    text = path.read_text(encoding="utf-8", errors="replace")
    problems = []
    where = _rel(path)
    for i, line in _without_fences(text):
        bare = re.sub(r"`[^`]*`", lambda m: m.group(0).replace("](", "] ("), line)  # links in code spans
        targets = [m.group(1) for m in INLINE_LINK.finditer(bare)]
        m = REF_DEF.match(line)
        if m:
            targets.append(m.group(1))
        for target in targets:
            problems += [f"{where}:{i}: {p}" for p in _check_link(target, path)]
    for i, line in enumerate(text.split("\n"), 1):
        scrubbed = INLINE_LINK.sub(lambda m: m.group(0)[:m.group(0).rfind("](")], URL.sub("", line))
        scrubbed = REF_DEF.sub("", scrubbed)
        for m in MD_MENTION.finditer(scrubbed):
            name, anchor = m.group(1), m.group(2)
            problems += [f"{where}:{i}: {p}" for p in _check_cited(name, anchor, path, root_too=True)]
    return problems


def _check_link(target: str, md: Path) -> list[str]:
    if not target or re.match(r"[a-z][a-z0-9+.-]*:", target, re.I):  # http:, https:, mailto:
        return []
    file_part, _, anchor = target.partition("#")
    file_part = unquote(file_part.split("?", 1)[0])
    if not file_part:
        return [] if anchor in _anchors_of(md) else [f"no heading for #{anchor} in {_rel(md)}"]
    if file_part.startswith("/"):
        return [f"link {target} is absolute; use a path relative to {_rel(md)}"]
    found = _resolve(file_part, md.parent, root_too=False)
    if found is None:
        outside = not _inside(md.parent / file_part)
        return [f"link target {target} " + ("is outside the repository" if outside else "does not exist")]
    if anchor and found.suffix == ".md" and anchor not in _anchors_of(found):
        return [f"link {target}: no heading with anchor #{anchor} in {_rel(found)}"]
    return []


def _check_cited(name: str, anchor: str | None, base_file: Path, *, root_too: bool,
                 quoted: str | None = None, number: str | None = None) -> list[str]:
    found = _resolve(name, base_file.parent, root_too=root_too)
    if found is None:
        return [f"cites {name}, which is not a file of the repository"]
    if not found.is_file():
        return [f"cites {name}, which is not a file"]
    if anchor and anchor not in _anchors_of(found):
        return [f"cites {name}#{anchor}: no heading with that anchor in {_rel(found)}"]
    if quoted and slug(quoted) not in _anchors_of(found):
        return [f"cites {name} section \"{quoted}\": no such heading in {_rel(found)}"]
    if number and not any(re.match(rf"{re.escape(number)}(?:[.):]|\s)", _plain(h).strip())
                          for h in _headings_of(found)):
        return [f"cites {name} section {number}: no heading numbered {number} in {_rel(found)}"]
    return []


def _python_docs_and_comments(text: str) -> list[tuple[int, str]]:
    """(first line, text) of every comment and every string that stands as a statement
    (docstrings, and bare string statements)."""
    out = []
    try:
        tokens = list(tokenize.generate_tokens(io.StringIO(text).readline))
    except (tokenize.TokenError, IndentationError, SyntaxError):
        # a file mid-edit: comments and triple-quoted strings by pattern
        for m in re.finditer(r"(\"\"\"|''')(.*?)\1", text, re.S):
            out.append((text.count("\n", 0, m.start()) + 1, m.group(0)))
        for i, line in enumerate(text.split("\n"), 1):
            c = re.search(r"(?:^|\s)(#.*)$", line)
            if c:
                out.append((i, c.group(1)))
        return out
    prev = tokenize.NEWLINE
    skip = {tokenize.NL, tokenize.COMMENT}
    for k, tok in enumerate(tokens):
        if tok.type == tokenize.COMMENT:
            out.append((tok.start[0], tok.string))
        elif tok.type == tokenize.STRING and prev in (tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT):
            nxt = next((t for t in tokens[k + 1:] if t.type not in skip), None)
            if nxt is None or nxt.type in (tokenize.NEWLINE, tokenize.ENDMARKER, tokenize.STRING):
                out.append((tok.start[0], tok.string))
        if tok.type not in skip:
            prev = tok.type
    return out


def _blank_strings(text: str, pattern: str) -> str:
    return re.sub(pattern, lambda m: re.sub(r"[^\n]", " ", m.group(0)), text)


def _c_comments(text: str) -> list[tuple[int, str]]:
    code = _blank_strings(text, r"\"(?:\\.|[^\"\\\n])*\"|'(?:\\.|[^'\\\n])'")
    return [(code.count("\n", 0, m.start()) + 1, text[m.start():m.end()])
            for m in re.finditer(r"//[^\n]*|/\*.*?\*/", code, re.S)]


def _shell_comments(text: str) -> list[tuple[int, str]]:
    out = []
    for i, line in enumerate(text.split("\n"), 1):
        if i == 1 and line.startswith("#!"):
            continue
        code = _blank_strings(line, r"\"(?:\\.|[^\"\\])*\"|'[^']*'")
        m = re.search(r"(?:^|\s)#", code)
        if m:
            out.append((i, line[m.end() - 1:]))
    return out


def docs_and_comments(path: Path) -> list[tuple[int, str]]:
    text = path.read_text(encoding="utf-8", errors="replace")
    if path.suffix == ".py":
        return _python_docs_and_comments(text)
    if path.suffix == ".sh":
        return _shell_comments(text)
    return _c_comments(text)


def check_code(path: Path) -> list[str]:
    problems = []
    for line, chunk in docs_and_comments(path):
        for m in CODE_CITATION.finditer(chunk):
            at = line + chunk.count("\n", 0, m.start())
            named = m.group("named")
            quoted = m.group("quoted") or m.group("title") or (named.replace("`", "") if named else None)
            problems += [f"{_rel(path)}:{at}: {p}" for p in
                         _check_cited(m.group(1), m.group("anchor"), path, root_too=True,
                                      quoted=quoted, number=m.group("number"))]
    return problems


# ---------------------------------------------------------------------------------------
# The tests


MARKDOWN = _walk({".md"})
CODE = [p for p in _walk(CODE_SUFFIXES) if p != Path(__file__).resolve()]  # this file quotes examples


def test_the_walk_finds_the_docs_and_the_code():
    names = {_rel(p) for p in MARKDOWN}
    assert {"README.md", "docs/results.md", "docs/real-digits.md"} <= names
    assert any(_rel(p).startswith("shortcut_fast/") for p in CODE)
    assert not any(_rel(p).startswith((".venv/", "build/", "runs/")) for p in MARKDOWN + CODE)


def test_the_code_scan_reads_docstrings_and_comments():
    chunks = docs_and_comments(ROOT / "docs" / "results.py")
    assert any("docs/real-digits.md" in text for _, text in chunks)  # the module docstring
    assert any(text.startswith("#") for _, text in chunks)  # comments
    assert not any("def render_block" in text for _, text in chunks)  # no code


def test_markdown_links_and_mentions_resolve():
    problems = [p for path in MARKDOWN for p in check_markdown(path)]
    assert not problems, "missing link targets or cited files:\n" + "\n".join(problems)


def test_code_citations_resolve():
    problems = [p for path in CODE for p in check_code(path)]
    assert not problems, "docstrings and comments cite missing files or sections:\n" + "\n".join(problems)


# ---------------------------------------------------------------------------------------
# The checker itself


@pytest.mark.parametrize("heading, expected", [
    ("`make demo`: freq-probe on synthetic-freq, B1 most distinctive",
     "make-demo-freq-probe-on-synthetic-freq-b1-most-distinctive"),
    ("Datasets (`--data`)", "datasets---data"),
    ("The synthetic band-bias finding, Syn_1 .. Syn_4", "the-synthetic-band-bias-finding-syn_1--syn_4"),
    ("Many CPUs, GPUs and machines (`torchrun`, `--nproc`)", "many-cpus-gpus-and-machines-torchrun---nproc"),
    ("[Linked](x.md) *heading*", "linked-heading"),
])
def test_slug_follows_github(heading, expected):
    assert slug(heading) == expected


def test_anchors_number_duplicates_and_skip_code_fences():
    text = "# A\n\n## Diagnosis\n\n```\n# not a heading\n```\n\n## Diagnosis\n\nSetext\n---\n"
    assert anchors(text) == {"a", "diagnosis", "diagnosis-1", "setext"}


def test_checker_reports_missing_files_and_sections(tmp_path, monkeypatch):
    root = tmp_path
    (root / "docs").mkdir()
    (root / "docs" / "a.md").write_text("# Title\n\n## Frequency shortcuts\n\n1. x\n")
    md = root / "README.md"
    md.write_text("[ok](docs/a.md#frequency-shortcuts) [bad](docs/a.md#nope) [gone](docs/b.md)\n"
                  "See EXPERIMENTS.md and `docs/a.md`.\n")
    py = root / "m.py"
    py.write_text('"""Module (docs/a.md#frequency-shortcuts; PERFORMANCE.md)."""\n'
                  'x = "NOT_CITED.md in a plain string"\n'
                  '# docs/a.md section "Title", docs/a.md section 3, docs/a.md\'s Missing section\n')
    monkeypatch.setattr(sys.modules[__name__], "ROOT", root)
    _ANCHORS.clear()
    md_problems = check_markdown(md)
    assert md_problems == ["README.md:1: link docs/a.md#nope: no heading with anchor #nope in docs/a.md",
                           "README.md:1: link target docs/b.md does not exist",
                           "README.md:2: cites EXPERIMENTS.md, which is not a file of the repository"]
    code_problems = check_code(py)
    assert code_problems == ["m.py:1: cites PERFORMANCE.md, which is not a file of the repository",
                             "m.py:3: cites docs/a.md section 3: no heading numbered 3 in docs/a.md",
                             "m.py:3: cites docs/a.md section \"Missing\": no such heading in docs/a.md"]
    _ANCHORS.clear()
