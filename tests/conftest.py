"""Shared fixtures: the shipped demo model, loaded once, and random-weight models for strict comparisons; the
tiers (each test is marked with its folder: unit, app, process, cluster, system); and CI's rule that a missing
tool fails instead of skipping.

Starting servers: `vqa_async.testing.launch` (start_serve, start_cluster, Faults), never subprocess by hand."""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from aiohttp.test_utils import TestClient

from vqa_async.config import allow_env
from vqa_async.model.answer import Answerer
from vqa_async.model.loader import DEMO_MODEL_DIR, LoadedModel, load_model
from vqa_async.model.synth import synth

# The test suite's own VQA_* variables, not settings: allowed here, and VQA_TEST_DEMO_DIR is taken out of the
# environment that the servers the tests start inherit (they are given --model). VQA_TEST_FAULT_FILE is the
# fault injector's (faults/sitecustomize.py allows it in the processes it runs in).
allow_env("VQA_TEST_FAULT_FILE", "VQA_TEST_DEMO_DIR")
DEMO_DIR = Path(os.environ.pop("VQA_TEST_DEMO_DIR", DEMO_MODEL_DIR))

TESTS = Path(__file__).resolve().parent
TIERS = ("unit", "app", "process", "cluster", "system")
# Under CI=true a skip is a failure (a tool missing on the CI box must not pass quietly), except these: no CUDA,
# and a kernel without netem.
CI_MAY_SKIP = ("cuda", "netem")


def _ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        parts = Path(item.path).resolve().relative_to(TESTS).parts
        if len(parts) > 1 and parts[0] in TIERS:
            item.add_marker(getattr(pytest.mark, parts[0]))


def _fail_a_ci_skip(report: pytest.TestReport | pytest.CollectReport) -> None:
    if not (_ci() and report.skipped) or hasattr(report, "wasxfail"):
        return
    longrepr = report.longrepr
    reason = str(longrepr[2] if isinstance(longrepr, tuple) else longrepr)
    if not any(word in reason.lower() for word in CI_MAY_SKIP):
        report.outcome = "failed"
        report.longrepr = f"CI=true: skipping is failing here (only CUDA and netem may skip): {reason}"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> object:
    outcome = yield
    _fail_a_ci_skip(outcome.get_result())
    return None


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector: pytest.Collector) -> object:
    outcome = yield
    _fail_a_ci_skip(outcome.get_result())
    return None


# The demo model's ops are tiny: one thread is as fast, and does not thrash when the cores are busy.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def demo_dir() -> Path:
    return DEMO_DIR


@pytest.fixture(scope="session")
def demo(demo_dir: Path) -> LoadedModel:
    return load_model(demo_dir)


@pytest.fixture(scope="session")
def demo_answerer(demo: LoadedModel) -> Answerer:
    return Answerer(demo.model, demo.tokenizer, demo.device, demo.dtype)


@pytest.fixture(scope="session")
def random_demo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo architecture with random weights: every token is arbitrary, so equality is a strict test."""
    d = tmp_path_factory.mktemp("random_demo")
    synth("demo", d, dtype=torch.float32, seed=1, progress=False)
    return d


@pytest.fixture(scope="session")
def random_demo(random_demo_dir: Path) -> LoadedModel:
    return load_model(random_demo_dir)


@pytest.fixture(scope="session")
def easy_vqa_images() -> Iterator[list[Path]]:
    import easy_vqa

    paths = easy_vqa.get_test_image_paths()
    yield [Path(paths[i]) for i in sorted(paths)[:8]]


# -- the upload page in Chromium (test_page.py, test_page_security.py): a module's own fixture of the same name wins --
@pytest.fixture(scope="module")
def server(demo_dir: Path) -> Iterator[str]:
    """The real app with the demo model on a free loopback port."""
    from page_support import serve_app

    from vqa_async.config import Settings

    yield from serve_app(Settings(model=str(demo_dir), device="cpu"))


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    """Headless Chromium with JavaScript on."""
    from page_support import chrome

    yield from chrome(js=True)


@pytest.fixture(scope="module")
def browser_nojs() -> Iterator[object]:
    """Chromium with JavaScript off (content setting), so the form posts to / as plain HTML."""
    from page_support import chrome

    yield from chrome(js=False)


@pytest.fixture(scope="module")
def image() -> Path:
    """An easy-VQA test image."""
    import easy_vqa

    paths = easy_vqa.get_test_image_paths()
    return Path(paths[sorted(paths)[0]])



@pytest.fixture
def make_client(aiohttp_client: Any, demo_dir: Path) -> Callable[..., Awaitable[TestClient[Any, Any]]]:
    """The app in-process with the demo model: `await make_client(**settings)` (Settings' fields)."""
    from vqa_async.app import init_app
    from vqa_async.config import Settings

    async def make(**overrides: Any) -> TestClient[Any, Any]:
        settings = Settings(model=str(demo_dir), device="cpu", **overrides)
        return await aiohttp_client(init_app(settings), server_kwargs={"handler_cancellation": True})

    return make
