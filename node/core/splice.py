"""Frames assembled from stored message bytes, without parsing them again.

Envelopes and evidence are stored as their serialised bytes. Sending them in a frame the
ordinary way parses each one into a message, copies it into the frame and serialises it
all again. A message field is only its tag, its length and the field's bytes, so the
frame can be joined from the stored bytes directly: what is received is the same
message. Concatenated serialisations of one message type merge, so the parts of a
message may be spliced separately too.

Only length-delimited fields (messages, bytes and strings) are spliced, and each field is
looked up in its message's descriptor: the numbers come from the ``.proto`` contract.
"""

from __future__ import annotations

from collections.abc import Iterable

from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from client_sdk import pb

__all__ = ["ENVELOPE_BATCH", "EVIDENCE_BATCH", "Field"]

_LENGTH_DELIMITED = 2
_SPLICEABLE = (
    FieldDescriptor.TYPE_MESSAGE,
    FieldDescriptor.TYPE_BYTES,
    FieldDescriptor.TYPE_STRING,
)


def _varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


class Field:
    """One length-delimited field of a message type, to splice serialised values into."""

    __slots__ = ("_tag",)

    def __init__(self, message: type[Message], name: str) -> None:
        field = message.DESCRIPTOR.fields_by_name[name]
        if field.type not in _SPLICEABLE:
            raise TypeError(f"{message.DESCRIPTOR.full_name}.{name} is not length-delimited")
        self._tag = _varint(field.number << 3 | _LENGTH_DELIMITED)

    def one(self, value: bytes) -> bytes:
        """The field holding ``value`` (a serialised message, or bytes), serialised."""
        return b"".join((self._tag, _varint(len(value)), value))

    def many(self, values: Iterable[bytes]) -> bytes:
        """A repeated field holding each of ``values``, serialised."""
        tag = self._tag
        parts: list[bytes] = []
        for value in values:
            parts += (tag, _varint(len(value)), value)
        return b"".join(parts)


# The batches that carry stored letters and evidence in the hub stream's frames.
ENVELOPE_BATCH = Field(pb.EnvelopeBatch, "envelopes")
EVIDENCE_BATCH = Field(pb.EvidenceBatch, "evidence")
