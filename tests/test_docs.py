"""The repository stands on its own: ``docs/`` holds the contract, and nothing else cites a document or a
tracker entry that a reader of the repository cannot open. Reads files only (well under a second)."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"
_SKIP_DIRS = {".git", ".venv", "build", "dist", "__pycache__", ".pytest_cache"}

# Spelled so that this file does not match its own patterns.
_FORBIDDEN = {
    "a citation of the external design file": re.compile(r"\b" + "DES" + r"IGN\b"),
    "a section sign": re.compile("\u00a7"),
    "an issue number": re.compile(r"\bissues?\s*[-_#]?\s*\d", re.IGNORECASE),
}
_LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
_PATH = re.compile(r"(?<![\w./-])((?:[\w.-]+/)+[\w.-]+\.(?:py|md|sh|json|txt|toml))\b")
_BARE_PY = re.compile(r"(?<![\w./-])([A-Za-z_]\w*\.py)\b")


def _repo_files() -> list[str]:
    """Tracked files plus untracked ones git does not ignore (paths relative to the root); a walk without git."""
    try:
        out = subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            cwd=REPO, capture_output=True, text=True, check=True, timeout=30,
        ).stdout
        names = [n for n in out.split("\0") if n]
    except (OSError, subprocess.SubprocessError):
        names = []
        for root, dirs, files in os.walk(REPO):
            dirs[:] = [d for d in dirs if d not in _SKIP_DIRS and not d.endswith(".egg-info")]
            names += [os.path.relpath(os.path.join(root, f), REPO) for f in files]
    return sorted(n.replace(os.sep, "/") for n in names if (REPO / n).is_file())


FILES = _repo_files()
DOC_PAGES = sorted(DOCS.glob("*.md"))


def _text(name: str) -> str | None:
    try:
        return (REPO / name).read_text(encoding="utf-8")
    except UnicodeDecodeError:
        return None  # binary


def test_no_citation_outside_docs():
    offences = []
    for name in FILES:
        if name.startswith("docs/"):
            continue
        text = _text(name)
        if text is None:
            continue
        for number, line in enumerate(text.splitlines(), 1):
            for what, pattern in _FORBIDDEN.items():
                if pattern.search(line):
                    offences.append(f"{name}:{number}: {what}: {line.strip()[:120]}")
    assert not offences, "point to docs/ instead (e.g. 'see docs/equations.md, MTP'):\n" + "\n".join(offences)


def test_index_links_every_page_and_links_resolve():
    index = DOCS / "README.md"
    assert index.is_file(), "docs/README.md (the index) is missing"
    linked = {target.split("#")[0] for target in _LINK.findall(index.read_text(encoding="utf-8"))}
    pages = {p.name for p in DOC_PAGES} - {"README.md"}
    assert pages, "docs/ holds no page besides the index"
    assert pages <= linked, f"pages not linked from docs/README.md: {sorted(pages - linked)}"
    broken = []
    for page in DOC_PAGES:
        for target in _LINK.findall(page.read_text(encoding="utf-8")):
            path = target.split("#")[0]
            if not path or re.match(r"^[a-z]+:", path):
                continue  # an anchor in the same page, or a URL
            if not (page.parent / path).exists():
                broken.append(f"{page.name}: {target}")
    assert not broken, f"broken links: {broken}"


@pytest.mark.parametrize("page", DOC_PAGES, ids=lambda p: p.name)
def test_files_named_in_docs_exist(page):
    """A path with folders must be a repository file (or the end of one: ``attention/mla.py`` under ``plugins/``);
    a bare ``name.py`` must be the name of some repository file."""
    text = page.read_text(encoding="utf-8")
    basenames = {name.rsplit("/", 1)[-1] for name in FILES}
    missing = []
    for path in set(_PATH.findall(text)):
        if path not in FILES and not any(name.endswith("/" + path) for name in FILES):
            missing.append(path)
    for name in set(_BARE_PY.findall(text)):
        if name not in basenames:
            missing.append(name)
    assert not missing, f"{page.name} names files the repository does not have: {sorted(missing)}"
