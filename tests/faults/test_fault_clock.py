"""Clock skew between workers: two queue instances on one store, each with its own clock.

Documented tolerance (README, "Leases"): a lease is taken over only ``clock_skew`` seconds after
it expired *by the taker's clock*. So a worker whose clock runs ahead by less than
``clock_skew`` never takes over a live lease; one ahead by more than ``lease + clock_skew``
takes over at once (the guarantee needs clocks within ``clock_skew``).
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import pytest

from omniq.core import LeaseLostError, Task, TaskStatus
from omniq.storage.file.queue import AsyncFileQueue
from queue_helpers import FakeClock

LEASE, SKEW = 10.0, 5.0


@pytest.fixture(params=["memory", "local"])
def base(request: pytest.FixtureRequest, tmp_path: Any) -> str:
    if request.param == "memory":
        return f"memory://omniq-clock-{uuid.uuid4().hex}"
    return str(tmp_path / "store")


def _pair(base: str, ahead: float) -> tuple[AsyncFileQueue, FakeClock, AsyncFileQueue, FakeClock]:
    clock_a = FakeClock()
    clock_b = FakeClock()
    clock_b.t = clock_a.t + ahead
    qa = AsyncFileQueue(base, lease=LEASE, clock_skew=SKEW, clock=clock_a)
    qb = AsyncFileQueue(base, lease=LEASE, clock_skew=SKEW, clock=clock_b)
    return qa, clock_a, qb, clock_b


def _advance(seconds: float, *clocks: FakeClock) -> None:
    for clock in clocks:
        clock.advance(seconds)


@pytest.mark.parametrize("ahead", [1.0, 3.0, 4.9])
@pytest.mark.parametrize("left", [0.5, 0.01])
def test_clock_ahead_by_less_than_skew_never_takes_a_live_lease(
    base: str, ahead: float, left: float
) -> None:
    async def go() -> None:
        qa, clock_a, qb, clock_b = _pair(base, ahead)
        await qa.enqueue(Task(func="m:f", id="T1"))
        held = await qa.dequeue()
        assert held is not None and held.attempt == 1
        # By A's clock the lease has ``left`` seconds to go; by B's it expired
        # ``ahead - left`` seconds ago, which is less than clock_skew.
        _advance(LEASE - left, clock_a, clock_b)
        assert clock_b() > held.lease_until.timestamp()  # B does see it expired...
        assert await qb.reap() == []  # ...and still leaves it alone
        assert await qb.dequeue() is None
        info = await qb.get_task("T1")
        assert info.status is TaskStatus.RUNNING and info.attempt == 1
        held = await qa.extend_lease(held)  # A's heartbeat still holds
        await qa.ack(held)
        assert (await qb.get_task("T1")).status is TaskStatus.DONE
        assert await qb.reap() == [] and await qb.dequeue() is None

    asyncio.run(go())


@pytest.mark.parametrize("extra", [0.1, 3.0])
def test_clock_ahead_by_more_than_lease_plus_skew_takes_over_at_once(
    base: str, extra: float
) -> None:
    async def go() -> None:
        qa, clock_a, qb, _ = _pair(base, LEASE + SKEW + extra)
        await qa.enqueue(Task(func="m:f", id="T2"))
        held = await qa.dequeue()
        assert held is not None
        assert clock_a() < held.lease_until.timestamp()  # live by the holder's clock
        taken = await qb.reap()
        assert [c.id for c in taken] == ["T2"]
        again = await qb.dequeue()
        assert again is not None and again.id == "T2" and again.attempt == 2
        with pytest.raises(LeaseLostError):  # the holder learns it at its next heartbeat
            await qa.extend_lease(held)
        await qb.ack(again)
        assert (await qa.get_task("T2")).status is TaskStatus.DONE

    asyncio.run(go())


@pytest.mark.parametrize("offset", [0.0, -3.0, 2.0])
def test_take_over_happens_exactly_lease_plus_skew_after_expiry_by_the_takers_clock(
    base: str, offset: float
) -> None:
    """B's clock is ``offset`` seconds off A's; A dies holding the task. B takes it over
    when *its* clock passes lease_until + clock_skew, not a moment before."""

    async def go() -> None:
        qa, clock_a, qb, clock_b = _pair(base, offset)
        await qa.enqueue(Task(func="m:f", id="T3"))
        held = await qa.dequeue()
        assert held is not None
        deadline = held.lease_until.timestamp() + SKEW
        _advance(deadline - clock_b() - 0.05, clock_a, clock_b)
        assert await qb.reap() == [] and await qb.dequeue() is None
        _advance(0.1, clock_a, clock_b)
        assert [c.id for c in await qb.reap()] == ["T3"]
        again = await qb.dequeue()
        assert again is not None and again.attempt == 2

    asyncio.run(go())
