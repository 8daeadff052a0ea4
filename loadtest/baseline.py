"""The raw baseline: grpc.aio mTLS streaming of envelope bytes between two processes.

One message per stream write, no signing, no storage: the ceiling our end-to-end rate is
compared with, measured in the same run on the same machine so the ratio survives noise.

    python -m loadtest.baseline --serve --ca C --cert X --key K --ready FILE   (server)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import grpc

from certs.pki import PkiLayout
from loadtest.cpu import own_cpu_s, process_cpu_s

__all__ = ["measure_baseline", "measure_between"]

METHOD = "/chapar.loadtest.v1.Baseline/Stream"


async def _serve(ca: Path, cert: Path, key: Path, ready: Path) -> None:
    async def stream(requests: object, context: grpc.aio.ServicerContext) -> bytes:
        count = 0
        async for _ in requests:  # type: ignore[attr-defined]
            count += 1
        return str(count).encode()

    handler = grpc.method_handlers_generic_handler(
        "chapar.loadtest.v1.Baseline",
        {"Stream": grpc.stream_unary_rpc_method_handler(stream)},
    )
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    server.add_generic_rpc_handlers((handler,))
    creds = grpc.ssl_server_credentials(
        [(key.read_bytes(), cert.read_bytes())],
        root_certificates=ca.read_bytes(),
        require_client_auth=True,
    )
    port = server.add_secure_port("127.0.0.1:0", creds)
    await server.start()
    ready.write_text(json.dumps({"address": f"127.0.0.1:{port}", "pid": os.getpid()}))
    await server.wait_for_termination()


async def measure_baseline(
    payload: bytes,
    *,
    ca: Path,
    server_cert: Path,
    server_key: Path,
    client_cert: Path,
    client_key: Path,
    seconds: float = 3.0,
    workdir: Path,
    rate: float = 0.0,
) -> dict[str, float]:
    """Streams ``payload`` for about ``seconds``, flat out or, with ``rate``, one message
    every 1/rate s; returns messages, elapsed_s, lps and the CPU milliseconds a message of
    both processes together (``cpu_ms_per_message``): what gRPC alone costs at that pace;
    and of each end alone (``sender_cpu_ms_per_message``, ``receiver_cpu_ms_per_message``)."""
    ready = workdir / "baseline-ready.json"
    ready.unlink(missing_ok=True)  # an earlier measurement's server is gone
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "loadtest.baseline",
            "--serve",
            "--ca",
            str(ca),
            "--cert",
            str(server_cert),
            "--key",
            str(server_key),
            "--ready",
            str(ready),
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 20
        while not ready.exists():
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError("baseline server did not start")
            await asyncio.sleep(0.05)
        address = json.loads(ready.read_text())["address"]
        creds = grpc.ssl_channel_credentials(
            root_certificates=ca.read_bytes(),
            private_key=client_key.read_bytes(),
            certificate_chain=client_cert.read_bytes(),
        )
        async with grpc.aio.secure_channel(address, creds) as channel:
            call = channel.stream_unary(
                METHOD, request_serializer=None, response_deserializer=None
            )()
            await call.write(payload)  # the handshake and the first message, not counted
            own_before, server_before = own_cpu_s(), process_cpu_s(proc.pid)
            start = time.perf_counter()
            end = start + seconds
            if rate > 0:
                interval = 1.0 / rate
                slot = start
                while slot < end:
                    delay = slot - time.perf_counter()
                    if delay > 0:
                        await asyncio.sleep(delay)
                    await call.write(payload)
                    slot += interval
            else:
                while time.perf_counter() < end:
                    for _ in range(256):
                        await call.write(payload)
            await call.done_writing()
            received = int(await call) - 1
            elapsed = time.perf_counter() - start
            own = own_cpu_s() - own_before
            server = process_cpu_s(proc.pid) - server_before
        per = 1000 / received if received else 0.0
        return {
            "messages": float(received),
            "elapsed_s": elapsed,
            "lps": received / elapsed,
            "cpu_ms_per_message": (own + server) * per,
            # Each end alone: the writer (this process) and the reader (the server).
            "sender_cpu_ms_per_message": own * per,
            "receiver_cpu_ms_per_message": server * per,
        }
    finally:
        proc.terminate()
        proc.wait(10)


async def measure_between(
    pki: PkiLayout,
    pair: tuple[str, str],
    payload: bytes,
    *,
    seconds: float,
    workdir: Path,
    rate: float = 0.0,
) -> dict[str, float]:
    """``measure_baseline`` between the TLS certificates of ``pair`` (client, server)."""
    client, server = (pki.agency_dir(code) for code in pair)
    return await measure_baseline(
        payload,
        ca=pki.root_cert,
        server_cert=server / "tls.crt",
        server_key=server / "tls.key",
        client_cert=client / "tls.crt",
        client_key=client / "tls.key",
        seconds=seconds,
        workdir=workdir,
        rate=rate,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--serve", action="store_true", required=True)
    parser.add_argument("--ca", type=Path, required=True)
    parser.add_argument("--cert", type=Path, required=True)
    parser.add_argument("--key", type=Path, required=True)
    parser.add_argument("--ready", type=Path, required=True)
    ns = parser.parse_args()
    asyncio.run(_serve(ns.ca, ns.cert, ns.key, ns.ready))


if __name__ == "__main__":
    main()
