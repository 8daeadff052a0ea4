"""Random identifiers."""

from __future__ import annotations

import os

__all__ = ["random_uuid"]


def random_uuid() -> str:
    """A random (version 4) UUID in its text form, as ``str(uuid.uuid4())`` gives.

    From the operating system's random source like ``uuid4``, at a quarter of its cost
    (it is made several times per letter): ids must stay unpredictable, since an evidence
    id another party could guess could be taken before its evidence is stored.
    """
    b = bytearray(os.urandom(16))
    b[6] = (b[6] & 0x0F) | 0x40  # version 4
    b[8] = (b[8] & 0x3F) | 0x80  # RFC 4122 variant
    h = b.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"
