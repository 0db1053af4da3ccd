"""Run under torchrun: calibrate with every rank, check the links were measured and the ranks agree.

Prints "OK rank R" on success; rank 0 writes the cluster as JSON to the path
given as the first argument (a file, not stdout: the ranks' prints share one
pipe and may interleave within a line).

    torchrun --nproc_per_node=2 tests/distributed/calibrate_links.py cluster.json
"""

from __future__ import annotations

import json
import math
import sys

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
        with open(sys.argv[1], "w") as out:
            json.dump(cluster.to_dict(), out)
    print(f"OK rank {rank}", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
