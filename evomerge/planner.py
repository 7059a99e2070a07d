"""The workspace's memory planner: what stays resident on the device, what streams from (pinned)
host memory or is re-read from disk, and what is recomputed per candidate.

Everything the workspace keeps is an :class:`Item`: a source tensor (a model's stored tensor, in
its stored dtype, so keeping it is lossless) or a derived cache (magnitude ranks, per-row ranks,
variance ranks, Bernoulli thresholds, ...). Items are placed greedily in priority order (sources
first: every candidate reads all of them) into the device budget; what does not fit goes to its
fallback tier:

- sources: ``host`` (pinned host memory, copied to the device per candidate; on a CPU workspace
  host memory *is* the device) while the host budget lasts, then ``disk`` (re-read per candidate);
- derived caches: ``recompute`` (built per candidate the way the engine builds them: one topk,
  sort or Bernoulli draw per tensor; slower, same result).

Budgets: ``memory_limit`` (bytes) if given, else the device's free memory (CUDA) or the host's
available memory (CPU), less a reserve for the per-tensor scratch buffers and a safety margin.
"""

from __future__ import annotations

import logging
import os
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Hashable, Literal

import torch

log = logging.getLogger(__name__)

Where = Literal["device", "host", "disk", "recompute"]
GiB = 1 << 30

# placement priority (lower first); sources before derived caches, cheap-to-keep caches first
PRIORITY = {
    "source": 0,
    "variance ranks": 1,
    "row ranks": 2,
    "magnitude ranks": 3,
    "bernoulli thresholds": 4,
    "gram": 5,  # statistics of data-aware methods; "recompute" = re-read from the statistics cache
    "fisher": 6,
}


@dataclass
class Item:
    kind: str  # one of PRIORITY
    key: Hashable
    nbytes: int
    label: str  # the model it belongs to (for the table)
    where: Where | None = None


@dataclass
class MemoryPlan:
    """Placements so far; grows as candidates need new caches (a new method, say)."""

    device: torch.device
    device_budget: int
    host_budget: int
    items: dict[Hashable, Item] = field(default_factory=dict)
    device_used: int = 0
    host_used: int = 0

    def place(self, item: Item) -> Where:
        """Decide where ``item`` lives (once; later calls return the same answer)."""
        known = self.items.get(item.key)
        if known is not None:
            return known.where  # type: ignore[return-value]
        if self.device_used + item.nbytes <= self.device_budget:
            item.where = "device"
            self.device_used += item.nbytes
        elif item.kind == "source" and self.device.type == "cuda" and self.host_used + item.nbytes <= self.host_budget:
            item.where = "host"
            self.host_used += item.nbytes
        elif item.kind == "source":
            item.where = "disk"
        else:
            item.where = "recompute"
        self.items[item.key] = item
        return item.where

    def place_all(self, items: list[Item]) -> None:
        for item in sorted(items, key=lambda it: PRIORITY.get(it.kind, 99)):
            self.place(item)

    def summary(self) -> list[dict[str, Any]]:
        """One row per (what, model, where): bytes and tensor count."""
        rows: dict[tuple[str, str, str], list[int]] = defaultdict(lambda: [0, 0])
        for it in self.items.values():
            row = rows[(it.kind, it.label, it.where or "?")]
            row[0] += it.nbytes
            row[1] += 1
        order = sorted(rows, key=lambda k: (PRIORITY.get(k[0], 99), k[1], k[2]))
        return [{"what": k[0], "model": k[1], "where": k[2], "bytes": rows[k][0], "tensors": rows[k][1]} for k in order]

    def table(self) -> str:
        where_dev = "device" if self.device.type == "cuda" else "device (host RAM)"
        lines = [f"memory plan on {self.device}: device budget {fmt_bytes(self.device_budget)} "
                 f"(used {fmt_bytes(self.device_used)})"
                 + (f", pinned host budget {fmt_bytes(self.host_budget)} (used {fmt_bytes(self.host_used)})"
                    if self.device.type == "cuda" else ""),
                 f"{'what':<22} {'model':<28} {'bytes':>10} {'tensors':>8}  where"]
        for r in self.summary():
            where = where_dev if r["where"] == "device" else {
                "host": "pinned host, streamed", "disk": "disk, re-read per candidate",
                "recompute": "recomputed per candidate"}.get(r["where"], r["where"])
            lines.append(f"{r['what']:<22} {r['model'][-28:]:<28} {fmt_bytes(r['bytes']):>10} {r['tensors']:>8}  {where}")
        return "\n".join(lines)

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = defaultdict(int)
        for it in self.items.values():
            out[it.where or "?"] += 1
        return dict(out)


def fmt_bytes(n: int) -> str:
    for unit, size in (("GiB", GiB), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"


def host_available() -> int:
    """MemAvailable from /proc/meminfo (bytes); a conservative guess elsewhere."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 8 * GiB


def make_plan(device: torch.device, *, scratch: int, memory_limit: int | None = None,
              host_memory_limit: int | None = None, device_free: int | None = None) -> MemoryPlan:
    """Budgets for a workspace on ``device``. ``scratch``: bytes reserved for per-tensor
    temporaries; ``memory_limit`` caps what the workspace keeps on the device (the live model is
    not counted: it exists already). ``device_free``: free bytes on a CUDA device (default: asked
    from CUDA; ``--dry-run`` passes an assumed size on a machine without the GPU)."""
    if device.type == "cuda":
        free = device_free if device_free is not None else torch.cuda.mem_get_info(device)[0]
        auto = max(0, int(free * 0.95) - scratch - GiB // 2)
        host_auto = max(0, int(host_available() * 0.8) - 2 * GiB)
    else:
        auto = max(0, int(host_available() * 0.85) - scratch - GiB)
        host_auto = 0
    device_budget = auto if memory_limit is None else min(int(memory_limit), auto)
    host_budget = host_auto if host_memory_limit is None else min(int(host_memory_limit), host_auto)
    if device.type == "cpu" and memory_limit is not None:
        device_budget = int(memory_limit)  # an explicit limit wins on CPU (tests force tiny ones)
    return MemoryPlan(device, device_budget, host_budget)
