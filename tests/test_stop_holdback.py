"""Stop strings (B43): text that may still become a stop string is held back, never lost."""

from __future__ import annotations

from rbee_agent.worker.engine import _StopHoldback


def run(stops: list[str], pieces: list[str]) -> tuple[str, bool]:
    h = _StopHoldback(stops)
    out = ""
    for piece in pieces:
        text, hit = h.feed(piece)
        out += text
        if hit:
            return out, True
    return out + h.flush(), False


def test_stop_spanning_pieces_is_cut_before_it() -> None:
    assert run(["END"], ["hello E", "N", "D more"]) == ("hello ", True)


def test_partial_match_that_fails_is_released() -> None:
    assert run(["END"], ["hello E", "Nx", " bye"]) == ("hello ENx bye", False)


def test_no_stops_passes_everything_through() -> None:
    h = _StopHoldback([])
    assert h.feed("abc") == ("abc", False)


def test_earliest_of_several_stops_wins() -> None:
    assert run(["\n\n", "User:"], ["Answer. User: hi\n\n"]) == ("Answer. ", True)


def test_held_tail_is_flushed_at_the_end() -> None:
    assert run(["STOP"], ["the end ST"]) == ("the end ST", False)
