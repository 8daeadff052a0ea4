"""The node's document store: content-addressed files on disk, outside SQLite.

A document lives at ``<dir>/sha256/<first two hex digits>/<hex>``. Every write goes to a
temporary file under ``<dir>/tmp`` while its SHA-256 is computed chunk by chunk; only when
digest and size are right is it linked into place (``os.link`` is atomic and fails if the
name exists: an upload of content already held then replaces the copy there with its own,
checked one, which repairs a copy rotted on the disk). On a file system without hard links
(some SMB and FUSE mounts) it is renamed into place instead. A partial or
refused upload is never visible, and memory stays flat for any file size: the store never
holds more than one chunk.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import logging
import os
import re
import tempfile
import time
from collections.abc import AsyncGenerator
from pathlib import Path
from typing import BinaryIO

from client_sdk.documents import CHUNK_BYTES, read_chunks
from node.core.documents import DocumentLimits, check_size
from node.core.errors import ChaparError, Code
from node.metrics import DOCUMENTS_SET_ASIDE

SET_ASIDE_OWN = DOCUMENTS_SET_ASIDE.labels(kind="own")
SET_ASIDE_FETCHED = DOCUMENTS_SET_ASIDE.labels(kind="fetched")

__all__ = [
    "CHUNK_BYTES",
    "DOCUMENT_NAME",
    "NO_HARD_LINKS",
    "DocumentStore",
    "DocumentWriter",
    "FileId",
    "fsync_path",
]

log = logging.getLogger("chapar.documents")
_DIGEST_BYTES = hashlib.sha256().digest_size
DOCUMENT_NAME = re.compile(f"[0-9a-f]{{{2 * _DIGEST_BYTES}}}")
"""A stored document's file name (its SHA-256 in hex), in the folder of its first two."""
FileId = tuple[int, int]
NO_HARD_LINKS = frozenset({errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK})
"""What ``os.link`` fails with on a file system that has no hard links (or none here)."""
_SOUND_KEPT = 10_000
"""How many files found sound a store remembers (``DocumentStore.found_sound``)."""


class DocumentStore:
    def __init__(self, root: Path, limits: DocumentLimits, *, clean: bool = True) -> None:
        """``clean``: removes the leftovers of uploads cut short (at the server's start);
        False for another process opening the store beside a running server (``chapar
        backup``): they would be the server's uploads in progress."""
        self.root = root
        self.limits = limits
        self._tmp = root / "tmp"
        self._tmp.mkdir(parents=True, exist_ok=True)
        (root / "sha256").mkdir(exist_ok=True)
        # The files read whole and found sound, by digest: file id and size (``sound``).
        self._sound: dict[bytes, tuple[FileId, int]] = {}
        self._touch_refused = False  # the last mark of a use failed (said once: ``touch``)
        # Leftovers of uploads cut short by a crash: never visible, now removed.
        for stale in self._tmp.iterdir() if clean else ():
            with contextlib.suppress(OSError):
                stale.unlink()

    def path(self, digest: bytes) -> Path:
        hexdigest = digest.hex()
        return self.root / "sha256" / hexdigest[:2] / hexdigest

    def size(self, digest: bytes) -> int | None:
        """The size of a stored document, or None when it is not here (or ``digest`` is
        not 32 bytes: an empty one's path would be the sha256/ directory itself)."""
        if len(digest) != _DIGEST_BYTES:
            return None
        try:
            return self.path(digest).stat().st_size
        except FileNotFoundError:
            return None

    def writer(self, *, expected_size: int = 0, expected_sha256: bytes = b"") -> DocumentWriter:
        """A new temporary file; RESOURCE_EXHAUSTED at once if ``expected_size`` is too big."""
        if expected_size:
            check_size(expected_size, self.limits)
        return DocumentWriter(self, expected_size, expected_sha256)

    def read(self, digest: bytes, offset: int = 0) -> AsyncGenerator[bytes, None]:
        """The chunks of a stored document from ``offset`` (FileNotFoundError if absent)."""
        return read_chunks(self.path(digest), offset)

    def file_id(self, digest: bytes) -> FileId | None:
        """Which file holds the document now (device and inode), None when none does. A
        reader takes it before it opens the file, so that what it finds corrupt is the file
        it read and not one stored in its place meanwhile (see ``remove``)."""
        try:
            st = self.path(digest).stat()
        except FileNotFoundError:
            return None
        return st.st_dev, st.st_ino

    def remove(self, digest: bytes, read: FileId | None) -> bool:
        """Drops a copy found corrupt; the next download fetches it again. ``read`` is the
        ``file_id`` taken before the corrupt content was read: a good copy stored since
        (fetched again, uploaded again) has another and stays. False when nothing was
        dropped. Counted in ``chapar_documents_set_aside_total{kind="fetched"}``."""
        aside = self._still(digest, read)
        if aside is None:
            return False
        try:
            aside.unlink()
        except FileNotFoundError:
            return False
        SET_ASIDE_FETCHED.inc()
        return True

    def quarantine(self, digest: bytes, read: FileId | None) -> bool:
        """Moves aside this agency's own document found corrupt (kept, for inspection, in
        ``corrupt/``): nobody can send it a good copy, but uploading the file again now
        stores it afresh instead of finding the corrupt copy in its place. ``read`` as for
        ``remove``. False when nothing was moved (another reader of it moved it first).
        Counted in ``chapar_documents_set_aside_total{kind="own"}``."""
        path = self._still(digest, read)
        if path is None:
            return False
        aside = self.root / "corrupt"
        aside.mkdir(exist_ok=True)
        try:
            os.replace(path, aside / f"{digest.hex()}.{time.time_ns()}")
        except FileNotFoundError:
            return False
        SET_ASIDE_OWN.inc()
        return True

    def found_sound(self, digest: bytes, read: FileId | None, size: int) -> None:
        """Notes that the file ``read`` names, of ``size`` bytes, was read whole and matched
        ``digest`` (the last ``_SOUND_KEPT`` so noted are remembered)."""
        if read is None:
            return
        self._sound.pop(digest, None)
        if len(self._sound) >= _SOUND_KEPT:
            del self._sound[next(iter(self._sound))]
        self._sound[digest] = (read, size)

    def sound(self, digest: bytes, read: FileId | None, size: int | None) -> bool:
        """Whether the file ``read`` names, of ``size`` bytes, was found sound before
        (``found_sound``): an owner's push ended early need not read it whole again."""
        return read is not None and self._sound.get(digest) == (read, size)

    def _still(self, digest: bytes, read: FileId | None) -> Path | None:
        """The document's path if the file there is still the one ``read`` names."""
        if read is None or self.file_id(digest) != read:
            return None
        return self.path(digest)

    def touch(self, digest: bytes) -> None:
        """Marks a document as used now (retention counts from its last use). A store that
        refuses it (read-only, a file of another owner) is said once, until a mark works
        again: the document is still served and attached, its use counted from before."""
        try:
            os.utime(self.path(digest))
        except FileNotFoundError:
            pass
        except OSError as exc:
            if not self._touch_refused:
                log.warning(
                    "cannot mark documents used (%s): retention counts their use from before",
                    exc,
                )
            self._touch_refused = True
        else:
            self._touch_refused = False

    def unused_since(self, cutoff: float) -> list[bytes]:
        """Digests of the documents last written or touched before ``cutoff`` (a walk of
        the store: run it in a thread)."""
        found: list[bytes] = []
        for folder in (self.root / "sha256").iterdir():
            # Only a document's place and name count: anything else there (an operator's
            # note, a restore's leftovers) is left alone, and does not stop the walk.
            if len(folder.name) != 2 or not folder.is_dir():
                continue
            try:
                self._unused_in(folder, cutoff, found)
            except OSError as exc:  # the other folders are walked all the same
                log.error(
                    "retention: cannot read the folder %s (%s): its documents stay",
                    folder,
                    exc.strerror or exc,
                )
        return found

    @staticmethod
    def _unused_in(folder: Path, cutoff: float, found: list[bytes]) -> None:
        """Adds to ``found`` the digests of the documents in ``folder`` (one of sha256/'s)
        last written or touched before ``cutoff``."""
        with os.scandir(folder) as entries:
            for entry in entries:
                if not DOCUMENT_NAME.fullmatch(entry.name) or entry.name[:2] != folder.name:
                    continue
                with contextlib.suppress(FileNotFoundError):
                    if entry.is_file(follow_symlinks=False) and entry.stat().st_mtime < cutoff:
                        found.append(bytes.fromhex(entry.name))

    def remove_unused(self, digest: bytes, cutoff: float) -> bool:
        """Removes a document still unused since ``cutoff``; False if it was used since."""
        path = self.path(digest)
        try:
            if path.stat().st_mtime >= cutoff:
                return False
            path.unlink()
        except FileNotFoundError:
            return False
        return True


class DocumentWriter:
    """One document being written: a temporary file and a running SHA-256."""

    def __init__(self, store: DocumentStore, expected_size: int, expected_sha256: bytes) -> None:
        self.store = store
        self.expected_size = expected_size
        self.expected_sha256 = expected_sha256
        self.size = 0
        self._hash = hashlib.sha256()
        fd, name = tempfile.mkstemp(dir=store._tmp, prefix="part-")
        self.path = Path(name)
        self._file: BinaryIO = os.fdopen(fd, "wb")

    @property
    def limit(self) -> int:
        """The most bytes this document may have."""
        return self.expected_size or self.store.limits.max_file_bytes

    def write(self, chunk: bytes) -> None:
        """Appends a chunk; RESOURCE_EXHAUSTED (and nothing kept) past the size limit."""
        if self.size + len(chunk) > self.store.limits.max_file_bytes or (
            self.expected_size and self.size + len(chunk) > self.expected_size
        ):
            self.discard()
            if self.size + len(chunk) > self.store.limits.max_file_bytes:
                check_size(self.size + len(chunk), self.store.limits)
            raise _size_mismatch(self.expected_size, self.size + len(chunk))
        self._file.write(chunk)
        self._file.flush()  # readers may follow the file while it grows
        self._hash.update(chunk)
        self.size += len(chunk)

    async def commit(self) -> tuple[bytes, int, bool]:
        """Checks digest and size, then links the file into place.

        Returns (digest, size, existed). DATA_LOSS / DIGEST_MISMATCH or INVALID_ARGUMENT /
        SIZE_MISMATCH when the content is not what was expected; nothing is kept then.
        """
        digest = self._hash.digest()
        try:
            if self.expected_size and self.size != self.expected_size:
                raise _size_mismatch(self.expected_size, self.size)
            if self.expected_sha256 and digest != self.expected_sha256:
                raise ChaparError(
                    Code.DATA_LOSS,
                    "DIGEST_MISMATCH",
                    "the content's SHA-256 is not the expected one; nothing was stored",
                    metadata={"expected": self.expected_sha256.hex(), "actual": digest.hex()},
                )
            self._file.flush()
            await asyncio.to_thread(os.fsync, self._file.fileno())
            self._file.close()
            target = self.store.path(digest)
            target.parent.mkdir(exist_ok=True)
            try:
                os.link(self.path, target)
                existed = False
            except FileExistsError:
                existed = True
                # Stored again: this copy, just checked against its digest, takes the
                # place of the one there, which may have rotted on the disk (uploading
                # the file again is how an operator repairs a corrupt document; a reader
                # of the old copy keeps reading it). Its fresh mtime is a use, counted
                # before the first await below: retention runs between awaits.
                os.replace(self.path, target)
            except OSError as exc:
                if exc.errno not in NO_HARD_LINKS:
                    raise
                # No hard links here (some SMB and FUSE mounts): the same, by a rename,
                # which is as atomic. Whether the name is taken is asked just before,
                # with no await between, so no other upload of this process stores the
                # document meanwhile; one of another process sharing the directory
                # could, and both would then say it did not exist (the file is whole
                # and the same either way).
                existed = target.exists()
                os.replace(self.path, target)
            await asyncio.to_thread(fsync_path, target.parent)
        finally:
            self.discard()
        return digest, self.size, existed

    def discard(self) -> None:
        if not self._file.closed:
            # Closing flushes what a failed write left buffered, and fails the same way.
            with contextlib.suppress(OSError):
                self._file.close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


def _size_mismatch(expected: int, actual: int) -> ChaparError:
    return ChaparError(
        Code.INVALID_ARGUMENT,
        "SIZE_MISMATCH",
        f"the content has {actual} bytes or more, not the {expected} announced",
        metadata={"expected": str(expected), "actual": str(actual)},
    )


def fsync_path(path: Path) -> None:
    """Flushes a file, or a directory's entries, to disk by its path."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
