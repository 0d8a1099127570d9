"""The generated references (`python -m batchserve.docgen`) are the code's, byte for byte, and
say what the code says: every setting, metric, error class and route, as `--help`, `/metrics`
and `/openapi.json` of a default server give them."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from batchserve import docgen, errors
from batchserve.cli import build_parser
from batchserve.settings import Settings, env_name, flag_name

from conftest import ROOT

REFERENCE = ROOT / "docs" / "reference"


@pytest.fixture(scope="module")
def pages() -> dict[str, str]:
    return docgen.render()


def test_committed_references_are_the_codes(pages: dict[str, str]) -> None:
    wrong = docgen.stale(REFERENCE, pages)
    assert not wrong, (f"docs/reference/{', '.join(wrong)} differ from the code: run "
                       f"`{docgen.REGENERATE}` (python -m batchserve.docgen) and commit them")


def test_every_setting_is_listed_as_help_lists_it(pages: dict[str, str]) -> None:
    table = pages["settings.md"]
    serve = next(a for a in build_parser()._actions if a.dest == "command").choices["serve"]
    flags = {s for a in serve._actions for s in a.option_strings if s not in ("-h", "--help")}
    for f in dataclasses.fields(Settings):
        row = next(r for r in table.splitlines() if f"`{flag_name(f.name)}`" in r)
        assert f"`{env_name(f.name)}`" in row
        default = "none" if f.default is None else str(f.default)
        assert default in row, (f.name, row)
    listed = {flag for flag in flags if f"`{flag}`" in table}
    assert listed == flags  # --no-X of boolean flags included


def test_settings_rows_escape_markdown_but_keep_code() -> None:
    assert docgen._escape("width*height <= `a_b|c`") == "width\\*height \\<= `a_b\\|c`"


def test_every_metric_family_is_listed_with_its_labels(pages: dict[str, str]) -> None:
    table = pages["metrics.md"]
    assert "| `batchserve_batches_total` | counter | `trigger` (drain, full, join, timeout) |" \
        in table.replace('<a id="batchserve_batches_total"></a>', "")
    for name, kind in [("batchserve_queue_depth", "gauge"), ("http_requests_total", "counter"),
                       ("http_request_duration_seconds", "histogram"),
                       ("batchserve_batch_cap", "gauge")]:
        assert f"`{name}` | {kind} |" in table
    assert "`key`" in next(r for r in table.splitlines() if "`batchserve_batch_cap`" in r)


def test_every_error_class_is_listed(pages: dict[str, str]) -> None:
    table = pages["errors.md"]
    classes = [c for c in vars(errors).values()
               if isinstance(c, type) and issubclass(c, errors.BatchServeError)]
    assert len(classes) > 10
    for cls in classes:
        row = next(r for r in table.splitlines() if f"`{cls.__name__}`" in r)
        assert row.startswith(f"| {cls.status} |") and f"`{cls.code}`" in row
        if cls.reject_reason:
            assert f"`{cls.reject_reason}`" in row


def test_every_route_of_the_openapi_document_is_listed(pages: dict[str, str]) -> None:
    document = json.loads(pages["openapi.json"])
    assert document["openapi"].startswith("3.1")
    for path, operations in document["paths"].items():
        for method in operations:
            assert f"### {method.upper()} `{path}`" in pages["http-api.md"]
    assert "### T2IRequest" in pages["http-api.md"]


def test_check_fails_naming_the_command_and_write_repairs(tmp_path: Path,
                                                         pages: dict[str, str]) -> None:
    for name in pages:
        (tmp_path / name).write_text((REFERENCE / name).read_text())
    page = tmp_path / "settings.md"
    page.write_text(page.read_text().replace("`BATCHSERVE_MAX_WAIT_MS`", "`BATCHSERVE_X`"))
    said: list[str] = []
    assert docgen.main(["--check", "--out", str(tmp_path)], echo=said.append) == 1
    assert "settings.md" in said[0] and docgen.REGENERATE in said[0]
    before = page.read_text()
    assert docgen.main(["--out", str(tmp_path)], echo=said.append) == 0
    assert page.read_text() != before
    assert page.read_text() == (REFERENCE / "settings.md").read_text()  # prose kept too
    assert docgen.main(["--check", "--out", str(tmp_path)], echo=said.append) == 0


def test_a_page_without_markers_is_refused(tmp_path: Path) -> None:
    (tmp_path / "settings.md").write_text("# Settings\n")
    with pytest.raises(docgen.GeneratedError, match="needs the lines"):
        docgen.write(tmp_path, {"settings.md": "| a |\n"})
