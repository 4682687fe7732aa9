"""The served /openapi.json is the truth: schemathesis (a property-based OpenAPI tester) runs against a live
`serve` and finds nothing.

Every check runs but `positive_data_acceptance`: a schema cannot say "bytes that decode as an image", so random
bytes that fit `format: binary` are rightly refused (400 invalid_image). tests/contract_checks.py checks the same
by the refusal's code instead: schema-valid data refused for anything but its bytes (an empty image, two images in
a chat) fails. Bounded: a fixed seed, at most 25 examples per operation, one worker (about a minute on a shared
2-core box).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from vqa_async.testing.launch import start_serve

KEY = "contract-test-key-0123456789"
HERE = Path(__file__).resolve().parents[1]  # tests/: contract_checks.py
# Random base64 is no image, so nearly every generated chat or v2 inference request is rightly refused
# (invalid_image; a v2 tensor's elements must also match its shape, which no schema says): without
# this, schemathesis warns of a schema looser than the server on that route, and a warning is an issue here.
CONFIG = """
[[operations]]
include-path = "/v1/chat/completions"
warnings = false

[[operations]]
include-path = "/v2/models/{name}/infer"
warnings = false
"""


@pytest.mark.parametrize("with_keys, examples", [(True, 25), (False, 10)])
def test_schemathesis_finds_nothing_against_a_live_serve(tmp_path: Path, demo_dir: Path, with_keys: bool,
                                                         examples: int) -> None:
    auth: list[str] = []
    if with_keys:
        auth = ["-H", f"X-API-Key: {KEY}", "-H", f"Authorization: Bearer {KEY}"]  # either scheme, valid
    config = tmp_path / "schemathesis.toml"
    config.write_text(CONFIG)
    srv = start_serve(demo_dir, "--max-inflight-per-client", "4", keys={"ci": KEY} if with_keys else None,
                      log=tmp_path / "serve.log", home=tmp_path)
    url = srv.url
    try:
        st = subprocess.run(
            [sys.executable, "-m", "schemathesis.cli", "--config-file", str(config), "run", url + "/openapi.json",
             *auth, "--checks", "all",
             "--exclude-checks", "positive_data_acceptance", "--max-examples", str(examples), "--seed", "13",
             "--generation-database", "none", "--workers", "1", "--no-color", "--request-timeout", "30"],
            capture_output=True, text=True, timeout=400, cwd=tmp_path,
            env=dict(os.environ, SCHEMATHESIS_TELEMETRY="false", SCHEMATHESIS_HOOKS="contract_checks",
                     PYTHONPATH=os.pathsep.join(filter(None, [str(HERE), os.environ.get("PYTHONPATH")]))))
        assert st.returncode == 0, st.stdout[-20000:] + st.stderr[-5000:]
        assert "No issues found" in st.stdout
        with urllib.request.urlopen(url + "/openapi.json") as r:
            paths = json.load(r)["paths"]
        for path in ("/v1/chat/completions", "/v1/models", "/v2/health/live", "/v2/health/ready"):
            assert path in paths, path
        counts = re.search(r"Selected: (\d+)/(\d+)\s+Tested: (\d+)", st.stdout)
        assert counts and len(set(counts.groups())) == 1, "every operation is tested"
    finally:
        srv.stop()
