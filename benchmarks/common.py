"""Shared benchmark machinery: timing (CUDA events or wall clock), peak extra memory, the
device's copy bandwidth, CSV output and a printed table. Benchmarks report; they never assert."""

from __future__ import annotations

import csv
import os
import statistics
import time
from collections.abc import Callable, Sequence

import torch


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu-{os.cpu_count()}cores"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(
    fn: Callable[[], object],
    device: torch.device,
    *,
    warmup: int = 5,
    batches: int = 7,
    min_time_s: float = 0.3,
) -> float:
    """Milliseconds per call of ``fn``: the median over ``batches`` of the mean time of a batch of
    back-to-back calls. Back-to-back batches measure launch-bound calls as a training loop runs
    them (the host's issue time included); for long calls it is the plain kernel time."""
    for _ in range(warmup):
        fn()
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    one = max(time.perf_counter() - t0, 1e-6)
    per_batch = max(1, min(200, int(min_time_s / batches / one)))
    means = []
    for _ in range(batches):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(per_batch):
                fn()
            end.record()
            end.synchronize()
            means.append(start.elapsed_time(end) / per_batch)
        else:
            t0 = time.perf_counter()
            for _ in range(per_batch):
                fn()
            means.append((time.perf_counter() - t0) * 1e3 / per_batch)
    return statistics.median(means)


def peak_extra_bytes(fn: Callable[[], object], device: torch.device) -> int | None:
    """Peak memory during ``fn`` above what was allocated before it (CUDA only; None on CPU)."""
    if device.type != "cuda":
        return None
    sync(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    sync(device)
    return torch.cuda.max_memory_allocated(device) - base


def copy_bandwidth_gbps(device: torch.device, nbytes: int = 1 << 30) -> float:
    """Measured device copy bandwidth (read + write bytes per second), GB/s."""
    if device.type == "cpu":
        nbytes = min(nbytes, 256 << 20)
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), device)
    return 2 * nbytes / (ms * 1e-3) / 1e9


def write_csv(path: str, rows: Sequence[dict]) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0].keys()))
        writer.writeheader()
        writer.writerows(rows)


def print_table(rows: Sequence[dict], columns: Sequence[str]) -> None:
    cells = [[str(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)))
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)))
