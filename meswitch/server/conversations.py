"""Conversation stickiness for `auto`: which expert answered a conversation so far."""
from __future__ import annotations

import hashlib
import json
from collections import OrderedDict


class ConversationMemory:
    """Which expert answered a conversation so far: key = hash of the messages up to and including
    our answer. A follow-up request (same messages + new turn) finds it. Bounded, LRU, in this
    process; a subclass may keep the map elsewhere by overriding `_store` and `_lookup` (the Ray
    Serve ingress shares it between processes). `previous` may block: call it off the event loop."""

    def __init__(self, size: int = 10000):
        self.size = size
        self._map: OrderedDict[str, str] = OrderedDict()

    @staticmethod
    def key(messages: list[dict]) -> str:
        blob = json.dumps([[m["role"], m["content"]] for m in messages], ensure_ascii=False)
        return hashlib.blake2b(blob.encode(), digest_size=16).hexdigest()

    def remember(self, messages: list[dict], answer: str, expert: str) -> None:
        self._store(self.key(messages + [{"role": "assistant", "content": answer}]), expert)

    def _store(self, k: str, expert: str) -> None:
        self._map[k] = expert
        self._map.move_to_end(k)
        while len(self._map) > self.size:
            self._map.popitem(last=False)

    def _lookup(self, k: str) -> str | None:
        return self._map.get(k)

    def previous(self, messages: list[dict]) -> str | None:
        # the conversation before the newest user turn(s) ends with an assistant answer of ours
        for cut in range(len(messages) - 1, 0, -1):
            if messages[cut - 1]["role"] == "assistant":
                return self._lookup(self.key(messages[:cut]))
        return None
