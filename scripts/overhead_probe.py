"""Where the time of a launch-bound sym_kl call goes ([32, 3] logits): microseconds per call of
each piece, eager PyTorch beside ours. Diagnostic only (not a test, not the benchmark).

    python scripts/overhead_probe.py [--device cuda|cpu]
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

import smart_kernels as sk


def us_per_call(fn, device, n=2000) -> float:
    for _ in range(200):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / n * 1e6


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(p.parse_args().device)
    a = torch.randn(32, 3, device=device, requires_grad=True)
    b = torch.randn(32, 3, device=device, requires_grad=True)
    one = torch.ones((), device=device)

    def eager(x, y):
        loss = F.kl_div(F.log_softmax(x, -1), F.softmax(y, -1).detach(), reduction="batchmean")
        return loss + F.kl_div(
            F.log_softmax(y, -1), F.softmax(x, -1).detach(), reduction="batchmean"
        )

    def ours(x, y):
        return sk.sym_kl(x, y, grad="stop_grad", backend="native")

    def fwd_bwd(f):
        def run():
            a.grad = None
            b.grad = None
            f(a, b).backward(one)

        return run

    loss = ours(a, b)
    probes = {
        "empty kernel launch (x.add_(0))": lambda: a.data.add_(0),
        "raw native fwd op (no autograd)": lambda: torch.ops.smart_kernels.sym_kl_fwd(
            a.detach(), b.detach(), None, 1, 2
        ),
        "ours forward, no grad": lambda: torch.no_grad()(ours)(a, b),
        "eager forward, no grad": lambda: torch.no_grad()(eager)(a, b),
        "ours forward": lambda: ours(a, b),
        "eager forward": lambda: eager(a, b),
        "ours backward only (retain_graph)": lambda: loss.backward(one, retain_graph=True),
        "ours forward+backward": fwd_bwd(ours),
        "eager forward+backward": fwd_bwd(eager),
    }
    for name, fn in probes.items():
        print(f"{us_per_call(fn, device):8.1f} us  {name}")


if __name__ == "__main__":
    main()
