"""`vqa-async serve` as a real process: it starts, answers, and on SIGTERM answers what it holds, then exits 0."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path

import aiohttp

from vqa_async.cluster.supervisor import free_port
from vqa_async.tools.loadgen import wait_ready


def test_sigterm_answers_everything_queued_then_exits_0(demo_dir: Path, easy_vqa_images: list[Path]) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = dict(os.environ, VQA_MAX_BATCH_SIZE="1")  # settings from the environment, one question per model call
    proc = subprocess.Popen([sys.executable, "-m", "vqa_async.cli", "serve", "--model", str(demo_dir), "--port",
                             str(port)], env=env)
    try:
        wait_ready(url, proc)
        img = easy_vqa_images[0].read_bytes()

        async def scenario() -> list[int]:
            async with aiohttp.ClientSession() as s:
                async def one(i: int) -> int:
                    form = aiohttp.FormData()
                    form.add_field("image", img, filename="a.png", content_type="image/png")
                    form.add_field("question", f"what color is the shape? {i}")
                    async with s.post(url + "/v1/vqa", data=form) as r:
                        await r.read()
                        return r.status

                tasks = [asyncio.create_task(one(i)) for i in range(12)]
                await asyncio.sleep(0.3)  # all sent, most still queued behind the one model thread
                proc.send_signal(signal.SIGTERM)
                return list(await asyncio.gather(*tasks))

        statuses = asyncio.run(scenario())
        assert statuses == [200] * 12
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_log_level_is_case_blind_and_a_bad_one_is_a_clean_error() -> None:
    from vqa_async.cli import main
    from vqa_async.config import Settings

    assert Settings(device="cpu", log_level="debug").log_level == "DEBUG"
    assert main(["--log-level", "loud", "serve"]) == 2
    env = {k: v for k, v in os.environ.items() if k != "VQA_LOG_LEVEL"}
    bad = subprocess.run([sys.executable, "-m", "vqa_async.cli", "serve"], env={**env, "VQA_LOG_LEVEL": "loud"},
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "invalid log level" in bad.stderr and "Traceback" not in bad.stderr
