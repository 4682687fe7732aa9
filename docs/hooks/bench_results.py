"""MkDocs hook: the bench's plots (bench/RESULTS-*.png) belong to the manual beside bench/RESULTS.md.

docs/results.md and the plots of today are symlinks into bench/, so that the pages read the same on a forge; a
plot the bench adds later has no symlink yet, and a page or RESULTS.md that shows it would fail the strict
build. So every bench/RESULTS-*.png that docs/ lacks is added to the site here, at the top, beside results.md.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mkdocs.structure.files import File, Files


def on_files(files: Files, config: Any) -> Files:
    bench = Path(config["config_file_path"]).resolve().parent / "bench"
    for plot in sorted(bench.glob("RESULTS-*.png")):
        if files.get_file_from_path(plot.name) is None:
            files.append(File(plot.name, src_dir=str(bench), dest_dir=config["site_dir"],
                              use_directory_urls=config["use_directory_urls"]))
    return files
