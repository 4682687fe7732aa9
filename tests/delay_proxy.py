"""A TCP relay in front of a `serve` that holds each POST for `--delay-ms` before passing it on: a host slow at
answering (a smaller GPU, a busier machine) whose health checks (GET /readyz) stay fast, so that only
least-connections can move load away from it. Test-only fault injection: tests/test_fleet.py runs it inside a
namespace host, for kernels without `tc netem`."""

from __future__ import annotations

import argparse
import asyncio
import contextlib


async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay_s: float) -> None:
    with contextlib.suppress(ConnectionError):
        while chunk := await reader.read(65536):
            if delay_s and chunk.startswith(b"POST "):  # a request's first chunk; the rest follow it at once
                await asyncio.sleep(delay_s)
            writer.write(chunk)
            await writer.drain()
    with contextlib.suppress(OSError):
        writer.close()


async def main(listen: str, to: str, delay_s: float) -> None:
    up_host, up_port = to.rsplit(":", 1)

    async def relay(client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        try:
            server_r, server_w = await asyncio.open_connection(up_host, int(up_port))
        except OSError:
            client_w.close()
            return
        await asyncio.gather(pipe(client_r, server_w, delay_s), pipe(server_r, client_w, 0.0))

    host, port = listen.rsplit(":", 1)
    server = await asyncio.start_server(relay, host, int(port))
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--listen", required=True)
    ap.add_argument("--to", required=True)
    ap.add_argument("--delay-ms", type=float, default=100)
    a = ap.parse_args()
    asyncio.run(main(a.listen, a.to, a.delay_ms / 1000))
