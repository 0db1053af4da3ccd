"""Run under torchrun: calibrate with every rank, check the links were measured and the ranks agree.

Prints "OK rank R" on success, and rank 0 prints the cluster as one JSON line
after "CLUSTER ".

    torchrun --nproc_per_node=2 tests/distributed/calibrate_links.py
"""

from __future__ import annotations

import json
import math

import torch.distributed as dist

import autopart
from autopart.cost_models import LINK_PRESETS


def main() -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    cluster = autopart.calibrate(quick=True)
    assert cluster.num_devices == world, cluster.num_devices
    link = cluster.intra_node_link
    assert link != LINK_PRESETS["loopback"], "the intra-node link was not measured"
    assert link.latency_s >= 0 and math.isfinite(link.latency_s), link
    assert link.bandwidth > 0 and math.isfinite(link.bandwidth), link
    texts = [None] * world
    dist.all_gather_object(texts, cluster.to_json())
    assert all(t == texts[0] for t in texts), "ranks calibrated different clusters"
    if rank == 0:
        print("CLUSTER " + json.dumps(cluster.to_dict()), flush=True)
    print(f"OK rank {rank}", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
