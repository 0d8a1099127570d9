"""mkdocs hook: the charts under `benchmarks/results/` are part of the site at `results/`.

The benchmarks write their charts there; copying them into `docs/` would give each chart two
copies to keep equal. A page refers to one as `results/<path>.png` from the docs root
(`../results/<path>.png` from `guides/`), and the strict build checks the link like any other.
"""

from __future__ import annotations

from pathlib import Path

from mkdocs.config.defaults import MkDocsConfig
from mkdocs.structure.files import File, Files

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def on_files(files: Files, config: MkDocsConfig) -> Files:
    for chart in sorted((BENCHMARKS / "results").rglob("*.png")):
        files.append(File(chart.relative_to(BENCHMARKS).as_posix(), src_dir=str(BENCHMARKS),
                          dest_dir=config.site_dir, use_directory_urls=config.use_directory_urls))
    return files
