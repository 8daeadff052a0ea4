"""Frames spliced from stored bytes are the messages the protobuf library would build."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from client_sdk import pb
from node.core.splice import Field

_envelopes = st.builds(
    pb.Envelope,
    header=st.binary(max_size=300),
    # Past one and two bytes of length (127, 16,383): the varint's longer forms.
    body=st.binary(max_size=20_000),
    signature=st.builds(pb.Signature, key_id=st.binary(max_size=32), value=st.binary(max_size=72)),
)


@given(st.lists(_envelopes, max_size=6))
def test_a_spliced_deliveries_frame_is_the_frame_built_by_protobuf(
    envelopes: list[pb.Envelope],
) -> None:
    stored = [e.SerializeToString() for e in envelopes]
    spliced = Field(pb.ConnectResponse, "deliveries").one(
        Field(pb.EnvelopeBatch, "envelopes").many(stored)
    )
    built = pb.ConnectResponse(deliveries=pb.EnvelopeBatch(envelopes=envelopes))
    assert spliced == built.SerializeToString()
    assert pb.ConnectResponse.FromString(spliced) == built


@given(_envelopes, st.binary(max_size=500), st.text(max_size=40))
def test_an_inbox_letter_spliced_in_parts_parses_as_the_whole(
    envelope: pb.Envelope, delivery_content: bytes, text: str
) -> None:
    delivery = pb.Evidence(content=delivery_content)
    head = pb.InboxLetter(shams_text=text, shams=pb.Shams(origin="A.B", year=2026, sequence=7))
    letter = b"".join(
        (
            head.SerializeToString(),
            Field(pb.InboxLetter, "envelope").one(envelope.SerializeToString()),
            Field(pb.InboxLetter, "delivery").one(delivery.SerializeToString()),
        )
    )
    frame = Field(pb.StreamInboxResponse, "letters").many([letter, letter])
    expected = pb.InboxLetter()
    expected.CopyFrom(head)
    expected.envelope.CopyFrom(envelope)
    expected.delivery.CopyFrom(delivery)
    assert list(pb.StreamInboxResponse.FromString(frame).letters) == [expected, expected]


def test_an_empty_repeated_field_is_nothing() -> None:
    assert Field(pb.EnvelopeBatch, "envelopes").many([]) == b""


def test_only_length_delimited_fields_are_spliced() -> None:
    with pytest.raises(TypeError, match=r"chapar\.exchange\.v1\.Shams\.year"):
        Field(pb.Shams, "year")
    with pytest.raises(KeyError):
        Field(pb.Shams, "no_such_field")
