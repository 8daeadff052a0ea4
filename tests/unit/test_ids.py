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


def test_ids_of_threads_and_of_a_forked_child_never_repeat() -> None:
    # Random bytes are read a few kilobytes at a time, each thread its own pool: a child
    # forked with its parent's pool would give the parent's next ids' random parts.
    import os
    import threading
    import warnings

    uuid7()  # the pool is filled
    read, write = os.pipe()
    with warnings.catch_warnings():  # Python 3.12 warns of a fork with threads running
        warnings.simplefilter("ignore", DeprecationWarning)
        pid = os.fork()
    if pid == 0:  # the child: never back into the test run, whatever happens
        try:
            os.write(write, uuid7().encode())
        finally:
            os._exit(0)
    os.close(write)
    mine = uuid7()
    os.waitpid(pid, 0)
    child = os.read(read, 100).decode()
    os.close(read)
    assert child[14:] != mine[14:]  # past the time and version: the random part
    found: list[list[str]] = [[] for _ in range(4)]
    threads = [
        threading.Thread(target=lambda i=i: found[i].extend(uuid7() for _ in range(2000)))
        for i in range(4)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    ids = [text for chunk in found for text in chunk]
    assert len(set(ids)) == len(ids)
