"""B161: the numbers the dashboard derives from polls (plain Python, no Textual)."""

from __future__ import annotations

from rbee_tui.node_source import NodeSnapshot
from rbee_tui.node_stats import NodeStats
from tests.tui_support import NOW, node_info, worker


def snap(at: float, *workers: tuple[str, int], gpus: int = 1) -> NodeSnapshot:
    pool = tuple(worker(wid, "m", "busy", tokens) for wid, tokens in workers)
    return NodeSnapshot(name="n", status="up", info=node_info("n", gpus), workers=pool,
                        polled_at=at)


def test_b161_rates_are_per_worker_and_sum_to_the_node() -> None:
    stats = NodeStats()
    stats.add(snap(NOW, ("a", 100), ("b", 0)))
    assert stats.rate == 0.0 and stats.worker_rates == {}  # one poll: no rate yet
    stats.add(snap(NOW + 2, ("a", 130), ("b", 20)))
    assert stats.worker_rates == {"a": 15.0, "b": 10.0}
    assert stats.rate == 25.0


def test_b161_a_count_that_moves_only_when_a_reply_ends_gives_its_real_rate() -> None:
    """An agent that adds a request's tokens when it ends: 300 tokens after 20 busy seconds
    is 15 tokens/s, not a one-poll spike of 150."""
    stats = NodeStats()
    idle = worker("a", "m", "idle", 1000)
    busy = worker("a", "m", "busy", 1000, busy=True)
    stats.add(NodeSnapshot(name="n", status="up", info=node_info("n", 0), workers=(idle,),
                           polled_at=NOW))
    for t in range(2, 22, 2):  # the request runs from NOW+1 to NOW+21
        stats.add(NodeSnapshot(name="n", status="up", info=node_info("n", 0),
                               workers=(busy,), polled_at=NOW + t))
    done = idle.model_copy(update={"tokens_served": 1300})
    stats.add(NodeSnapshot(name="n", status="up", info=node_info("n", 0), workers=(done,),
                           polled_at=NOW + 22))
    assert stats.worker_rates == {"a": 300 / 22}


def test_b161_a_worker_that_goes_away_does_not_make_the_rate_jump() -> None:
    stats = NodeStats()
    stats.add(snap(NOW, ("a", 1000), ("b", 5000)))
    stats.add(snap(NOW + 2, ("a", 1030), ("b", 5040)))
    stats.add(snap(NOW + 4, ("a", 1060)))  # b stopped: its 5,040 tokens leave with it
    assert stats.worker_rates == {"a": 15.0}
    stats.add(snap(NOW + 6, ("a", 1060), ("c", 0)))  # c is new: no rate until its 2nd poll
    assert stats.worker_rates == {"a": 0.0}


def test_b161_a_node_that_does_not_answer_has_no_rates_and_keeps_its_history() -> None:
    stats = NodeStats()
    stats.add(snap(NOW, ("a", 10)))
    stats.add(snap(NOW + 2, ("a", 40)))
    stats.add(NodeSnapshot(name="n", status="down", reason="gone", polled_at=NOW + 4))
    assert stats.rate == 0.0
    assert len(stats.ram_used_mb) == 2
    stats.add(snap(NOW + 6, ("a", 40)))
    assert stats.worker_rates == {}  # the first poll after coming back starts over


def test_b161_history_has_ram_and_per_gpu_vram_utilisation_temperature_power() -> None:
    stats = NodeStats(points=3)
    for i in range(5):
        stats.add(snap(NOW + 2 * i, gpus=2))
    assert len(stats.ram_used_mb) == 3  # bounded
    assert stats.ram_total_mb == 64 * 1024
    assert sorted(stats.gpus) == [0, 1]
    gpu1 = stats.gpus[1]
    assert list(gpu1.vram_used_mb) == [14000.0] * 3 and gpu1.vram_total_mb == 24564
    assert list(gpu1.utilization_percent) == [60.0] * 3
    assert list(gpu1.temperature_c) == [62.0] * 3 and list(gpu1.power_w) == [220.0] * 3
    stats.add(snap(NOW + 20, gpus=1))  # a GPU that disappeared takes its history along
    assert sorted(stats.gpus) == [0]
