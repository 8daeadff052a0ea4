"""Document transfer helpers shared by the SDK and the node: chunking and addresses.

Files are read and written in chunks of ``CHUNK_BYTES`` in a worker thread, so the event
loop never blocks on disk and memory never holds more than a chunk or two of a file.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncGenerator
from pathlib import Path
from typing import Final

__all__ = ["CHUNK_BYTES", "digest_of_uri", "read_chunks"]

CHUNK_BYTES: Final = 256 * 1024
"""Chunk size of every document stream: far below any gRPC message size limit."""
_URI: Final = re.compile(r"chapar://[A-Z0-9.\-]{2,64}/documents/sha256/([0-9a-f]{64})")


def digest_of_uri(uri: str) -> bytes:
    """The SHA-256 a document address names; ValueError if it is not one."""
    match = _URI.fullmatch(uri)
    if match is None:
        raise ValueError(f"not a document address: {uri!r}")
    return bytes.fromhex(match[1])


async def read_chunks(path: Path, offset: int = 0) -> AsyncGenerator[bytes, None]:
    """The content of ``path`` from ``offset``, one chunk at a time."""
    f = await asyncio.to_thread(path.open, "rb")
    try:
        if offset:
            await asyncio.to_thread(f.seek, offset)
        while chunk := await asyncio.to_thread(f.read, CHUNK_BYTES):
            yield chunk
    finally:
        f.close()
