"""`vqa-async batch`: a JSONL job through a real `serve`: answers as a direct POST's, Ctrl-C half way then a rerun
answers every line once, per-line errors and exit 1, bad input refused up front, the OpenAI Batch form, no torch."""

from __future__ import annotations

import base64
import json
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from client_support import API_KEY, Serve, direct_post, serve

LINES = 200


@pytest.fixture(scope="module")
def srv(demo_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Serve]:
    # image URLs on, for the local file server of test_an_image_url_is_fetched_by_the_server
    yield from serve(demo_dir, tmp_path_factory.mktemp("batch_serve"), "--allowed-media-domains", "127.0.0.1",
                     "--allow-private-media")


@pytest.fixture(scope="module")
def job(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """200 plain lines: easy-VQA test questions about their images, paths relative to the input file."""
    import easy_vqa

    d = tmp_path_factory.mktemp("batch_job")
    (d / "images").mkdir()
    questions, _, image_ids = easy_vqa.get_test_questions()
    paths = easy_vqa.get_test_image_paths()
    with open(d / "input.jsonl", "w") as f:
        for i in range(LINES):
            src = Path(paths[image_ids[i]])
            if not (d / "images" / src.name).exists():
                shutil.copy(src, d / "images" / src.name)
            f.write(json.dumps({"custom_id": f"line-{i}", "image": f"images/{src.name}",
                                "question": questions[i]}) + "\n")
    return d / "input.jsonl"


def batch(srv: Serve, inp: Path, out: Path, *extra: str, **popen: Any) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "vqa_async.cli", "batch", str(inp), str(out), "--url", srv.url,
                             "--api-key", API_KEY, *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, **popen)


def records(out: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in out.read_text().splitlines()]


def test_a_job_runs_without_torch_and_answers_as_a_direct_post(srv: Serve, job: Path, tmp_path: Path) -> None:
    inp = tmp_path / "input.jsonl"
    inp.write_text("".join(job.read_text().splitlines(keepends=True)[:6]).replace('"images/',
                                                                                  f'"{job.parent}/images/'))
    out = tmp_path / "out.jsonl"
    code = ("import sys\nfrom vqa_async.cli import main\n"
            f"rc = main(['batch', {str(inp)!r}, {str(out)!r}, '--url', {srv.url!r}, '--api-key', {API_KEY!r}])\n"
            "assert 'torch' not in sys.modules and 'modelscope' not in sys.modules\nsys.exit(rc)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "answered 6, failed 0, skipped 0" in done.stdout and "answers/s" in done.stdout
    got = {r["custom_id"]: r for r in records(out)}
    assert len(got) == 6
    for line in map(json.loads, inp.read_text().splitlines()):
        r = got[line["custom_id"]]
        assert r["error"] is None and r["id"].startswith("batch_req_")
        assert r["response"]["status_code"] == 200 and r["response"]["request_id"]
        want = direct_post(srv.url, Path(line["image"]).read_bytes(), [line["question"]])["answer"]
        assert r["response"]["body"]["answer"] == want


def test_ctrl_c_half_way_then_a_rerun_answers_every_line_once(srv: Serve, job: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    first = batch(srv, job, out, "--concurrency", "4")
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and first.poll() is None:
        if out.exists() and out.read_bytes().count(b"\n") >= LINES // 2:
            break
        time.sleep(0.005)
    first.send_signal(signal.SIGINT)
    stdout, stderr = first.communicate(timeout=60)
    assert first.returncode == 130, stderr
    assert "interrupted" in stderr and "req/s" in stderr  # the progress bar shows the rate (and an ETA)
    assert "not sent" in stdout
    partial = records(out)  # every line whole: each was written and flushed in one piece
    assert LINES // 2 <= len(partial) < LINES
    assert all(r["error"] is None for r in partial)

    second = batch(srv, job, out)
    stdout, stderr = second.communicate(timeout=120)
    assert second.returncode == 0, stderr
    assert f"skipped {len(partial)}" in stdout and f"answered {LINES - len(partial)}," in stdout
    counts = Counter(r["custom_id"] for r in records(out))
    assert set(counts) == {f"line-{i}" for i in range(LINES)} and set(counts.values()) == {1}

    third = batch(srv, job, out)  # nothing left to do
    stdout, _ = third.communicate(timeout=60)
    assert third.returncode == 0 and f"answered 0, failed 0, skipped {LINES}" in stdout
    assert len(records(out)) == LINES


def test_a_bad_line_gets_its_error_and_the_job_exits_1(srv: Serve, job: Path, tmp_path: Path) -> None:
    (tmp_path / "junk.png").write_bytes(b"this is no image")
    good = json.loads(job.read_text().splitlines()[0])
    good["image"] = str(job.parent / good["image"])
    inp = tmp_path / "input.jsonl"
    inp.write_text("\n".join(json.dumps(x) for x in [
        good,
        {"custom_id": "junk", "image": "junk.png", "question": "what shape?"},
        {"custom_id": "missing", "image": "nowhere.png", "question": "what shape?"},
    ]) + "\n")
    out = tmp_path / "out.jsonl"
    for run in range(2):  # a rerun asks the failed lines again, not the answered one
        p = batch(srv, inp, out, "--no-progress")
        stdout, stderr = p.communicate(timeout=60)
        assert p.returncode == 1, stderr
        assert f"answered {1 - run}, failed 2" in stdout
    rs = records(out)
    by_id: dict[str, list[dict[str, Any]]] = {}
    for r in rs:
        by_id.setdefault(r["custom_id"], []).append(r)
    assert len(by_id[good["custom_id"]]) == 1 and len(by_id["junk"]) == len(by_id["missing"]) == 2
    junk = by_id["junk"][0]
    assert junk["response"]["status_code"] == 400 and junk["error"]["code"] in ("invalid_image",
                                                                                 "unsupported_image_format")
    assert junk["response"]["body"]["error"]["code"] == junk["error"]["code"]
    missing = by_id["missing"][0]
    assert missing["response"] is None and missing["error"]["code"] == "image_unreadable"


@pytest.mark.parametrize("lines, message", [
    ([{"custom_id": "a", "image": "x.png", "question": "q"}, {"custom_id": "a", "image": "y.png", "question": "q"}],
     "custom_id 'a' is also on line 1"),
    ([{"custom_id": "a", "method": "POST", "url": "/v1/embeddings", "body": {}}], "'url' must be"),
    ([{"image": "x.png", "question": "q"}], "'custom_id' must be"),
    (["not json"], "not JSON"),
])
def test_a_bad_input_is_refused_before_anything_is_sent(tmp_path: Path, lines: list[Any], message: str) -> None:
    from vqa_async.cli import main

    inp = tmp_path / "input.jsonl"
    inp.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    out = tmp_path / "out.jsonl"
    rc = main(["batch", str(inp), str(out), "--url", "http://127.0.0.1:9"])  # nobody there: nothing may be sent
    assert rc == 2 and not out.exists()
    import vqa_async.client.bulk as bj

    with pytest.raises(bj.BatchInputError, match=message):
        bj.read_input(inp)


def test_the_openai_batch_form(srv: Serve, job: Path, tmp_path: Path, easy_vqa_images: list[Path]) -> None:
    inp = tmp_path / "input.jsonl"
    lines, want = [], {}
    for i, path in enumerate(easy_vqa_images[:4]):
        data = path.read_bytes()
        url = "data:image/png;base64," + base64.b64encode(data).decode()
        body = {"model": "demo", "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "what shape is this?"}]}]}
        lines.append({"custom_id": f"chat-{i}", "method": "POST", "url": "/v1/chat/completions", "body": body})
        want[f"chat-{i}"] = direct_post(srv.url, data, ["what shape is this?"])["answer"]
    # and one the server refuses: two images in one request
    bad = json.loads(json.dumps(lines[0]))
    bad["custom_id"] = "two-images"
    bad["body"]["messages"][0]["content"].append(bad["body"]["messages"][0]["content"][0])
    inp.write_text("\n".join(json.dumps(x) for x in [*lines, bad]) + "\n")
    out = tmp_path / "out.jsonl"
    p = batch(srv, inp, out)
    stdout, stderr = p.communicate(timeout=60)
    assert p.returncode == 1, stderr
    got = {r["custom_id"]: r for r in records(out)}
    for cid, answer in want.items():
        r = got[cid]
        assert r["error"] is None and r["response"]["status_code"] == 200
        assert r["response"]["body"]["choices"][0]["message"]["content"] == answer
    refused = got["two-images"]
    assert refused["response"]["status_code"] == 400 and refused["error"]["code"]
    assert refused["error"]["code"] == refused["response"]["body"]["error"]["code"]


def test_an_image_url_is_fetched_by_the_server(srv: Serve, job: Path, tmp_path: Path) -> None:
    import functools
    import http.server
    import threading

    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(job.parent))
    files = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=files.serve_forever, daemon=True).start()
    try:
        plain = [json.loads(x) for x in job.read_text().splitlines()[:3]]
        inp = tmp_path / "input.jsonl"
        inp.write_text("\n".join(json.dumps({**x, "image": f"http://127.0.0.1:{files.server_port}/{x['image']}"})
                                 for x in plain) + "\n")
        out = tmp_path / "out.jsonl"
        p = batch(srv, inp, out, "--no-progress")
        stdout, stderr = p.communicate(timeout=60)
    finally:
        files.shutdown()
        files.server_close()
    assert p.returncode == 0, stdout + stderr
    got = {r["custom_id"]: r["response"]["body"]["answer"] for r in records(out)}
    assert got == {x["custom_id"]: direct_post(srv.url, (job.parent / x["image"]).read_bytes(), [x["question"]])[
        "answer"] for x in plain}
