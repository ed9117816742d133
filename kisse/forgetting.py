"""The server forgets: disappearing messages at their `expires_at`, and with
`KISSE_RETENTION_DAYS` every message, content and call older than that.

Reads never show an expired message (storage filters them the moment they
expire); this sweep deletes them for good, every `KISSE_FORGET_SWEEP_INTERVAL`,
in batches that yield to the loop between them. In a cluster one node sweeps
at a time: the one holding the storage lease `forget`.
"""
from __future__ import annotations

import asyncio
import logging
from datetime import timedelta

from kisse.runtime import Runtime
from storage.base import new_id, utcnow

log = logging.getLogger("kisse.forgetting")
BATCH = 500
LEASE_NAME = "forget"


class Forgetting:
    def __init__(self, rt: Runtime) -> None:
        self.rt = rt
        self.owner = new_id()  # this process, for the lease
        self.forgotten = 0     # messages deleted by this process (a metric)

    def start(self) -> None:
        every = self.rt.settings.forget_sweep_interval
        self.rt.tasks.every(every, self.sweep, "forget sweep")

    async def sweep(self) -> int:
        """One pass: every message due goes; return how many."""
        settings = self.rt.settings
        # The lease outlives a few missed passes, so a node that stalls briefly keeps it.
        if not await self.rt.storage.take_lease(LEASE_NAME, self.owner, 3 * settings.forget_sweep_interval + 1):
            return 0
        now = utcnow()
        cutoff = now - timedelta(days=settings.retention_days) if settings.retention_days else None
        total = 0
        while True:
            gone = await self.rt.storage.forget_messages(now, created_before=cutoff, limit=BATCH)
            total += gone
            if gone < BATCH:
                break
            await asyncio.sleep(0)  # a big backlog never holds the loop
        if cutoff is not None:
            await self.rt.storage.forget_calls(cutoff)
        self.forgotten += total
        return total
