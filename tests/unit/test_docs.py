"""The manual: it builds strictly (a broken link, anchor or image, or a page missing from the nav fails), the README
stays a landing page (at most 12 KB, every relative link resolving), and neither holds a measured figure: those
live in bench/RESULTS.md, dated and with their command, and the manual links to them."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
RESULTS = ROOT / "bench" / "RESULTS.md"
README_MAX_BYTES = 12 * 1024

# A number that is a target or a bound ("≥ 300 answers/s", "P95 ≤ 1 s") is not a measurement; nor is a digit
# inside a longer number ("1.2×" is matched whole, never as "2×").
_NOT_A_BOUND = r"(?<![\d.,])(?<![≥≤<>])(?<![≥≤<>] )"
MEASURED = {
    "a rate": re.compile(_NOT_A_BOUND + r"\d[\d,]*(\.\d+)?\s*(answers|requests|req|questions|images)/s"),
    "a ratio": re.compile(_NOT_A_BOUND + r"(\d+(\.\d+)?×(?!\d)|\d+\.\d+x\b)"),
    "a latency percentile": re.compile(r"\bP(50|90|95|99)\b[^.\n|]{0,40}?" + _NOT_A_BOUND + r"\d+(\.\d+)?\s?m?s\b"),
    "a failure count": re.compile(_NOT_A_BOUND + r"(\d[\d,]* of \d[\d,]{2,}\b"
                                                 r"|\d(?:[\d,]*\d)? (failed|failures|lost)\b)"),
    "a measured share": re.compile(_NOT_A_BOUND + r"\d+\.\d+\s?%"),
}


def measured_figures(text: str) -> list[str]:
    """Each line that holds a measured-looking figure, with what it looks like."""
    return [f"{kind}: {line.strip()}" for line in text.splitlines()
            for kind, pattern in MEASURED.items() if pattern.search(line)]


def manual_pages() -> list[Path]:
    """The manual's own pages: results.md is a symlink to bench/RESULTS.md, where the figures belong."""
    return sorted(p for p in DOCS.rglob("*.md") if not p.is_symlink())


def test_the_manual_builds_strictly(tmp_path: Path) -> None:
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1")
    run = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(tmp_path / "site")],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    site = tmp_path / "site"
    assert (site / "index.html").exists() and (site / "results" / "index.html").exists()
    assert (site / "img" / "upload-page.png").exists()
    for plot in (ROOT / "bench").glob("RESULTS-*.png"):  # every plot of the bench reaches the site
        assert (site / plot.name).read_bytes() == plot.read_bytes()


def test_the_readme_is_a_landing_page() -> None:
    size = len(README.read_bytes())
    assert size <= README_MAX_BYTES, f"README.md is {size} bytes; at most {README_MAX_BYTES}: move detail to docs/"


def test_every_relative_link_of_the_readme_resolves() -> None:
    links = re.findall(r"\]\(([^)\s]+)\)", README.read_text())
    local = [link.split("#")[0] for link in links if not re.match(r"[a-z]+:", link) and not link.startswith("#")]
    assert local, "the README links into the manual"
    missing = [link for link in local if not (ROOT / link).exists()]
    assert not missing, missing


@pytest.mark.parametrize("path", [README, *manual_pages()], ids=lambda p: str(p.relative_to(ROOT)))
def test_no_measured_figure_outside_results(path: Path) -> None:
    found = measured_figures(path.read_text())
    assert not found, (f"{path.relative_to(ROOT)} holds measured figures; put them in bench/RESULTS.md (dated, with "
                       "the command) and link there:\n" + "\n".join(found))


@pytest.mark.parametrize("line", [
    "at concurrency 32 the cluster answered 410.2 answers/s",
    "a batch job at 0.94× the bench's rate",
    "the fast decoder 1.20x that",
    "P95 1.02× [0.94–1.05]",
    "256 answers/s, P95 148 ms",
    "light P95 beside / alone 20.8 ms",
    "| a host's link down for 10 s | 0 of 1000 |",
    "without the drain, 1 of 800 was lost in one run",
    "the base replica: 85.7 % of whole answers identical",
    "106,478 requests, 3 failed",
])
def test_the_figure_check_finds_measurements(line: str) -> None:
    assert measured_figures(line), line


@pytest.mark.parametrize("line", [
    "at most 2 × `--max-batch-size` requests in flight per worker",
    "serve ≥ 3× baseline; cluster ≥ 1.2× LitServe with the lower P95; cluster ≥ 0.85× ceiling",
    "GPU: ≥ 300 answers/s through HAProxy at concurrency 128 with P95 ≤ 1 s and no failures, idle P50 ≤ 60 ms",
    "a 12 MP photo leaves Chromium as a 1008×756 JPEG",
    '# {"answer":"yellow","model":"demo","queue_ms":0.17,"compute_ms":6.42,"batch_size":1}',
    "one shape (circle, rectangle, triangle) of one of 8 colours",
    "# answered 200, failed 0, skipped 0 (already in OUTPUT); … s, … answers/s",
])
def test_the_figure_check_lets_bounds_and_examples_pass(line: str) -> None:
    assert not measured_figures(line), measured_figures(line)


def test_the_figures_are_in_results() -> None:
    """The check reads figures where they belong as figures: it would catch them if they came back."""
    assert len(measured_figures(RESULTS.read_text())) > 50
    assert (DOCS / "results.md").resolve() == RESULTS.resolve()
