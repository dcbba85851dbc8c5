"""The user documentation: a short README whose commands are the ones CI runs
and the CLI accepts, links that resolve, no development-log wording in any
file of the repository, and a help text for every command and option."""
from __future__ import annotations

import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
THIS = Path(__file__).resolve()

# Wording of the project's own development process, which user-facing files
# must not carry: work sessions, issue numbers, the tooling that provided
# GPUs and its limits, paths of a development machine.  Word boundaries keep
# "silent", "equivalent" and "blending" out of it; "pytest session" and
# "test session" (pytest's own terms) do not match.  A letter in brackets is that
# letter: it keeps these patterns from matching their own line.
FORBIDDEN = re.compile(
    r"sessio[n] [0-9]|sessio[n]s? \(|gpu sessio[n]|next sessio[n]|this sessio[n]"
    r"|issu[e] [0-9#]|issu[e]'s|devic[e] tool|devic[e][- ]minute|\bl[e]nd|\bl[e]nt\b"
    r"|/wor[k]/|MiB-per-fil[e]|at most [8] files",
    re.IGNORECASE,
)

LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")


def markdown_pages() -> list[Path]:
    return [README, *sorted((REPO / "docs").glob("*.md")), REPO / "benchmarks" / "README.md"]


def prose_lines(path: Path):
    """(line number, line) outside fenced code blocks."""
    fenced = False
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        if not fenced:
            yield n, line


def code_blocks(path: Path) -> list[str]:
    return re.findall(r"```[a-z]*\n(.*?)```", path.read_text(encoding="utf-8"), re.DOTALL)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for _, line in prose_lines(path):
        m = re.match(r"#{1,6}\s+(.*)", line)
        if m:
            base = slug(m.group(1))
            k = seen.get(base, 0)
            seen[base] = k + 1
            out.add(base if k == 0 else f"{base}-{k}")
    return out


def repository_files() -> list[Path]:
    """Tracked files and new files not ignored; skipped where there is no git checkout."""
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("not a git checkout")
    out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
                         cwd=REPO, capture_output=True, check=True).stdout.decode()
    return sorted({REPO / name for name in out.split("\0") if name})


def test_readme_is_short():
    n = len(README.read_text(encoding="utf-8").splitlines())
    assert n <= 250, f"README.md has {n} lines; details belong in docs/"


def test_no_development_log_wording():
    hits = []
    for path in repository_files():
        if path.resolve() == THIS or not path.is_file():
            continue
        blob = path.read_bytes()
        if b"\0" in blob[:8192]:
            continue  # binary (models, images)
        text = blob.decode("utf-8", errors="replace")
        for n, line in enumerate(text.splitlines(), 1):
            if FORBIDDEN.search(line):
                hits.append(f"{path.relative_to(REPO)}:{n}: {line.strip()[:120]}")
    assert not hits, "development-log wording in user-facing files:\n" + "\n".join(hits)


def test_relative_links_resolve():
    broken = []
    for page in markdown_pages():
        for n, line in prose_lines(page):
            for target in LINK.findall(line):
                if re.match(r"[a-z]+:", target):
                    continue  # http:, https:, mailto:
                file_part, _, anchor = target.partition("#")
                dest = (page.parent / file_part).resolve() if file_part else page
                where = f"{page.relative_to(REPO)}:{n}: {target}"
                if not dest.exists():
                    broken.append(f"{where} (no such file)")
                elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                    broken.append(f"{where} (no such heading)")
    assert not broken, "broken links:\n" + "\n".join(broken)


def test_readme_commands_are_what_ci_runs():
    readme = README.read_text(encoding="utf-8")
    ci = (REPO / ".ci" / "run").read_text(encoding="utf-8")
    # The two lines of the brief, and whatever else .ci/run installs.
    assert "pip install torch==2.13.0" in readme
    assert 'pip install ".[all]"' in readme
    installs = re.findall(r"^pip install (?:-q )?(.+)$", ci, re.MULTILINE)
    assert installs, "no `pip install` in .ci/run"
    for spec in installs:
        assert f"pip install {spec.strip()}" in readme, f".ci/run installs {spec!r}; README.md does not say so"
    assert re.search(r"^pytest\b", ci, re.MULTILINE), ".ci/run runs no pytest"
    setup = [b for b in code_blocks(README) if "pip install" in b]
    assert len(setup) >= 2, "README.md lost its set-up and test commands"
    assert any(b.strip().endswith("&& pytest") for b in setup), "README.md's test command is not `pytest`"


def test_readme_cli_lines_parse():
    from fer_edge.cli import build_parser

    parser = build_parser()
    bad = []
    for block in code_blocks(README):
        for line in block.replace("\\\n", " ").splitlines():
            for part in line.split("&&"):
                part = part.split(" #")[0].strip()
                if not part.startswith("fer-edge "):
                    continue
                try:
                    parser.parse_args(shlex.split(part)[1:])
                except SystemExit:
                    bad.append(part)
    assert not bad, "README.md commands the CLI rejects:\n" + "\n".join(bad)
