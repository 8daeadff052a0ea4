"""uuid7: the text of a version 7 UUID, ordered by time, never repeated."""

from __future__ import annotations

import time
import uuid

from client_sdk.ids import uuid7


def test_uuid7_is_version_7_in_canonical_text_distinct_and_ordered_by_time() -> None:
    before = time.time_ns() // 1_000_000
    ids = [uuid7() for _ in range(10_000)]
    after = time.time_ns() // 1_000_000
    assert len(set(ids)) == len(ids)
    for text in ids[:1000]:
        parsed = uuid.UUID(text)
        assert str(parsed) == text  # canonical: lower case, hyphens where uuid puts them
        assert parsed.version == 7
        assert parsed.variant == uuid.RFC_4122
        assert before <= parsed.int >> 80 <= after  # the first 48 bits: Unix milliseconds
    time.sleep(0.002)
    later = uuid7()
    assert all(later > text for text in ids)  # a later millisecond sorts after, as text too
