"""Batched random draws: the exact distribution of one rejection draw per call, fork- and
thread-safe."""

from __future__ import annotations

import os
import random
import threading
from collections import Counter

import pytest

from clustermap.balance import ServicePicker
from clustermap.balance.draws import BATCH, uniform_stream
from clustermap.model import Node, Service


def reference(n: int, count: int) -> list[int]:
    """The indices the stream must serve, drawn the slow way from the same generator state:
    a batch of BATCH bytes (or 16-bit words), rejecting values >= floor(2^b / n) * n."""
    out: list[int] = []
    bits, width = (8, 1) if n <= 256 else (16, 2)
    limit = (1 << bits) // n * n
    while len(out) < count:
        raw = random.getrandbits(bits * BATCH).to_bytes(width * BATCH, "little")
        for i in range(0, len(raw), width):
            x = int.from_bytes(raw[i : i + width], "little")
            if x < limit:
                out.append(x % n)
    return out[:count]


@pytest.mark.parametrize("n", [1, 2, 3, 7, 100, 255, 256, 257, 1000, 16384, 65536])
def test_stream_serves_exactly_the_rejection_draws(n: int) -> None:
    items = list(range(n))
    random.seed(n)
    expected = reference(n, 3 * BATCH)
    random.seed(n)
    draw = uniform_stream(items)
    assert [next(draw) for _ in range(3 * BATCH)] == expected


def test_more_than_65536_items_draw_one_per_call() -> None:
    items = list(range(70_000))
    draw = uniform_stream(items)
    seen = {next(draw) for _ in range(2000)}
    assert seen <= set(items)
    assert len(seen) > 1900


def test_empty_is_refused() -> None:
    with pytest.raises(ValueError, match="no items"):
        uniform_stream([])


def test_uniform_over_many_batches() -> None:
    random.seed(7)
    draw = uniform_stream("abcdefg")
    counts = Counter(next(draw) for _ in range(70_000))
    assert set(counts) == set("abcdefg")
    assert all(9_400 < c < 10_600 for c in counts.values())  # 10 000 each, sd ~93


def test_threads_share_a_stream_without_errors_or_losses() -> None:
    draw = uniform_stream(list(range(10)))
    barrier = threading.Barrier(8)
    errors: list[BaseException] = []
    totals: list[int] = []

    def worker() -> None:
        try:
            barrier.wait()
            got = [next(draw) for _ in range(20_000)]
            if not set(got) <= set(range(10)):
                raise AssertionError("out of range")
            totals.append(len(got))
        except BaseException as exc:  # collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert totals == [20_000] * 8


def test_forked_children_draw_differently() -> None:
    """Choices drawn before a fork must not repeat in every child: after_fork discards them."""
    nodes = tuple(Node(f"10.0.0.{i}", 80) for i in range(1, 65))
    picker = ServicePicker(Service("s", nodes, strategy="random"))
    picker.pick()  # the parent has a batch in hand
    sequences = []
    for _ in range(4):
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - runs in the child
            try:
                random.seed()  # what CPython's own at-fork hook does
                picker.after_fork()
                os.write(write_end, " ".join(picker.pick().address for _ in range(8)).encode())
            finally:
                os._exit(0)
        os.close(write_end)
        with os.fdopen(read_end, "rb") as pipe:
            sequences.append(pipe.read().decode())
        os.waitpid(pid, 0)
    assert all(sequences)
    assert len(set(sequences)) == 4
