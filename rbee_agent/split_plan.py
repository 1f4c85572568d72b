"""How a split's layers go over its nodes (B204, B210): pure arithmetic, shared by the head
agent's admission (`split_placement.py`) and the operator's preview in the spawn dialog, so
the dialog shows the plan the agent will make from the same numbers.

llama.cpp keeps the first layers on the head node and puts the last ones on the RPC peers in
the order given; each node's share follows the memory it offers, unless the peers' total is
asked for. This module must never touch a process or a device (the operator imports it).
"""

from __future__ import annotations


def shares(total: int, weights: list[int]) -> list[int]:
    """`total` items in proportion to `weights` (largest remainder; sums to `total`)."""
    whole = sum(max(0, w) for w in weights)
    if whole <= 0:
        weights, whole = [1] * len(weights), len(weights)
    exact = [total * max(0, w) / whole for w in weights]
    parts = [int(x) for x in exact]
    by_remainder = sorted(range(len(weights)), key=lambda i: exact[i] - parts[i], reverse=True)
    for i in by_remainder[: total - sum(parts)]:
        parts[i] += 1
    return parts


def layer_counts(layers: int, head_free_mb: int, peer_free_mb: list[int],
                 peer_layers: int | None = None) -> list[int]:
    """Layers per node, the head first: `peer_layers` of them over the peers (by their free
    memory) when asked, else all of them in proportion to every node's free memory."""
    layers = max(layers, 1)
    if peer_layers is not None and peer_layers >= 0:
        on_peers = min(peer_layers, layers)
        return [layers - on_peers, *shares(on_peers, peer_free_mb)]
    return shares(layers, [max(0, head_free_mb), *peer_free_mb])
