"""State of a Ray Serve deployment shared between its processes (meswitch.server.ray_serve).

A light module on purpose: the Coordinator's process imports only this (no torch, no runtime).
"""
from __future__ import annotations

import logging
import time

from .conversations import ConversationMemory

log = logging.getLogger("meswitch.server.ray")
STALE_AFTER_S = 10.0  # a replica silent this long (dead, or scaled down) leaves /metrics


class Coordinator:
    """One small actor: the conversation memory and the replicas' latest runtime stats."""

    def __init__(self, conversations: int = 100_000):
        self.memory = ConversationMemory(conversations)
        self.reports: dict[str, tuple[float, dict]] = {}

    def remember(self, key: str, expert: str) -> None:
        self.memory._store(key, expert)

    def lookup(self, key: str) -> str | None:
        return self.memory._lookup(key)

    def report(self, replica: str, stats: dict) -> None:
        self.reports[replica] = (time.monotonic(), stats)

    def forget(self, replica: str) -> None:
        self.reports.pop(replica, None)

    def replica_stats(self) -> dict[str, dict]:
        now = time.monotonic()
        self.reports = {r: (t, s) for r, (t, s) in self.reports.items() if now - t < STALE_AFTER_S}
        return {r: s for r, (_, s) in self.reports.items()}


class SharedConversationMemory(ConversationMemory):
    """The app's conversation memory, kept by the Coordinator so that every ingress process (and
    a restarted one) sees it; this process keeps a local copy of what it wrote or read."""

    def __init__(self, coordinator, size: int = 10000, timeout_s: float = 5.0):
        super().__init__(size)
        self.coordinator, self.timeout_s = coordinator, timeout_s

    def _store(self, k: str, expert: str) -> None:
        super()._store(k, expert)
        self.coordinator.remember.remote(k, expert)  # not awaited: the answer does not wait for it

    def _lookup(self, k: str) -> str | None:  # called off the event loop (app.resolve's threadpool)
        found = super()._lookup(k)
        if found is None:
            try:
                found = self.coordinator.lookup.remote(k).result(timeout_s=self.timeout_s)
            except Exception as e:  # stickiness is a preference: route without it
                log.warning("conversation memory unavailable: %s", e)
                return None
            if found is not None:
                super()._store(k, found)
        return found
