"""How long `serve` takes to refuse a 9 MiB form of 160,000 empty parts, and how slow /healthz gets meanwhile.

    python -m bench many-parts [--model DIR]

Before the part bound (issue 11) the refusal took 22 s and /healthz up to 6.3 s. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import time

import aiohttp

from bench.lib.systems import Setup, start, stop_all


async def measure(url: str, parts: int) -> dict[str, float | int | str]:
    body = ("--b\r\nContent-Disposition: form-data; name=\"field\"\r\n\r\n\r\n" * parts + "--b--\r\n").encode()
    async with aiohttp.ClientSession() as s:
        health_ms: list[float] = []
        done = asyncio.Event()

        async def poll() -> None:
            while not done.is_set():
                t = time.monotonic()
                async with s.get(url + "/healthz") as r:
                    await r.read()
                health_ms.append((time.monotonic() - t) * 1000)
                await asyncio.sleep(0.01)

        poller = asyncio.create_task(poll())
        await asyncio.sleep(0.1)
        t0 = time.monotonic()
        async with s.post(url + "/v1/vqa", data=io.BytesIO(body),
                          headers={"Content-Type": "multipart/form-data; boundary=b"}) as r:
            reply = await r.json()
            status = r.status
        refused_ms = (time.monotonic() - t0) * 1000
        await asyncio.sleep(0.2)
        done.set()
        await poller
    return {"body_mib": round(len(body) / 2**20, 2), "status": status, "code": reply["error"]["code"],
            "refused_ms": round(refused_ms, 1), "healthz_max_ms": round(max(health_ms), 1),
            "healthz_polls": len(health_ms)}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench many-parts", description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None)
    p.add_argument("--parts", type=int, default=160_000)
    args = p.parse_args(argv)
    try:
        sysm = start("serve", Setup(model=args.model))
        print(json.dumps(asyncio.run(measure(sysm.url, args.parts))))
    finally:
        stop_all()


if __name__ == "__main__":
    main()
