"""Signing evidence for concurrent callers together: one batch signature per burst.

Acknowledgements arrive as separate calls; each needs its own HANDOVER evidence. Signing
them one by one costs a public-key signature each (and one verification each downstream).
``BatchSigner`` collects what is asked within ``linger_s`` (or until ``max_batch``) and seals
it as one Merkle batch (``Signer.sign_evidence``): every evidence still verifies alone.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence

from client_sdk import pb

__all__ = ["BatchSigner"]


class BatchSigner:
    def __init__(
        self,
        seal: Callable[[Sequence[pb.Evidence]], None],
        *,
        linger_s: float = 0.002,
        max_batch: int = 256,
    ) -> None:
        self._seal = seal
        self._linger_s = linger_s
        self._max_batch = max_batch
        self._pending: list[tuple[pb.Evidence, asyncio.Future[None]]] = []
        self._timer: asyncio.TimerHandle | None = None

    async def sign(self, content: bytes) -> pb.Evidence:
        """The signed evidence of ``content``, sealed with whatever else is waiting."""
        loop = asyncio.get_running_loop()
        evidence = pb.Evidence(content=content)
        done: asyncio.Future[None] = loop.create_future()
        self._pending.append((evidence, done))
        if len(self._pending) >= self._max_batch:
            self._flush()
        elif self._timer is None:
            self._timer = loop.call_later(self._linger_s, self._flush)
        await done
        return evidence

    def _flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        batch, self._pending = self._pending, []
        if not batch:
            return
        try:
            self._seal([evidence for evidence, _ in batch])
        except Exception as exc:  # every waiting caller learns it, none is left hanging
            for _, done in batch:
                if not done.done():
                    done.set_exception(exc)
            return
        for _, done in batch:
            if not done.done():
                done.set_result(None)
