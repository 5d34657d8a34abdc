"""BoundedQueue: the newest items within both bounds, every drop counted."""

from __future__ import annotations

from memagent.bounded import BoundedQueue


def test_count_bound_drops_the_oldest_and_says_how_many() -> None:
    """Past max_items the oldest go first; push returns how many it dropped."""
    queue: BoundedQueue[int] = BoundedQueue(3)
    assert [queue.push(i) for i in range(5)] == [0, 0, 0, 1, 1]
    assert list(queue) == [2, 3, 4] and queue.full


def test_byte_bound_keeps_the_newest_within_it() -> None:
    """With a byte bound the oldest go until the new item fits; bytes are tracked exactly."""
    queue: BoundedQueue[bytes] = BoundedQueue(100, 10, len)
    assert queue.push(b"aaaa") == 0 and queue.push(b"bbbb") == 0
    assert queue.push(b"cccccc") == 1  # 4 + 4 + 6 > 10: "aaaa" goes
    assert list(queue) == [b"bbbb", b"cccccc"] and queue.bytes == 10
    assert queue.take(1) == [b"bbbb"] and queue.bytes == 6
    assert queue.pop() == b"cccccc" and queue.bytes == 0 and not queue


def test_an_item_over_the_byte_bound_is_dropped_itself() -> None:
    """An item larger than the whole byte bound is never queued and nothing else is lost."""
    queue: BoundedQueue[bytes] = BoundedQueue(100, 10, len)
    queue.push(b"keep")
    assert queue.push(b"x" * 11) == 1
    assert list(queue) == [b"keep"] and queue.bytes == 4


def test_zero_items_keeps_nothing_and_clear_counts() -> None:
    """max_items 0 drops every push; clear returns what it held and resets the bytes."""
    assert BoundedQueue[int](0).push(1) == 1
    queue: BoundedQueue[bytes] = BoundedQueue(5, 100, len)
    for item in (b"a", b"bb", b"ccc"):
        queue.push(item)
    assert queue.clear() == 3 and queue.bytes == 0 and len(queue) == 0
