"""The page meets a newcomer: on the demo model it says what the model can answer (easy-VQA's shapes and colours)
and offers example pictures from easy-VQA; on any other model it shows neither. In process, through the real app;
the clicks themselves are tested in Chromium (test_page.py)."""

from __future__ import annotations

import base64
import json
import re
import shutil
from pathlib import Path
from typing import Any

import pytest

from vqa_async.app import init_app
from vqa_async.config import Settings
from vqa_async.http.page import EXAMPLES, guide


def facts(demo_dir: Path) -> dict[str, Any]:
    out: dict[str, Any] = json.loads((demo_dir / EXAMPLES).read_text())
    return out


async def page_html(aiohttp_client: Any, model_dir: Path) -> str:
    client = await aiohttp_client(init_app(Settings(model=str(model_dir), device="cpu")))
    resp = await client.get("/")
    assert resp.status == 200
    return await resp.text()


def test_the_examples_are_easy_vqa_s_own_pictures_questions_and_labels(demo_dir: Path) -> None:
    import easy_vqa

    f = facts(demo_dir)
    questions, labels, image_ids = easy_vqa.get_train_questions()
    assert set(f["shapes"]) == {a for q, a in zip(questions, labels) if q.startswith("what shape")}
    assert set(f["colours"]) == {a for q, a in zip(questions, labels) if q.startswith("what color")}
    assert set(f["shapes"]) | set(f["colours"]) | {"yes", "no"} == set(easy_vqa.get_answers())
    questions, labels, image_ids = easy_vqa.get_test_questions()
    paths = easy_vqa.get_test_image_paths()
    assert len(f["examples"]) >= 3
    for ex in f["examples"]:
        n = int(re.fullmatch(r"easy-VQA test image (\d+)", ex["source"])[1])  # type: ignore[index]
        assert (demo_dir / EXAMPLES.parent / ex["file"]).read_bytes() == Path(paths[n]).read_bytes()
        assert (ex["question"], ex["answer"], n) in set(zip(questions, labels, image_ids))


async def test_the_demo_page_says_what_it_answers_and_offers_the_examples(aiohttp_client: Any,
                                                                         demo_dir: Path) -> None:
    html = await page_html(aiohttp_client, demo_dir)
    f = facts(demo_dir)
    assert 'id="guide"' in html
    for word in f["shapes"] + f["colours"]:
        assert word in html
    shown = re.findall(r'<button type="button" class="example" data-file="([^"]+)" data-question="([^"]+)">\s*'
                       r'<img src="data:image/png;base64,([^"]+)"', html)
    assert [(file, q) for file, q, _ in shown] == [(ex["file"], ex["question"]) for ex in f["examples"]]
    for (_, _, data), ex in zip(shown, f["examples"]):
        assert base64.b64decode(data) == (demo_dir / EXAMPLES.parent / ex["file"]).read_bytes()


async def test_another_model_shows_neither(aiohttp_client: Any, random_demo_dir: Path) -> None:
    """The demo's architecture with random weights: the same model class, no guide in its directory."""
    html = await page_html(aiohttp_client, random_demo_dir)
    assert 'id="guide"' not in html and "example" not in html and "easy-VQA" not in html
    assert 'id="ask"' in html  # the page itself is there


@pytest.mark.parametrize("damage", ["not json", "missing picture", "missing field"])
def test_a_broken_guide_costs_the_examples_only(demo_dir: Path, tmp_path: Path, damage: str,
                                                caplog: pytest.LogCaptureFixture) -> None:
    shutil.copytree(demo_dir / EXAMPLES.parent, tmp_path / EXAMPLES.parent)
    path = tmp_path / EXAMPLES
    f = json.loads(path.read_text())
    if damage == "not json":
        path.write_text("{")
    elif damage == "missing picture":
        (path.parent / f["examples"][0]["file"]).unlink()
    else:
        del f["shapes"]
        path.write_text(json.dumps(f))
    assert guide(tmp_path) is None
    assert "shows no examples" in caplog.text
    assert guide(demo_dir) is not None and guide(tmp_path / "elsewhere") is None
