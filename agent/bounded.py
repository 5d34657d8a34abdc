"""A FIFO bounded in items and, optionally, in bytes, that makes room by dropping its oldest.

The one queue behind every "drop the oldest" buffer: a sink's outlet queue (items), each
WebSocket client's queue (items and bytes) and the WebSocket replay buffer (items and bytes).
It only holds and counts; what a drop means (a counter, a ``lag`` message) is the owner's.

Guarantees: after :meth:`BoundedQueue.push`, ``len(q) <= max_items`` and ``q.bytes <= max_bytes``;
the items kept are always the newest; an item larger than ``max_bytes`` on its own is never
queued (it counts as one drop). ``max_items = 0`` keeps nothing. Not thread-safe.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

T = TypeVar("T")


class BoundedQueue(Generic[T]):
    """See the module docstring. ``size`` gives an item's bytes (only used with ``max_bytes``)."""

    __slots__ = ("max_items", "max_bytes", "_size", "_items", "bytes")

    def __init__(self, max_items: int, max_bytes: int | None = None,
                 size: Callable[[T], int] | None = None) -> None:
        if max_bytes is not None and size is None:
            raise ValueError("a byte bound needs a size function")
        self.max_items = max_items
        self.max_bytes = max_bytes
        self._size = size
        self._items: deque[T] = deque()
        self.bytes = 0  # sum of size(item) over the items held (0 without a byte bound)

    def __len__(self) -> int:
        return len(self._items)

    def __iter__(self) -> Iterator[T]:
        """Oldest first."""
        return iter(self._items)

    def __getitem__(self, index: int) -> T:
        return self._items[index]

    @property
    def full(self) -> bool:
        """Whether the next push would drop something (by count; bytes depend on the item)."""
        over_bytes = self.max_bytes is not None and self.bytes >= self.max_bytes
        return len(self._items) >= self.max_items or over_bytes

    def push(self, item: T) -> int:
        """Append ``item``, dropping the oldest until both bounds hold; returns how many items
        were dropped (the item itself counts, if it alone is over ``max_bytes`` or max_items is 0)."""
        size = self._size(item) if self.max_bytes is not None and self._size is not None else 0
        if self.max_items == 0 or (self.max_bytes is not None and size > self.max_bytes):
            return 1
        dropped = 0
        items = self._items
        while items and (len(items) >= self.max_items
                         or (self.max_bytes is not None and self.bytes + size > self.max_bytes)):
            self._forget(items.popleft())
            dropped += 1
        items.append(item)
        self.bytes += size
        return dropped

    def extend(self, items: list[T]) -> int:
        """:meth:`push` each of ``items``, in order; returns how many items were dropped in all."""
        if self.max_bytes is not None:
            return sum(self.push(item) for item in items)
        queue = self._items
        queue.extend(items)
        over = len(queue) - self.max_items
        for _ in range(max(over, 0)):
            queue.popleft()
        return max(over, 0)

    def pop(self) -> T:
        """Remove and return the oldest item (IndexError if empty)."""
        item = self._items.popleft()
        self._forget(item)
        return item

    def take(self, count: int) -> list[T]:
        """Remove and return the ``count`` oldest items (fewer if fewer are held)."""
        count = min(count, len(self._items))
        if self.max_bytes is None:
            popleft = self._items.popleft
            return [popleft() for _ in range(count)]
        return [self.pop() for _ in range(count)]

    def clear(self) -> int:
        """Remove everything; returns how many items were held."""
        count = len(self._items)
        self._items.clear()
        self.bytes = 0
        return count

    def _forget(self, item: T) -> None:
        if self.max_bytes is not None and self._size is not None:
            self.bytes -= self._size(item)
