"""The documentation's shape and its citations (pure file reads, no jax).

* README.md is a front door: at most 300 lines, one press-table row per registered press, the
  two set-up commands between the `setup:start` / `setup:end` markers, and `.ci/run` running
  the second one verbatim.
* Every repository path cited in README.md, docs/**/*.md and the docstrings and comments of
  kvjax/, models/, pallas_kernels/ and benchmarks/ exists. A cited path is one that starts with
  a top-level folder of the repository (`kvjax/...`, `docs/...`, `tests/...`, ...), resolved
  from the repository root; a relative Markdown link is resolved from its file's folder, as a
  renderer does. Globs (`tests/kvjax/test_kvzap_*.py`) and brace lists
  (`pallas_kernels/{tpu,gpu}/decode_attention.py`) must match at least one file each.
"""

import ast
import io
import itertools
import re
import tokenize
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README_MAX_LINES = 300
TOP = ("kvjax", "models", "pallas_kernels", "benchmarks", "tests", "notebooks", "docs")
CODE_DIRS = ("kvjax", "models", "pallas_kernels", "benchmarks")

# A repo path: a top-level folder, then path characters; `{a,b}` lists and `*` globs allowed.
PATH_RE = re.compile(r"(?<![\w./~-])(?:%s)/(?:[\w.*-]|\{[\w.,-]+\}|/)*" % "|".join(TOP))
LINK_RE = re.compile(r"\]\(([^)\s]+)\)")
FENCE_RE = re.compile(r"^```.*?^```", re.S | re.M)
INLINE_RE = re.compile(r"`[^`\n]+`")
# An output path (`--out docs/results/x`, "saves docs/results/x.json") need not exist yet.
OUTPUT_RE = re.compile(r"(--out[ =]|--table[ =]|saves |writes |saved to )$")
EXTENSIONS = {"py", "md", "json", "ipynb", "png", "sh", "npz", "txt", "log", "toml", "gguf"}
SETUP_RE = re.compile(r"<!-- setup:start -->\n```bash\n(.*?)\n```.*?<!-- setup:end -->", re.S)


def _expand(path: str) -> list[str]:
    """`a/{b,c}/d` -> [a/b/d, a/c/d]."""
    parts = re.split(r"\{([^}]*)\}", path)
    fixed, options = parts[0::2], [p.split(",") for p in parts[1::2]]
    return ["".join(x for pair in itertools.zip_longest(fixed, combo, fillvalue="")
                    for x in pair) for combo in itertools.product(*options)]


def _exists(path: Path | str, base: Path) -> bool:
    for p in _expand(str(path)):
        if "*" in p:
            if not any(base.glob(p)):
                return False
        elif not (base / p).exists():
            return False
    return True


def _clean(match: str) -> str:
    return match.rstrip(".,:;")


def _python_texts(path: Path) -> list[tuple[int, str]]:
    """(line, text) of every docstring and comment of a Python file."""
    source = path.read_text()
    out = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(
                    getattr(body[0], "value", None), ast.Constant) and isinstance(
                    body[0].value.value, str):
                out.append((body[0].lineno, body[0].value.value))
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            out.append((tok.start[0], tok.string))
    return out


def _cited_sources() -> list[tuple[Path, int, str]]:
    """(file, line, text) of everything whose citations are checked."""
    out = []
    docs = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
    for doc in docs:
        out.append((doc, 1, doc.read_text()))
    for folder in CODE_DIRS:
        for py in sorted((ROOT / folder).rglob("*.py")):
            out += [(py, line, text) for line, text in _python_texts(py)]
        for sh in sorted((ROOT / folder).rglob("*.sh")):
            out += [(sh, i + 1, line) for i, line in enumerate(sh.read_text().splitlines())
                    if line.lstrip().startswith("#")]
    return out


def _line_of(text: str, pos: int, first: int) -> int:
    return first + text.count("\n", 0, pos)


def test_readme_is_short():
    n = len((ROOT / "README.md").read_text().splitlines())
    assert n <= README_MAX_LINES, f"README.md has {n} lines (at most {README_MAX_LINES})"


def test_readme_has_one_row_per_registered_press():
    registry = (ROOT / "kvjax" / "presses" / "registry.py").read_text()
    body = registry[registry.index("PRESSES = {"):registry.index("def press_names")]
    names = set(re.findall(r'^    "(\w+)": \(', body, re.M))
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("\n## Presses"):]
    section = section[:section.index("\n## ", 1)]
    rows = re.findall(r"^\| `(\w+)` \|", section, re.M)
    assert len(names) > 10, names
    assert sorted(rows) == sorted(names), (sorted(rows), sorted(names))


def test_readme_setup_commands_are_what_ci_runs():
    readme = (ROOT / "README.md").read_text()
    match = SETUP_RE.search(readme)
    assert match, "README.md lacks a ```bash block right after <!-- setup:start -->"
    commands = match.group(1).splitlines()
    assert len(commands) == 2, commands
    assert commands[0].startswith("pip install -e . ") and commands[0].endswith("kvjax demo")
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert commands[1] in ci, ".ci/run does not run the README's test command verbatim"


def _code_spans(text: str) -> list[tuple[int, int]]:
    """(start, end) of fenced blocks and inline code spans."""
    spans = [m.span() for m in FENCE_RE.finditer(text)]
    rest = FENCE_RE.sub(lambda m: " " * len(m.group(0)), text)
    return spans + [m.span() for m in INLINE_RE.finditer(rest)]


def _is_citation(text: str, start: int, cited: str, spans) -> bool:
    """A path is cited (not an output path or a word pair like "kvjax/transformers") when it
    names a file with an extension, a folder with a trailing slash, or sits in code."""
    before = text[max(0, start - 12):start].lower()
    if OUTPUT_RE.search(before):
        return False
    last = cited.rstrip("/").rsplit("/", 1)[-1]
    if cited.endswith("/") or ("." in last and last.rsplit(".", 1)[1] in EXTENSIONS):
        return True
    return any(a <= start < b for a, b in spans)


def test_every_cited_repository_path_exists():
    missing = []
    for path, first, text in _cited_sources():
        rel = path.relative_to(ROOT)
        spans = _code_spans(text)
        for m in PATH_RE.finditer(text):
            cited = _clean(m.group(0))
            if _is_citation(text, m.start(), cited, spans) and not _exists(cited, ROOT):
                missing.append(f"{rel}:{_line_of(text, m.start(), first)}: {cited}")
        if path.suffix == ".md":  # relative links, resolved from the file's folder
            for m in LINK_RE.finditer(text):
                target = m.group(1).split("#")[0]
                if (not target or re.match(r"[a-z]+:", target) or target.startswith("/")
                        or any(a <= m.start() < b for a, b in spans)):
                    continue
                if not _exists(Path(path.parent.relative_to(ROOT)) / target, ROOT):
                    missing.append(f"{rel}:{_line_of(text, m.start(), first)}: link {target}")
    assert not missing, "cited paths that do not exist:\n" + "\n".join(sorted(set(missing)))
