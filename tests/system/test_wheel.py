"""The package installed the ordinary way, not editable: the wheel built from this tree, installed into a fresh
venv in a temporary directory, runs `vqa-async serve` (the page renders, a question is answered) and
`vqa-async cluster` (answered through HAProxy) from another directory. And `pip install .` (non-editable) finds
its templates too.

How the fresh venv gets its dependencies: a full `pip install` of the wheel with its dependencies (torch and
torchvision pinned as in the Makefile, from the box's local wheel mirror; several GB) took 5 min 54 s of wall
time and 79 s of CPU on the shared 2-core test box, too slow for every CI run. So the fresh venv sees the test
venv's site-packages through a .pth file listing them as plain paths (so the editable install's finder there is
not activated: only the wheel provides `vqa_async`), the wheel is installed with `--no-deps`, and the test then
checks every dependency the wheel declares is present at a version that satisfies it, as `pip check` would.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import urllib.request
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from setuptools import find_packages

from vqa_async.cluster.haproxy import find_haproxy
from vqa_async.testing.launch import start_cluster

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def pyproject_packages() -> list[str]:
    import tomllib

    return list(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])


def test_pyproject_lists_every_subpackage() -> None:
    # pyproject.toml lists the packages by hand (find cannot see the mapped template packages): a new
    # subpackage left out of it would be missing from the wheel.
    found = set(find_packages(str(REPO), include=["vqa_async*"]))
    assert found <= set(pyproject_packages()), sorted(found - set(pyproject_packages()))


def source_copy(dst: Path) -> Path:
    """The tree as a fresh clone would have it: files git tracks or would track, nothing built or ignored."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                            capture_output=True, check=True).stdout.decode().split("\0")
    for rel in filter(None, listed):
        src = REPO / rel
        if src.is_file():
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / rel)
    return dst


def fresh_venv(where: Path) -> Path:
    """A venv whose only vqa_async will be the one installed into it; third-party packages come from ours."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(where)], check=True)
    python = where / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    ours = [p for p in sys.path if p.endswith("-packages") and Path(p).is_dir()]
    assert sysconfig.get_paths()["purelib"] in ours
    # Plain paths, not site dirs: their .pth files (the editable install's finder among them) stay inactive.
    Path(site, "zz_test_venv_packages.pth").write_text("".join(p + "\n" for p in ours))
    return python


def pip(python: Path, *args: str, cwd: Path | None = None) -> None:
    # Our pip drives the fresh venv (--python); nothing is fetched (--no-deps, --no-build-isolation).
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), *args, "--no-deps", "--no-build-isolation",
                    "--no-index", "-q"], check=True, cwd=cwd)


CHECK_INSTALL = r"""
import importlib.metadata as md, sys
from pathlib import Path
from packaging.requirements import Requirement
import vqa_async
assert vqa_async.__file__.startswith(sys.prefix), vqa_async.__file__
missing = []
for text in md.requires("vqa-async") or []:
    req = Requirement(text)
    if req.marker and not req.marker.evaluate({"extra": ""}):
        continue  # an optional extra (bench, test)
    try:
        version = md.version(req.name)
    except md.PackageNotFoundError:
        missing.append(f"{req}: not installed")
        continue
    if not req.specifier.contains(version, prereleases=True):
        missing.append(f"{req}: {version} installed")
assert not missing, missing
from importlib import resources
from vqa_async.cluster.haproxy import TEMPLATE_DIR  # what vqa_async.app does for TEMPLATES too, without torch
TEMPLATES = Path(str(resources.files("vqa_async.templates")))
assert (TEMPLATES / "index.html").is_file() and (TEMPLATE_DIR / "haproxy.cfg.j2").is_file()
assert str(TEMPLATES).startswith(sys.prefix) and str(TEMPLATE_DIR).startswith(sys.prefix), (TEMPLATES, TEMPLATE_DIR)
print("ok", TEMPLATES, TEMPLATE_DIR)
"""


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    src = source_copy(tmp_path_factory.mktemp("src"))
    dist = tmp_path_factory.mktemp("dist")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index",
                    "-w", str(dist), str(src)], check=True)
    (whl,) = dist.glob("vqa_async-*.whl")
    return whl


def test_the_wheel_carries_the_templates_and_no_tests(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    assert {f"vqa_async/templates/{n}" for n in ("index.html", "page.js", "page.css")} <= set(names)
    assert "vqa_async/haproxy_templates/haproxy.cfg.j2" in names
    assert "vqa_async/demo/model.safetensors" in names
    assert "vqa_async/demo/examples/examples.json" in names  # the page's guide and pictures on the demo model
    assert not [n for n in names if n.startswith(("tests/", "bench/", "tools/", "templates/", "haproxy/"))]
    # What serves is what ships: no trainer, memory probe, load generator or certificate maker.
    assert not [n for n in names if n.rsplit("/", 1)[-1] in ("train_demo.py", "memcheck.py", "loadgen.py", "certs.py",
                                                                  "demo_examples.py")]


@pytest.fixture(scope="module")
def installed(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    python = fresh_venv(tmp_path_factory.mktemp("venv") / "v")
    pip(python, "install", str(wheel))
    away = tmp_path_factory.mktemp("elsewhere")  # not the repository: nothing found through the cwd
    out = subprocess.run([str(python), "-c", CHECK_INSTALL], cwd=away, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    yield python.parent


def _ask(url: str) -> dict:  # type: ignore[type-arg]
    import asyncio

    from bench.lib.loadgen import easy_vqa_requests, run_load

    (result,) = asyncio.run(run_load(url + "/v1/vqa", easy_vqa_requests(1), concurrency=1))
    assert result.status == 200, result.error
    return {"answer": result.answer, "served_by": result.served_by}


@pytest.mark.skipif(find_haproxy() is None, reason="needs Debian's haproxy")
def test_installed_serve_and_cluster_render_the_page_and_answer(installed: Path, tmp_path: Path) -> None:
    # One cluster of one worker: the worker is the installed `vqa-async serve`, asked directly and through
    # HAProxy (one start instead of two: each costs ~20 s of import on the shared 2-core box).
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VQA_", "PYTHONPATH"))}
    cl = start_cluster(None, "--torch-threads", "1", workers=1, exe=installed / "vqa-async", cwd=tmp_path,
                       base_env=env, home=tmp_path, timeout=240)
    try:
        front = cl.url
        (worker,) = json.loads((tmp_path / "rt" / "state.json").read_text())["workers"]
        # the worker runs the installed console script, not this checkout
        assert str(installed / "vqa-async") in Path(f"/proc/{worker['pid']}/cmdline").read_text()
        serve = f"http://127.0.0.1:{worker['port']}"
        for url in (serve, front):
            with urllib.request.urlopen(url + "/", timeout=10) as r:
                assert r.status == 200 and b"<form" in r.read()
        assert _ask(serve)["answer"]
        assert _ask(front)["served_by"] == "w0"  # HAProxy's header: the answer came through the front
    finally:
        assert cl.stop(90) == 0


def test_pip_install_dot_non_editable_finds_its_templates(tmp_path: Path) -> None:
    src = source_copy(tmp_path / "src")
    python = fresh_venv(tmp_path / "v")
    pip(python, "install", ".", cwd=src)  # the issue's `pip install .`, from the source directory itself
    shutil.rmtree(src)  # an installed package must not need its source tree
    away = tmp_path / "elsewhere"
    away.mkdir()
    out = subprocess.run([str(python), "-c", CHECK_INSTALL], cwd=away, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
