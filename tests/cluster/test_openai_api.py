"""The OpenAI-compatible API through OpenAI's own Python SDK (sync, async, streaming) against a real `vqa-async serve`
with keys on, and through a real cluster (HAProxy in front): the same answers as POST /v1/vqa, OpenAI's shapes for
answers, streams and errors, and the v2 health aliases."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import http.client
import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from client_support import API_KEY, Serve, direct_post, serve
from cluster_support import start_cluster, stop_cluster

from vqa_async.model.preprocess import QuestionTokenizer

QUESTIONS = ["what shape is in the image?", "what color is the shape?"]


@pytest.fixture(scope="module")
def server(demo_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Serve]:
    yield from serve(demo_dir, tmp_path_factory.mktemp("openai_serve"))


@pytest.fixture(scope="module")
def sdk(server: Serve) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0)


@pytest.fixture(scope="module")
def tokenizer(demo_dir: Path) -> QuestionTokenizer:
    return QuestionTokenizer(str(demo_dir))


def data_url(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def user(question: str, *images: str) -> list[dict[str, Any]]:
    parts: list[dict[str, Any]] = [{"type": "text", "text": question}]
    parts += [{"type": "image_url", "image_url": {"url": url}} for url in images]
    return [{"role": "user", "content": parts}]


def question_tokens(tokenizer: QuestionTokenizer, question: str) -> int:
    return int(tokenizer.encode([question]).attention_mask.sum())


def test_the_sdk_gets_v1_vqas_answers_sync_async_and_streaming(
        server: Serve, sdk: openai.OpenAI, easy_vqa_images: list[Path], tokenizer: QuestionTokenizer) -> None:
    asked = [(image, q) for image in easy_vqa_images[:2] for q in QUESTIONS]
    expected = [direct_post(server.url, image.read_bytes(), [q])["answer"] for image, q in asked]

    plain = [sdk.chat.completions.create(model="whatever", messages=user(q, data_url(image)), temperature=0.7,
                                         top_p=0.9, seed=3, presence_penalty=0.5)  # accepted, ignored
             for image, q in asked]
    assert [r.choices[0].message.content for r in plain] == expected
    for r, (_, q), answer in zip(plain, asked, expected, strict=True):
        assert r.object == "chat.completion" and r.id.startswith("chatcmpl-") and r.model == "demo" and r.created > 0
        assert r.choices[0].finish_reason == "stop" and r.choices[0].message.role == "assistant"
        assert r.usage is not None
        assert r.usage.prompt_tokens == question_tokens(tokenizer, q)  # [CLS] question [SEP]; the image not counted
        assert r.usage.completion_tokens == len(tokenizer.tokenizer.tokenize(answer)) >= 1
        assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens

    async def ask_async() -> list[str | None]:
        client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0)
        async with client:
            answers = await asyncio.gather(*(client.chat.completions.create(
                model="demo", messages=user(q, data_url(image))) for image, q in asked))
        return [r.choices[0].message.content for r in answers]

    assert asyncio.run(ask_async()) == expected

    for (image, q), answer in zip(asked, expected, strict=True):
        chunks = list(sdk.chat.completions.create(model="demo", messages=user(q, data_url(image)), stream=True,
                                                  stream_options={"include_usage": True}))
        assert chunks[0].choices[0].delta.role == "assistant"
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == answer
        assert [c.choices[0].finish_reason for c in chunks if c.choices] == [None, None, "stop"]
        assert chunks[-1].choices == [] and chunks[-1].usage is not None
        assert chunks[-1].usage.prompt_tokens == question_tokens(tokenizer, q)
        assert len({c.id for c in chunks}) == 1


def test_a_conversation_asks_its_last_user_question_about_its_one_image(
        sdk: openai.OpenAI, server: Serve, easy_vqa_images: list[Path]) -> None:
    image = easy_vqa_images[0]
    messages = [{"role": "system", "content": "You answer questions about pictures. " * 40},  # long, ignored
                *user("what shape is in the image?", data_url(image)),
                {"role": "assistant", "content": "circle"},
                {"role": "user", "content": QUESTIONS[1]}]  # a follow-up: the image stays in the first message
    r = sdk.chat.completions.create(model="demo", messages=messages)  # type: ignore[arg-type]
    assert r.choices[0].message.content == direct_post(server.url, image.read_bytes(), [QUESTIONS[1]])["answer"]


def test_max_tokens_cuts_the_answer_with_finish_reason_length(random_demo_dir: Path, easy_vqa_images: list[Path],
                                                              tmp_path: Path) -> None:
    # Random weights answer with many word pieces (the demo model's answers are one word each).
    with contextlib.contextmanager(serve)(random_demo_dir, tmp_path) as running:
        client = openai.OpenAI(base_url=running.url + "/v1", api_key=API_KEY, max_retries=0)
        tok = QuestionTokenizer(str(random_demo_dir))
        messages = user(QUESTIONS[0], data_url(easy_vqa_images[0]))
        full = client.chat.completions.create(model="x", messages=messages)  # type: ignore[arg-type]
        answer = direct_post(running.url, easy_vqa_images[0].read_bytes(), [QUESTIONS[0]])["answer"]
        assert full.choices[0].message.content == answer
        assert full.usage is not None and full.usage.completion_tokens > 2
        first_two = tok.tokenizer.convert_tokens_to_string(tok.tokenizer.tokenize(answer)[:2])
        for limit in ({"max_tokens": 2}, {"max_completion_tokens": 2}, {"max_tokens": 5, "max_completion_tokens": 2}):
            cut = client.chat.completions.create(model="x", messages=messages, **limit)  # type: ignore[arg-type]
            assert cut.choices[0].finish_reason == "length", limit
            assert cut.choices[0].message.content == first_two
            assert cut.usage is not None and cut.usage.completion_tokens == 2
        chunks = list(client.chat.completions.create(model="x", messages=messages,  # type: ignore[arg-type]
                                                     max_tokens=2, stream=True))
        assert "".join(c.choices[0].delta.content or "" for c in chunks) == first_two
        assert chunks[-1].choices[0].finish_reason == "length"


@pytest.mark.parametrize("case, param, code", [
    ("two images", "messages", "too_many_images"),
    ("two images in two messages", "messages", "too_many_images"),
    ("n=2", "n", "unsupported_parameter"),
    ("tools", "tools", "unsupported_parameter"),
    ("tool_choice", "tool_choice", "unsupported_parameter"),
    ("functions", "functions", "unsupported_parameter"),
    ("missing image", "messages", "missing_image"),
    ("no question", "messages", "missing_question"),
    ("data URL not base64", "messages", "image_url_invalid"),
    ("bad base64", "messages", "invalid_base64"),
    ("not an image", None, "invalid_image"),
    ("ftp URL", "messages", "image_url_invalid"),
    ("audio part", "messages", "unsupported_content"),
    ("max_tokens 0", "max_tokens", "invalid_field"),
    ("question too long", None, "question_too_long"),
])
def test_what_is_refused_is_a_400_in_openais_shape_with_our_code(
        sdk: openai.OpenAI, easy_vqa_images: list[Path], case: str, param: str | None, code: str) -> None:
    url = data_url(easy_vqa_images[0])
    q = QUESTIONS[0]
    body: dict[str, Any] = {
        "two images": {"messages": user(q, url, url)},
        "two images in two messages": {"messages": user(q, url) + user(q, url)},
        "n=2": {"messages": user(q, url), "n": 2},
        "tools": {"messages": user(q, url), "tools": [{"type": "function", "function": {"name": "f"}}]},
        "tool_choice": {"messages": user(q, url), "tool_choice": "auto"},
        "functions": {"messages": user(q, url), "functions": [{"name": "f", "parameters": {}}]},
        "missing image": {"messages": user(q)},
        "no question": {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}]},
        "data URL not base64": {"messages": user(q, "data:image/png,%89PNG")},
        "bad base64": {"messages": user(q, "data:image/png;base64,@@@@")},
        "not an image": {"messages": user(q, "data:image/png;base64," + base64.b64encode(b"hello").decode())},
        "ftp URL": {"messages": user(q, "ftp://example.com/a.png")},
        "audio part": {"messages": [{"role": "user", "content": [
            {"type": "text", "text": q}, {"type": "input_audio", "input_audio": {"data": "", "format": "wav"}}]}]},
        "max_tokens 0": {"messages": user(q, url), "max_tokens": 0},
        "question too long": {"messages": user("why " * 200, url)},
    }[case]
    with pytest.raises(openai.BadRequestError) as e:
        sdk.chat.completions.create(model="demo", **body)
    assert e.value.status_code == 400
    assert e.value.code == code and e.value.param == param and e.value.type == "invalid_request_error"
    err = e.value.body
    assert isinstance(err, dict) and err["message"] and err["request_id"]
    assert e.value.response.headers["X-Request-ID"] == err["request_id"]


@pytest.mark.parametrize("url", ["http://127.0.0.1:1/a.png", "HTTPS://127.0.0.1:1/a.png"])
def test_http_image_urls_are_refused_while_no_media_domain_is_allowed(sdk: openai.OpenAI, url: str) -> None:
    """Also in capitals: a URL's scheme is case-insensitive, so it reaches the fetcher's checks."""
    with pytest.raises(openai.BadRequestError) as e:
        sdk.chat.completions.create(model="demo", messages=user(QUESTIONS[0], url))
    assert e.value.code == "image_url_not_allowed"


def test_keys_apply_and_a_refusal_is_openais_401(server: Serve, easy_vqa_images: list[Path]) -> None:
    bad = openai.OpenAI(base_url=server.url + "/v1", api_key="not-a-key", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as e:
        bad.chat.completions.create(model="demo", messages=user(QUESTIONS[0], data_url(easy_vqa_images[0])))
    assert e.value.code == "unauthorized" and e.value.type == "authentication_error"
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    # No key at all: OpenAI's error shape, with our request id and the challenge.
    req = urllib.request.Request(server.url + "/v1/chat/completions", data=b"{}",
                                 headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as raw:
        urllib.request.urlopen(req, timeout=10)
    body = json.loads(raw.value.read())
    assert raw.value.code == 401 and raw.value.headers["WWW-Authenticate"].startswith("Bearer")
    assert body["error"]["code"] == "unauthorized" and body["error"]["param"] is None
    assert body["error"]["request_id"] == raw.value.headers["X-Request-ID"]


def test_models_lists_the_loaded_model(sdk: openai.OpenAI) -> None:
    models = sdk.models.list()
    assert [(m.id, m.object, m.owned_by) for m in models.data] == [("demo", "model", "vqa-async")]
    assert models.data[0].created > 0


def test_requests_are_counted_and_logged_by_route_and_client(server: Serve, sdk: openai.OpenAI,
                                                             easy_vqa_images: list[Path]) -> None:
    sdk.chat.completions.create(model="demo", messages=user(QUESTIONS[0], data_url(easy_vqa_images[1])))
    req = urllib.request.Request(server.url + "/metrics", headers={"Authorization": f"Bearer {API_KEY}"})
    with urllib.request.urlopen(req, timeout=10) as r:
        metrics = r.read().decode()
    assert 'vqa_requests_total{route="/v1/chat/completions",status="200"}' in metrics
    lines = [r for r in server.log_lines() if r["route"] == "/v1/chat/completions" and r["status"] == 200]
    assert lines and all(r["client"] == "tester" and r["questions"] == 1 and r["batch_size"] for r in lines)


def test_kserve_v2_health_routes_are_the_probes(server: Serve) -> None:
    for alias, probe in (("/v2/health/live", "/healthz"), ("/v2/health/ready", "/readyz")):
        answers = []
        for path in (alias, probe):
            with urllib.request.urlopen(server.url + path, timeout=10) as r:  # no key: open like the probes
                answers.append((r.status, json.loads(r.read())))
        flag = alias.rpartition("/")[2]  # the protocol's own `live` / `ready`, which KServe's SDK reads
        assert answers[0][1].pop(flag) is True
        assert answers[0] == answers[1] and answers[0][0] == 200
    # Passing probes are not access-logged, under either name.
    assert not [r for r in server.log_lines() if r["route"].startswith("/v2/health")]


def sse_through(url: str, image: Path) -> tuple[int, str, bytes]:
    """A streamed chat completion read raw: status, content type, the bytes as they came."""
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    body = json.dumps({"model": "demo", "stream": True, "stream_options": {"include_usage": True},
                       "messages": user(QUESTIONS[0], data_url(image))})
    conn.request("POST", "/v1/chat/completions", body=body, headers={
        "Content-Type": "application/json", "Authorization": f"Bearer {API_KEY}"})
    resp = conn.getresponse()
    out = resp.status, resp.getheader("Content-Type", ""), resp.read()
    conn.close()
    return out


@pytest.mark.slow
def test_through_the_cluster_plain_and_streaming(tmp_path: Path, demo_dir: Path, easy_vqa_images: list[Path]) -> None:
    keys = tmp_path / "keys"
    keys.write_text(f"tester:{API_KEY}\n")
    cl = start_cluster(tmp_path, demo_dir, "--api-keys", str(keys), workers=1)
    try:
        client = openai.OpenAI(base_url=cl.url + "/v1", api_key=API_KEY, max_retries=0)
        for image in easy_vqa_images[:2]:
            expected = direct_post(cl.url, image.read_bytes(), [QUESTIONS[0]])["answer"]
            plain = client.chat.completions.create(model="demo", messages=user(QUESTIONS[0], data_url(image)))
            assert plain.choices[0].message.content == expected
            chunks = list(client.chat.completions.create(model="demo", messages=user(QUESTIONS[0], data_url(image)),
                                                         stream=True))
            assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected
            assert chunks[-1].choices[0].finish_reason == "stop"
        # HAProxy passes the event stream as the worker wrote it: its type, every event, the end marker.
        status, ctype, raw = sse_through(cl.url, easy_vqa_images[0])
        assert status == 200 and ctype.startswith("text/event-stream")
        events = [e for e in raw.decode().split("\n\n") if e]
        assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]" and len(events) == 5
        assert [m.id for m in client.models.list().data] == ["demo"]
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=cl.url + "/v1", api_key="wrong", max_retries=0).models.list()
    finally:
        stop_cluster(cl)
