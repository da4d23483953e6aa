"""Walking every rank's program, and the position in each channel's message order.

:func:`walk` is the one loop behind the validator's deadlock check, the simulator, the comm
plan's rounds and the plan checker: offer each rank, in rank order, to advance its program
until a whole round moves nothing. What "advance" means (a step whose inputs are produced, a
group whose messages can start...) is the caller's.

:class:`ChannelCursor` is one side's position in the per-channel order of messages (a channel
is an ordered rank pair; both sides know its order from the schedule): the comm plan posts and
checks with it, and the runtime's messages follow it.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Literal


def walk(num_ranks: int, advance: Callable[[int], bool], *, per_round: int | None = None,
         end_round: Callable[[], bool] | None = None) -> None:
    """Call ``advance(r)`` for every rank in turn while it returns True (at most ``per_round``
    times per rank and round), then ``end_round()`` (True when it made progress of its own,
    e.g. delivered messages); stop after a round in which nothing progressed."""
    while True:
        moved = False
        for r in range(num_ranks):
            taken = 0
            while (per_round is None or taken < per_round) and advance(r):
                taken += 1
                moved = True
        if end_round is not None and end_round():
            moved = True
        if not moved:
            return


class ChannelCursor:
    """One rank's position in the message order of its channels on one side: the channels it
    sends on (``side="send"``: peer = destination) or receives on (``"recv"``: peer = source).
    ``channels[(src, dst)]`` is the ordered list of message keys ``src`` sends to ``dst``."""

    def __init__(self, channels: Mapping[tuple[int, int], Sequence[Hashable]], me: int,
                 side: Literal["send", "recv"]) -> None:
        mine = 0 if side == "send" else 1
        self.order: dict[int, Sequence[Hashable]] = {
            pair[1 - mine]: keys for pair, keys in channels.items() if pair[mine] == me}
        self.pos: dict[int, int] = dict.fromkeys(self.order, 0)

    def take(self, peer: int, key: Hashable) -> int | None:
        """Advance past ``key`` if it is the next message with ``peer``; its position in the
        channel, or None (nothing advanced) when it is not the next one."""
        pos = self.pos.get(peer, 0)
        order = self.order.get(peer, ())
        if pos >= len(order) or order[pos] != key:
            return None
        self.pos[peer] = pos + 1
        return pos

    def through(self, peer: int, key: Hashable, done: Callable[[Hashable], bool]
                ) -> list[Hashable]:
        """The messages with ``peer`` from the current position up to ``key`` (included),
        advanced past, unless ``done(key)`` already holds (then none)."""
        out: list[Hashable] = []
        order = self.order[peer]
        while not done(key) and key not in out:
            out.append(order[self.pos[peer]])
            self.pos[peer] += 1
        return out


__all__ = ["ChannelCursor", "walk"]
