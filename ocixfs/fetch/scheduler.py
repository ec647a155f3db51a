"""Fetch slots: which queued fetch runs next.

On-demand tickets (a program is waiting on a read) have slots of their own, served first
in, first out. Every other priority (read-ahead, prefetch, background) shares a separate,
smaller pool, best priority first and oldest first within one, and only while no
on-demand ticket waits. So queued background work can never delay a read, and a read
never waits behind more than the on-demand slots.

A ticket is queued when it is submitted (not when its task first runs: trio starts tasks
in random order), so service order within a priority is submission order. ``promote``
moves a queued ticket to a more urgent priority (a read joined a prefetch). A waiter that
is cancelled gives up its place, or its slot if it had one.

With a ``HostDemand`` (``cache.demand``) the rule holds host-wide: this scheduler marks
the host busy while it has on-demand tickets, and grants no background slot while another
process has some; ``held_by_host`` then says tickets wait for the host, and whoever owns
the scheduler calls ``dispatch()`` again a little later (the ``on_held`` callback says when
to start doing so).

Everything runs on the trio thread, and code between two awaits is atomic there, so the
queues need no locks: no method but ``acquire`` awaits.
"""

from __future__ import annotations

import enum
import heapq
from collections import deque
from collections.abc import Callable

import trio

from ocixfs.cache.demand import HostDemand

__all__ = ["Priority", "Scheduler", "Ticket"]


class Priority(enum.IntEnum):
    """Lower is more urgent. Only ``ON_DEMAND`` uses the on-demand slots."""

    ON_DEMAND = 0
    READAHEAD = 1
    PREFETCH = 2
    BACKGROUND = 3


class Ticket:
    """One request for a slot: ``granted`` is set once it holds one."""

    __slots__ = ("abandoned", "granted", "priority", "seq", "slot_on_demand")

    def __init__(self, priority: Priority, seq: int) -> None:
        self.priority = priority
        self.seq = seq
        self.granted = trio.Event()
        self.abandoned = False
        self.slot_on_demand: bool | None = None  # None: holds no slot


class Scheduler:
    """``on_demand_slots`` for on-demand tickets, ``background_slots`` for the rest (at
    least one each); ``host`` and ``on_held``: see the module doc."""

    def __init__(
        self,
        on_demand_slots: int,
        background_slots: int,
        *,
        host: HostDemand | None = None,
        on_held: Callable[[], None] | None = None,
    ) -> None:
        self._on_demand_slots = self._free_on_demand = max(1, on_demand_slots)
        self._free_background = max(1, background_slots)
        self._on_demand: deque[Ticket] = deque()
        self._background: list[tuple[int, int, Ticket]] = []
        self._seq = 0
        self._host = host
        self._on_held = on_held
        self.held_by_host = False

    def submit(self, priority: Priority) -> Ticket:
        """Queue a request now (so submission order is service order within a priority);
        the ticket may be granted at once."""
        self._seq += 1
        ticket = Ticket(priority, self._seq)
        self._enqueue(ticket)
        self._dispatch()
        return ticket

    async def acquire(self, ticket: Ticket) -> None:
        """Wait until ``ticket`` holds a slot; if cancelled, give up its place or slot."""
        try:
            await ticket.granted.wait()
        except BaseException:
            if ticket.slot_on_demand is None:
                ticket.abandoned = True
            else:
                self.release(ticket)
            raise

    def release(self, ticket: Ticket) -> None:
        if ticket.slot_on_demand is True:
            self._free_on_demand += 1
        elif ticket.slot_on_demand is False:
            self._free_background += 1
        ticket.slot_on_demand = None
        self._dispatch()

    def promote(self, ticket: Ticket, priority: Priority) -> None:
        """Raise a queued ticket's priority (no effect once it holds a slot)."""
        if priority >= ticket.priority or ticket.granted.is_set():
            return
        ticket.priority = priority  # its old heap entry is now stale and will be skipped
        self._enqueue(ticket)
        self._dispatch()

    def dispatch(self) -> None:
        """Grant what may run now (after the host's on-demand fetches may have ended)."""
        self._dispatch()

    def queued(self) -> int:
        waiting = {id(t) for t in self._on_demand if self._live(t, t.priority)}
        waiting |= {id(t) for p, _, t in self._background if self._live(t, p)}
        return len(waiting)

    def _enqueue(self, ticket: Ticket) -> None:
        if ticket.priority is Priority.ON_DEMAND:
            self._on_demand.append(ticket)
        else:
            heapq.heappush(self._background, (ticket.priority, ticket.seq, ticket))

    @staticmethod
    def _live(ticket: Ticket, priority: int) -> bool:
        return not ticket.abandoned and not ticket.granted.is_set() and ticket.priority == priority

    def _dispatch(self) -> None:
        while self._on_demand and self._free_on_demand:
            ticket = self._on_demand.popleft()
            if self._live(ticket, Priority.ON_DEMAND):
                self._free_on_demand -= 1
                self._grant(ticket, on_demand=True)
        while self._on_demand and not self._live(self._on_demand[0], Priority.ON_DEMAND):
            self._on_demand.popleft()
        if self._host is not None:
            self._host.set_busy(bool(self._on_demand)
                                or self._free_on_demand < self._on_demand_slots)
        if self._on_demand:
            return
        while self._background and not self._live(self._background[0][2],
                                                  self._background[0][0]):
            heapq.heappop(self._background)
        held = bool(self._background and self._free_background and self._host is not None
                    and self._host.others_busy())
        if held and not self.held_by_host and self._on_held is not None:
            self._on_held()
        self.held_by_host = held
        if held:
            return
        while self._background and self._free_background:
            priority, _, ticket = heapq.heappop(self._background)
            if self._live(ticket, priority):
                self._free_background -= 1
                self._grant(ticket, on_demand=False)

    @staticmethod
    def _grant(ticket: Ticket, *, on_demand: bool) -> None:
        ticket.slot_on_demand = on_demand
        ticket.granted.set()
