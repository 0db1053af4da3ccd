"""α–β costs of point-to-point messages and ring collectives. Units: seconds.

Model (Hockney): sending n bytes over a link costs α + n/β. Collectives use
the ring algorithms of Thakur, Rabenseifner & Gropp, "Optimization of
Collective Communication Operations in MPICH" (IJHPCA 2005), which NCCL
implements; NCCL's performance notes (nccl-tests doc/PERFORMANCE.md) give the
same per-rank traffic factors: all-reduce 2(p−1)/p, all-gather and
reduce-scatter (p−1)/p, broadcast 1. `num_bytes` is always the full,
unsharded buffer; `link` is the slowest link the ring crosses
(Cluster.link_for_group). A group of one, or zero bytes, costs nothing.
"""

from __future__ import annotations

from autopart.cost_models.links import Link


def _check(name: str, num_bytes: float, group_size: int = 1) -> None:
    if num_bytes < 0:
        raise ValueError(f"{name}(num_bytes={num_bytes}): must be >= 0 bytes")
    if int(group_size) != group_size or group_size < 1:
        raise ValueError(f"{name}(group_size={group_size}): must be an integer >= 1 (devices in the group)")


def p2p_seconds(num_bytes: float, link: Link) -> float:
    """One message of `num_bytes` from one device to another: α + n/β."""
    _check("p2p_seconds", num_bytes)
    if num_bytes == 0:
        return 0.0
    return link.latency_s + num_bytes / link.bandwidth


def all_reduce_seconds(num_bytes: float, group_size: int, link: Link) -> float:
    """Ring all-reduce (reduce-scatter then all-gather): 2(p−1)α + 2(p−1)/p · n/β."""
    _check("all_reduce_seconds", num_bytes, group_size)
    p = group_size
    if p == 1 or num_bytes == 0:
        return 0.0
    # Thakur et al. 2005 §4.4 (Rabenseifner's reduce-scatter + all-gather, ring form).
    return 2 * (p - 1) * link.latency_s + 2 * (p - 1) / p * num_bytes / link.bandwidth


def all_gather_seconds(num_bytes: float, group_size: int, link: Link) -> float:
    """Ring all-gather of a result of `num_bytes`: (p−1)α + (p−1)/p · n/β."""
    _check("all_gather_seconds", num_bytes, group_size)
    p = group_size
    if p == 1 or num_bytes == 0:
        return 0.0
    # Thakur et al. 2005 §3 (ring all-gather): p−1 steps of n/p bytes each.
    return (p - 1) * link.latency_s + (p - 1) / p * num_bytes / link.bandwidth


def reduce_scatter_seconds(num_bytes: float, group_size: int, link: Link) -> float:
    """Ring reduce-scatter of an input of `num_bytes`: (p−1)α + (p−1)/p · n/β."""
    _check("reduce_scatter_seconds", num_bytes, group_size)
    p = group_size
    if p == 1 or num_bytes == 0:
        return 0.0
    # Thakur et al. 2005 §4.2 (ring/pairwise reduce-scatter); the reduction's
    # arithmetic (γ term) is left out: it hides under the transfer on GPUs.
    return (p - 1) * link.latency_s + (p - 1) / p * num_bytes / link.bandwidth


def all_to_all_seconds(num_bytes: float, group_size: int, link: Link) -> float:
    """All-to-all where each device holds `num_bytes`: (p−1)α + (p−1)/p · n/β."""
    _check("all_to_all_seconds", num_bytes, group_size)
    p = group_size
    if p == 1 or num_bytes == 0:
        return 0.0
    # Thakur et al. 2005 §3.3 (pairwise exchange): p−1 steps, each sending n/p bytes.
    return (p - 1) * link.latency_s + (p - 1) / p * num_bytes / link.bandwidth

