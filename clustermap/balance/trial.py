"""A half-open node's one trial request, served by the one worker process the sidecar chose.

The sidecar grants a half-open node's trial to one feedback row (``Overlay.trials``, see
docs/feedback.md); the node stays ejected in every picker. The process holding that row arms
the picker it builds for the service's new version with :func:`offer_trial`: its next key-less
pick (any strategy, least_request included, through ``pick``, ``call`` or the picker's
iterators) returns the node, once, and the picker's own iterators are put back, so the warm
path of every other pick, and of every other process, is unchanged. Keyed picks never serve a
trial: a key maps to the same node in every process, and the trial node owns no key while it
is ejected.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from functools import partial
from typing import Final

from clustermap.balance.picker import ServicePicker
from clustermap.model import Node, Service, Trial

__all__ = ["offer_trial", "serve_once"]

#: Trials this process has served: a picker rebuilt while the grant is still published (another
#: change of the service) must not serve it again. Bounded; per process (a forked child has
#: another row, so its parent's grants are never its own).
_served: dict[tuple[str, Trial], None] = {}
_SERVED_MAX: Final = 1024


class _Next:
    """An endless iterator whose ``next()`` calls ``fn``."""

    __slots__ = ("fn",)

    def __init__(self, fn: Callable[[], Node]) -> None:
        self.fn = fn

    def __iter__(self) -> _Next:
        return self

    def __next__(self) -> Node:
        return self.fn()


def serve_once(
    picker: ServicePicker, node: Node, served: Callable[[], None] = lambda: None
) -> None:
    """Make the next key-less pick of ``picker`` return ``node``, once (``served`` is called
    then), whichever thread makes it; later picks are the picker's own again."""
    once = [node]
    iters = picker.iters
    default_it = picker.default_it
    armed: dict[str, Iterator[Node]] = {}

    def first(inner: Iterator[Node]) -> Node:
        try:
            n = once.pop()  # atomic under the GIL: one pick gets it
        except IndexError:
            return next(inner)
        if picker.iters is armed:  # put ours back, unless the picker rebuilt itself meanwhile
            picker.iters = iters
            picker.default_it = default_it
            picker.default = default_it.__next__
        served()
        return n

    for name, it in iters.items():
        armed[name] = _Next(partial(first, it))
    # The client sends strategy="least_request" through ``iters`` when it has that key.
    armed["least_request"] = _Next(partial(first, _Next(picker.least_request)))
    picker.default_it = _Next(partial(first, default_it))
    picker.default = picker.default_it.__next__
    picker.iters = armed


def offer_trial(service: Service, picker: ServicePicker, owner: int, now_ns: int) -> bool:
    """Arm ``picker`` (key-less picks of ``service``, as this process routes them) with the
    trial granted to the row whose owner word is ``owner``, if any is still running and its
    node is one this picker could serve. True when armed."""
    overlay = service.overlay
    if overlay is None or not owner:
        return False
    for t in overlay.trials:
        if t.owner != owner or now_ns >= t.until_ns or (service.name, t) in _served:
            continue
        node = service.nodes[t.position]
        if not node.healthy or not any(n is node for n in picker.service.nodes):
            continue  # not ours to serve here (another zone, or down meanwhile)
        serve_once(picker, node, partial(_mark, service.name, t))
        return True
    return False


def _mark(name: str, t: Trial) -> None:
    if len(_served) >= _SERVED_MAX:
        _served.clear()
    _served[(name, t)] = None
