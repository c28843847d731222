"""What a fit costs on a map-style Dataset whose items are slow to load (issue 19).

Run: ``.venv/bin/python benchmarks/dataset_cost.py [n] [ms]`` (default 1500 items, 2 ms each).
Prints, for a cache miss, a cache hit and a hit with ``dataset_id=``, the seconds of
``ft.build_cache`` and the number of ``__getitem__`` calls. A script, not a test: timings on
a shared machine are not assertions.
"""

from __future__ import annotations

import copy
import sys
import tempfile
import time

import torch
from torch import nn

import fastft
from fastft.cache import registry


class SlowDataset(torch.utils.data.Dataset):
    def __init__(self, n: int, ms: float):
        g = torch.Generator().manual_seed(0)
        self.X, self.y = torch.randn(n, 20, generator=g), torch.randint(0, 3, (n,), generator=g)
        self.ms, self.calls = ms, 0

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        self.calls += 1
        time.sleep(self.ms / 1000)
        return self.X[i], self.y[i]


def run(n: int, ms: float) -> None:
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 10))
    data = SlowDataset(n, ms)
    warm = fastft.FineTuner(copy.deepcopy(backbone), num_classes=3, verbose=False, cache="host")
    warm.fit(SlowDataset(64, 0), epochs=1)  # one-time costs of a process (imports, first calls)
    for tier in ("host", "disk"):
        with tempfile.TemporaryDirectory() as root:
            registry.clear()
            for label, dataset_id, forget in (
                ("miss", None, False),
                ("hit", None, False),
                ("new process", None, True),
                ("miss with dataset_id", "slow-v1", False),
                ("hit with dataset_id", "slow-v1", False),
            ):
                if forget:
                    registry.clear()  # as in a new process: only the disk holds caches
                ft = fastft.FineTuner(
                    copy.deepcopy(backbone),
                    num_classes=3,
                    hidden=[32],
                    verbose=False,
                    cache=tier,
                    cache_dir=root,
                )
                data.calls = 0
                t0 = time.perf_counter()
                ft.fit(data, epochs=1, batch_size=256, dataset_id=dataset_id)
                seconds = time.perf_counter() - t0
                print(
                    f"{tier:4s} {label:22s} {seconds:6.2f} s  {data.calls:5d} __getitem__ calls"
                    f"  ({ft.cache.telemetry.get('reason')})"
                )


if __name__ == "__main__":
    run(
        int(sys.argv[1]) if len(sys.argv) > 1 else 1500,
        float(sys.argv[2]) if len(sys.argv) > 2 else 2,
    )
