"""The fetch scheduler on its own: priority order, slot classes, promotion, cancellation.

Pure trio, no network: tickets are submitted and granted as the fetcher's flights would.
"""

from __future__ import annotations

from pathlib import Path

import trio
import trio.testing

from ocixfs.cache.demand import HostDemand
from ocixfs.fetch.scheduler import Priority, Scheduler, Ticket


def granted(tickets: list[Ticket]) -> list[bool]:
    return [ticket.granted.is_set() for ticket in tickets]


def test_on_demand_is_served_first_in_first_out_from_its_own_slots() -> None:
    scheduler = Scheduler(on_demand_slots=2, background_slots=1)
    reads = [scheduler.submit(Priority.ON_DEMAND) for _ in range(4)]
    assert granted(reads) == [True, True, False, False]
    scheduler.release(reads[0])
    assert granted(reads) == [True, True, True, False]
    scheduler.release(reads[2])
    assert granted(reads) == [True, True, True, True]
    assert scheduler.queued() == 0


def test_background_waits_while_a_read_waits_even_with_free_background_slots() -> None:
    scheduler = Scheduler(on_demand_slots=1, background_slots=4)
    first_read = scheduler.submit(Priority.ON_DEMAND)
    second_read = scheduler.submit(Priority.ON_DEMAND)  # queued: the one slot is taken
    prefetch = scheduler.submit(Priority.PREFETCH)
    assert granted([first_read, second_read, prefetch]) == [True, False, False]
    scheduler.release(first_read)
    assert granted([second_read, prefetch]) == [True, True]


def test_background_slots_never_serve_reads_and_reads_never_take_background_slots() -> None:
    scheduler = Scheduler(on_demand_slots=1, background_slots=1)
    prefetch = scheduler.submit(Priority.PREFETCH)
    read = scheduler.submit(Priority.ON_DEMAND)
    assert granted([prefetch, read]) == [True, True]  # the read did not wait for the prefetch
    another = scheduler.submit(Priority.BACKGROUND)
    scheduler.release(read)  # a free on-demand slot does not go to background work
    assert not another.granted.is_set()
    scheduler.release(prefetch)
    assert another.granted.is_set()


def test_best_priority_then_oldest_first() -> None:
    scheduler = Scheduler(on_demand_slots=1, background_slots=1)
    holder = scheduler.submit(Priority.BACKGROUND)
    background = scheduler.submit(Priority.BACKGROUND)
    prefetch_a = scheduler.submit(Priority.PREFETCH)
    readahead = scheduler.submit(Priority.READAHEAD)
    prefetch_b = scheduler.submit(Priority.PREFETCH)
    order = []
    current = holder
    for _ in range(4):
        scheduler.release(current)
        (current,) = [t for t in (background, prefetch_a, readahead, prefetch_b)
                      if t.granted.is_set() and t not in order]
        order.append(current)
    assert order == [readahead, prefetch_a, prefetch_b, background]


def test_promotion_lets_a_queued_prefetch_jump_to_the_on_demand_slots() -> None:
    scheduler = Scheduler(on_demand_slots=1, background_slots=1)
    busy = scheduler.submit(Priority.PREFETCH)
    wanted = scheduler.submit(Priority.PREFETCH)
    assert not wanted.granted.is_set()
    scheduler.promote(wanted, Priority.ON_DEMAND)  # a read joined that flight
    assert wanted.granted.is_set() and wanted.slot_on_demand is True
    assert busy.slot_on_demand is False
    assert scheduler.queued() == 0
    scheduler.release(wanted)
    scheduler.release(busy)  # both slot classes are whole again
    for priority in (Priority.ON_DEMAND, Priority.PREFETCH):
        assert scheduler.submit(priority).granted.is_set()


def test_promotion_to_a_lower_priority_or_after_the_grant_changes_nothing() -> None:
    scheduler = Scheduler(on_demand_slots=1, background_slots=1)
    running = scheduler.submit(Priority.READAHEAD)
    scheduler.promote(running, Priority.ON_DEMAND)
    assert running.slot_on_demand is False  # already running: it keeps its slot
    queued = scheduler.submit(Priority.READAHEAD)
    scheduler.promote(queued, Priority.BACKGROUND)
    assert queued.priority is Priority.READAHEAD


async def test_a_cancelled_waiter_gives_up_its_place() -> None:
    scheduler = Scheduler(on_demand_slots=1, background_slots=1)
    holder = scheduler.submit(Priority.PREFETCH)
    gave_up = scheduler.submit(Priority.PREFETCH)
    after = scheduler.submit(Priority.PREFETCH)
    with trio.move_on_after(0.01):
        await scheduler.acquire(gave_up)
    assert gave_up.abandoned
    assert scheduler.queued() == 1
    scheduler.release(holder)
    assert after.granted.is_set() and not gave_up.granted.is_set()


async def test_a_cancelled_holder_returns_its_slot() -> None:
    scheduler = Scheduler(on_demand_slots=1, background_slots=1)
    ticket = scheduler.submit(Priority.ON_DEMAND)
    waiting = scheduler.submit(Priority.ON_DEMAND)
    with trio.CancelScope() as scope:
        scope.cancel()
        await scheduler.acquire(ticket)  # granted already, but the checkpoint is cancelled
    assert waiting.granted.is_set()


async def test_many_tasks_never_exceed_the_slots_and_all_finish(
    autojump_clock: trio.testing.MockClock,
) -> None:
    scheduler = Scheduler(on_demand_slots=3, background_slots=2)
    running = {"on_demand": 0, "background": 0}
    most = {"on_demand": 0, "background": 0}
    finished: list[Priority] = []

    async def fetch(priority: Priority, seconds: float) -> None:
        ticket = scheduler.submit(priority)
        await scheduler.acquire(ticket)
        kind = "on_demand" if priority is Priority.ON_DEMAND else "background"
        running[kind] += 1
        most[kind] = max(most[kind], running[kind])
        try:
            await trio.sleep(seconds)
        finally:
            running[kind] -= 1
            scheduler.release(ticket)
            finished.append(priority)

    async with trio.open_nursery() as nursery:
        for index in range(20):
            nursery.start_soon(fetch, Priority.PREFETCH, 1.0 + index % 3)
        await trio.sleep(0.5)  # background work is running when the reads arrive
        for _ in range(9):
            nursery.start_soon(fetch, Priority.ON_DEMAND, 1.0)
    assert most == {"on_demand": 3, "background": 2}
    assert len(finished) == 29
    # Reads arrived after 2 prefetches started, yet all 9 finished before the 8th prefetch:
    # background slots are not handed out while a read waits.
    assert finished.index(Priority.ON_DEMAND) < 4
    last_read = len(finished) - 1 - finished[::-1].index(Priority.ON_DEMAND)
    assert finished[: last_read + 1].count(Priority.PREFETCH) <= 6


# --- host-wide: on-demand fetches of other processes come first (cache.demand) ---


def test_reads_of_other_processes_hold_background_slots_back(tmp_path: Path) -> None:
    """Two processes' markers on one lock file (two opens of it: OFD locks conflict between
    them as between processes). Background tickets of one wait while the other has
    on-demand tickets, and go once it has none."""
    lock = tmp_path / "demand.lock"
    mine, theirs = HostDemand(lock), HostDemand(lock)
    held: list[str] = []
    here = Scheduler(1, 2, host=mine, on_held=lambda: held.append("held"))
    there = Scheduler(1, 2, host=theirs)
    their_read = there.submit(Priority.ON_DEMAND)
    assert mine.others_busy() and not theirs.others_busy()
    prefetch = here.submit(Priority.PREFETCH)
    assert granted([their_read, prefetch]) == [True, False]
    assert here.held_by_host and held == ["held"]
    here.dispatch()  # still busy there: still held, and no second call to on_held
    assert not prefetch.granted.is_set() and held == ["held"]
    there.release(their_read)
    assert not mine.others_busy()
    here.dispatch()
    assert prefetch.granted.is_set() and not here.held_by_host


def test_own_reads_do_not_count_as_the_hosts(tmp_path: Path) -> None:
    """A scheduler's own on-demand tickets order its queue as before; its marker says so to
    others only while it has some (queued or running)."""
    lock = tmp_path / "demand.lock"
    mine, other = HostDemand(lock), HostDemand(lock)
    scheduler = Scheduler(1, 1, host=mine)
    read = scheduler.submit(Priority.ON_DEMAND)
    queued_read = scheduler.submit(Priority.ON_DEMAND)
    prefetch = scheduler.submit(Priority.PREFETCH)
    assert other.others_busy() and not mine.others_busy()
    scheduler.release(read)
    assert other.others_busy()  # the queued read now runs
    scheduler.release(queued_read)
    assert granted([prefetch]) == [True] and not scheduler.held_by_host
    assert not other.others_busy()
    mine.close()
    other.close()
