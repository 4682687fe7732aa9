"""Image embeddings of recently seen uploads, so that a follow-up question about the same picture skips the ViT.

Owned by the executor thread alone: no locks.
"""

from __future__ import annotations

from collections import OrderedDict

import torch


class ImageEmbeddingCache:
    """LRU keyed by the sha256 of the uploaded bytes, bounded by entries and by bytes."""

    def __init__(self, max_entries: int, max_bytes: int) -> None:
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self._items: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.bytes = 0

    def __len__(self) -> int:
        return len(self._items)

    def holds(self, key: str) -> bool:
        """Whether `key` is cached, without touching its recency. Safe to call from the event loop (one dict
        lookup under the GIL), but only a hint there: the model thread may evict it the next moment."""
        return key in self._items

    def get(self, key: str) -> torch.Tensor | None:
        t = self._items.get(key)
        if t is not None:
            self._items.move_to_end(key)
        return t

    def put(self, key: str, embeds: torch.Tensor) -> None:
        size = embeds.numel() * embeds.element_size()
        if self.max_entries == 0 or size > self.max_bytes:
            return
        old = self._items.pop(key, None)
        if old is not None:
            self.bytes -= old.numel() * old.element_size()
        self._items[key] = embeds
        self.bytes += size
        while len(self._items) > self.max_entries or self.bytes > self.max_bytes:
            self._evict_oldest()

    def shrink(self, keep: float) -> None:
        """Drops the least recently used entries until at most `keep` of the bytes remain."""
        target = self.bytes * keep
        while self._items and self.bytes > target:
            self._evict_oldest()

    def _evict_oldest(self) -> None:
        _, evicted = self._items.popitem(last=False)
        self.bytes -= evicted.numel() * evicted.element_size()

    def clear(self) -> None:
        self._items.clear()
        self.bytes = 0
