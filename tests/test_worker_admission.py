"""B100: the slot count and the FIFO queue in front of it, without a model."""

from __future__ import annotations

import pytest

from rbee_agent.worker.admission import Admission, Ticket


def ticket(log: list[tuple[str, int]], name: str) -> Ticket:
    return Ticket(lambda position: log.append((name, position)))


async def test_b100_slots_first_then_the_queue_in_order() -> None:
    gate = Admission(total=2, depth=2)
    log: list[tuple[str, int]] = []
    a, b, c, d = (ticket(log, n) for n in "abcd")
    assert gate.enter(a) and gate.enter(b)
    assert not gate.enter(c) and not gate.enter(d)
    assert gate.full and (gate.busy, gate.queued) == (2, 2)
    assert log == [("c", 0), ("d", 1)]
    gate.release()
    assert c.granted.done() and not d.granted.done()
    assert log[-1] == ("d", 0) and not gate.full
    gate.release()
    assert d.granted.done() and (gate.busy, gate.queued) == (2, 0)


async def test_b100_leaving_the_queue_moves_the_others_up() -> None:
    gate = Admission(total=1, depth=3)
    log: list[tuple[str, int]] = []
    a, b, c, d = (ticket(log, n) for n in "abcd")
    gate.enter(a)
    for t in (b, c, d):
        gate.enter(t)
    assert gate.leave(c) and not gate.leave(c)
    assert log[-1] == ("d", 1) and gate.queued == 2
    assert gate.drain() == [b, d] and gate.queued == 0
    assert not b.granted.done()


async def test_b100_a_newcomer_never_overtakes_the_queue() -> None:
    gate = Admission(total=1, depth=1)
    log: list[tuple[str, int]] = []
    a, b, c = (ticket(log, n) for n in "abc")
    gate.enter(a)
    gate.enter(b)
    gate.release()  # the slot goes to b in the same call: nothing is free for c
    assert b.granted.done() and gate.busy == 1
    assert not gate.enter(c) and gate.queued == 1


def test_b100_depth_and_slots_are_checked() -> None:
    with pytest.raises(ValueError):
        Admission(total=0, depth=1)
    with pytest.raises(ValueError):
        Admission(total=1, depth=-1)
