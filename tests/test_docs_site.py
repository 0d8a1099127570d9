"""The docs site builds with `mkdocs build --strict` (a broken link or anchor, a missing page or
snippet, a page left out of the nav fail it), and the README, which mkdocs does not build, stays
short, with every relative link resolving."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from conftest import ROOT

README = ROOT / "README.md"
README_MAX_LINES = 150
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def test_site_builds_strict(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert proc.returncode == 0, f"mkdocs build --strict failed:\n{proc.stderr}"
    site = tmp_path / "site"
    assert (site / "reference" / "settings" / "index.html").is_file()
    assert (site / "search" / "search_index.json").is_file()  # search is on
    # The examples are included, not left as snippet markers; the charts come along.
    started = (site / "getting-started" / "index.html").read_text()
    assert "--fail-with-body" in started and "--8&lt;--" not in started
    assert (site / "results" / "sim_gpu.png").is_file()


def slug(heading: str) -> str:
    """Python-Markdown's default `toc` slug (what GitHub's anchors also give for plain text)."""
    text = re.sub(r"[`*_]", "", heading).strip().lower()
    text = re.sub(r"[^\w\s-]", "", text)
    return re.sub(r"[-\s]+", "-", text)


def anchors(page: Path) -> set[str]:
    text = page.read_text()
    found = {slug(m) for m in re.findall(r"^#{1,6}\s+(.+?)\s*$", text, re.M)}
    return found | set(re.findall(r'id="([^"]+)"', text))


def test_readme_is_short() -> None:
    lines = README.read_text().count("\n")
    assert lines <= README_MAX_LINES, (
        f"README.md has {lines} lines (at most {README_MAX_LINES}): move detail into docs/")


def test_readme_links_resolve() -> None:
    broken = []
    for target in LINK.findall(README.read_text()):
        if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        file = (ROOT / path) if path else README
        if not file.exists() or (anchor and file.suffix == ".md" and anchor not in anchors(file)):
            broken.append(target)
    assert not broken, f"README.md links to what does not exist: {broken}"


def test_readme_curl_is_the_tested_example() -> None:
    """The README cannot include files, so its one request is the example's text, verbatim."""
    example = (ROOT / "docs" / "examples" / "t2i.sh").read_text()
    commands = "".join(line for line in example.splitlines(keepends=True)
                       if not line.startswith("#"))
    assert commands in README.read_text()
