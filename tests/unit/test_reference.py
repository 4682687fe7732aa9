"""The references are the code's: docs/settings.md and docs/errors.md are what the code prints, and every error code
the server can answer is in the one registry (vqa_async/http/error_codes.py) with the status it is raised with."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from vqa_async.http.error_codes import ERRORS, STATUS_CODES
from vqa_async.tools.docs import PAGES, main

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "vqa_async"
# The client's own codes (a file it cannot read, a connection that failed) are the client's, not the server's.
SERVER_SIDE = [p for p in PACKAGE.rglob("*.py") if "client" not in p.relative_to(PACKAGE).parts]


@pytest.mark.parametrize("name", sorted(PAGES))
def test_the_committed_page_is_what_the_code_prints(name: str) -> None:
    file, render = PAGES[name]
    committed = (ROOT / "docs" / file).read_text(encoding="utf-8")
    assert committed == render(), f"docs/{file} is out of date: run `python -m vqa_async.tools.docs`"


def test_the_check_command_fails_on_a_stale_page(tmp_path: Path) -> None:
    assert main(["--docs", str(tmp_path)]) == 0 and main(["--docs", str(tmp_path), "--check"]) == 0
    (tmp_path / "errors.md").write_text((tmp_path / "errors.md").read_text().replace("`timeout`", "`too_slow`"))
    assert main(["--docs", str(tmp_path), "--check"]) == 1


Helper = tuple[int, int | None, object]  # the position of `code`, of `status`, and status's default


def error_helpers(tree: ast.Module) -> dict[str, Helper]:
    """The functions and exception classes of one module that take a `code` parameter."""
    out = {}
    for node in ast.walk(tree):
        fn = node if isinstance(node, ast.FunctionDef) and node.name != "__init__" else None
        if isinstance(node, ast.ClassDef):
            fn = next((n for n in node.body if isinstance(n, ast.FunctionDef) and n.name == "__init__"), None)
        if fn is None:
            continue
        names = [a.arg for a in fn.args.args if a.arg != "self"]
        if "code" in names:
            defaults = dict(zip(names[len(names) - len(fn.args.defaults):], fn.args.defaults, strict=True))
            status = defaults.get("status")
            out[node.name] = (names.index("code"), names.index("status") if "status" in names else None,
                              status.value if isinstance(status, ast.Constant) else None)
    return out


def raised_codes() -> list[tuple[str, int | None, str]]:
    """(code, its status as the call gives it or None, where) for each string literal handed to an error helper:
    a function or exception class of vqa_async with a `code` parameter (ApiError, refuse, parse.bad, ...)."""
    trees = {p: ast.parse(p.read_text(), str(p)) for p in SERVER_SIDE}
    everywhere: dict[str, Helper] = {}
    for tree in trees.values():
        everywhere.update(error_helpers(tree))
    found = []
    for path, tree in trees.items():
        # A module's own function of that name is the one it calls (parse.bad and openai_api.bad differ); one that
        # takes no code (config's own `bad`) is not a helper.
        local = error_helpers(tree)
        shadows = {n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name not in local}
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", None)
            helper = local.get(name) or (everywhere.get(name) if name not in shadows else None)
            if helper is None:
                continue
            at, status_at, default = helper
            args = {**dict(enumerate(node.args)), **{k.arg: k.value for k in node.keywords}}
            code = args.get(at, args.get("code"))
            status = args.get(status_at, args.get("status")) if status_at is not None else None
            if isinstance(code, ast.Constant) and isinstance(code.value, str):
                given = default if status is None else status.value if isinstance(status, ast.Constant) else None
                found.append((code.value, given, f"{path.relative_to(ROOT)}:{node.lineno}"))
    return found


def test_every_code_raised_in_vqa_async_is_registered_with_its_status() -> None:
    found = raised_codes()
    # The scan sees what it must: codes of the parser, the image fetcher, the model's image errors, the chat route.
    seen = {code for code, _, _ in found}
    assert {"missing_image", "image_url_fetch_failed", "invalid_image", "too_many_images", "cross_site"} <= seen
    unregistered = [(code, where) for code, _, where in found if code not in ERRORS]
    assert not unregistered, f"add these to vqa_async/http/error_codes.py: {unregistered}"
    # A helper whose status defaults to 400 (parse.bad) is called without one for a 400 code.
    wrong = [(code, status, where) for code, status, where in found
             if status is not None and status != ERRORS[code].status]
    assert not wrong, f"raised with another status than the registry's: {wrong}"


def test_every_registered_code_can_happen() -> None:
    from vqa_async.cluster.haproxy import EDGE_ERRORS

    for status, code, _, _ in EDGE_ERRORS:  # HAProxy's own answers, in the API's shape
        assert ERRORS[code].status == status, code
    raised = {code for code, _, _ in raised_codes()} | {code for _, code, _, _ in EDGE_ERRORS} | set(
        STATUS_CODES.values())
    assert set(ERRORS) - raised == set(), "registered but never raised: remove them or raise them"


def test_the_openapi_document_lists_the_registry(demo_dir: Path) -> None:
    from vqa_async.config import Settings
    from vqa_async.http.openapi import openapi_spec

    spec = openapi_spec(Settings(model=str(demo_dir), device="cpu", api_keys="keys"))
    schemas = spec["components"]["schemas"]
    for shape in (schemas["Error"]["properties"]["error"], schemas["LegacyError"], schemas["OpenAIError"]
                  ["properties"]["error"]):
        assert shape["properties"]["code"]["enum"] == list(ERRORS)
    answers = spec["paths"]["/v1/vqa"]["post"]["responses"]
    request_statuses = {str(e.status) for e in ERRORS.values() if e.origin in ("request", "keys")}
    assert request_statuses <= set(answers)
    assert "Retry-After" in answers["503"]["headers"] and "Retry-After" not in answers["500"]["headers"]
