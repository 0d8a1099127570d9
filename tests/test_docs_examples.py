"""Every request example the docs show runs, as shown, against a real tiny-model server.

The examples are files in docs/examples/ (`NAME.sh` with curl, `NAME.py` with a client
library), included in the guide by pymdownx.snippets (`--8<-- "examples/NAME.sh"`). Each talks
to `$BATCHSERVE_URL`, exits non-zero on failure and writes only under its working directory.
Its leading comment lines may say what the server needs: `# serve: --flush-policy continuous`;
`$EXAMPLE_DATA` (files prepared below) and `$BATCHSERVE_API_KEY` (a fixed test key, also in the
example's environment) are expanded there. Examples with the same flags share one server.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from string import Template

import pytest
from PIL import Image

from conftest import ROOT, ServerProcess, require_tool, running_server

DOCS = ROOT / "docs"
EXAMPLES = DOCS / "examples"
RUNNERS = {".sh": ["bash", "-e", "-o", "pipefail"], ".py": [sys.executable]}
IMAGE_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}
# In every example's environment and usable in `# serve:` flags: what a user exports once.
EXAMPLE_ENV = {"BATCHSERVE_API_KEY": "example-key-0123456789"}
SNIPPET = re.compile(r'--8<--\s+"([^"]+)"')


@dataclass(frozen=True)
class Example:
    path: Path
    serve: str  # the `# serve:` flags as written, before expansion

    @property
    def name(self) -> str:
        return self.path.name


def serve_flags(text: str) -> str:
    """The `# serve:` flags of the leading comment block (several lines are joined)."""
    flags = []
    for line in text.splitlines():
        if not line.startswith("#"):
            break
        body = line.lstrip("#").strip()
        if body.startswith("serve:"):
            flags.append(body.removeprefix("serve:").strip())
    return " ".join(flags)


def examples() -> list[Example]:
    found = [Example(p, serve_flags(p.read_text())) for p in EXAMPLES.iterdir()
             if p.suffix in RUNNERS]
    # Grouped by flags so each server starts once, in this (parametrized) order.
    return sorted(found, key=lambda e: (e.serve, e.name))


def prepare_example_data(root: Path) -> None:
    """What `$EXAMPLE_DATA` holds. Extend it when an example needs a file (an input image, a
    LoRA made for the tiny model...): the example names it as `$EXAMPLE_DATA/...`."""
    Image.new("RGB", (256, 256), (200, 40, 40)).save(root / "input.png")
    from loras import kohya  # a LoRA file for the tiny model, as kohya's scripts write one

    from batchserve.engines import tiny

    (root / "loras").mkdir()
    kohya(root / "loras" / "ink.safetensors", tiny.build_pipeline(), seed=1)


class Servers:
    """One tiny server at a time, restarted only when the flags change."""

    def __init__(self, tmp: Path) -> None:
        self._tmp = tmp
        self._flags: list[str] | None = None
        self._server: ServerProcess | None = None
        self._stack = contextlib.ExitStack()

    def get(self, flags: list[str]) -> ServerProcess:
        if self._server is None or flags != self._flags:
            self.close()
            self._server = self._stack.enter_context(running_server(
                "--model", "tiny", *flags, tmp_path=self._tmp, name=f"server-{len(flags)}"))
            self._flags = flags
        return self._server

    def close(self) -> None:
        self._stack.close()
        self._server = None


@pytest.fixture(scope="module")
def example_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("example_data")
    prepare_example_data(root)
    return root


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Servers]:
    pool = Servers(tmp_path_factory.mktemp("example_servers"))
    try:
        yield pool
    finally:
        pool.close()


def written_files(example: Example) -> set[str]:
    """The files a shell example names as outputs (`-o FILE`, `> FILE`)."""
    if example.path.suffix != ".sh":
        return set()
    return set(re.findall(r"(?:-o|>)\s+([\w.-]+)", example.path.read_text()))


@pytest.mark.parametrize("example", examples(), ids=lambda e: e.name)
def test_example_runs_against_a_tiny_server(example: Example, servers: Servers,
                                            example_data: Path, tmp_path: Path) -> None:
    text = example.path.read_text()
    if example.path.suffix == ".sh":
        require_tool("curl")
    if re.search(r"\bjq\b", text):
        require_tool("jq")
    variables = {"EXAMPLE_DATA": str(example_data), **EXAMPLE_ENV}
    flags = shlex.split(Template(example.serve).substitute(variables))
    server = servers.get(flags)
    work = tmp_path / "cwd"
    work.mkdir()
    proc = subprocess.run(
        [*RUNNERS[example.path.suffix], str(example.path)], cwd=work, capture_output=True,
        text=True, timeout=240, env={**os.environ, **variables, "BATCHSERVE_URL": server.url},
    )
    assert proc.returncode == 0, (
        f"{example.name} exited {proc.returncode}\nstdout:\n{proc.stdout}\n"
        f"stderr:\n{proc.stderr}\nserver log (tail):\n{server.logs()[-3000:]}")

    made = {p.name for p in work.iterdir()}
    assert written_files(example) <= made, f"{example.name} did not write {written_files(example)}"
    images = [work / n for n in made if Path(n).suffix in IMAGE_FORMATS]
    if ".png" in text or ".jpg" in text:
        assert images, f"{example.name} wrote no image"
    for image in images:
        with Image.open(image) as decoded:
            assert decoded.format == IMAGE_FORMATS[image.suffix], image.name
            decoded.verify()


def doc_pages() -> list[Path]:
    return sorted(p for p in DOCS.rglob("*.md") if "generated" not in p.parts)


def test_every_example_is_shown_in_the_docs() -> None:
    included = {target for page in doc_pages() for target in SNIPPET.findall(page.read_text())}
    for example in examples():
        assert f"examples/{example.name}" in included, (
            f"docs/examples/{example.name} is in no page: include it with "
            f'--8<-- "examples/{example.name}" in a fenced block')


# A request to the server written straight into a page, instead of an included example file.
REQUEST = re.compile(r"\bcurl\b|\bOpenAI\(|\bWebUIApi\(|\bhttpx\.(?:get|post)\(|"
                     r"\brequests\.(?:get|post)\(")
FENCE = re.compile(r"^(\s*)(```|~~~)[^\n]*\n(.*?)^\1\2\s*$", re.M | re.S)


def test_request_examples_in_the_guide_are_included_files() -> None:
    """A request example typed into a page is never run; as a file in docs/examples/ it is.
    decisions.md is a record of what was decided, not a guide, and is exempt."""
    bare = []
    for page in doc_pages():
        if page.name == "decisions.md":
            continue
        for match in FENCE.finditer(page.read_text()):
            block = match.group(3)
            if REQUEST.search(block) and not SNIPPET.search(block):
                line = page.read_text()[:match.start()].count("\n") + 1
                bare.append(f"{page.relative_to(ROOT)}:{line}")
    assert not bare, ("request examples typed into the page; move each into docs/examples/ "
                      f"and include it with --8<--: {', '.join(bare)}")
