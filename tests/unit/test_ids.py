"""random_uuid: the text of a version 4 UUID, never repeated."""

from __future__ import annotations

import uuid

from client_sdk.ids import random_uuid


def test_random_uuids_are_version_4_in_canonical_text_and_distinct() -> None:
    ids = [random_uuid() for _ in range(10_000)]
    assert len(set(ids)) == len(ids)
    for text in ids[:1000]:
        parsed = uuid.UUID(text)
        assert str(parsed) == text  # canonical: lower case, hyphens where uuid puts them
        assert parsed.version == 4
        assert parsed.variant == uuid.RFC_4122
