"""Benchmark sym_kl forward + backward (gradients to both inputs).

Providers (all computing the same value; ``fwd_ms`` is the forward alone): eager PyTorch in the
mt-dnn formulation
``kl_div(log_softmax(a), softmax(b).detach()) + kl_div(log_softmax(b), softmax(a).detach())``
(batchmean), ``torch.compile`` of it, and ours (triton, native). Reported per shape: median ms,
effective GB/s = 4·N·V·bytes / time (read a, b; write both gradients), % of the copy bandwidth
measured in the same run, peak extra memory beyond inputs and gradients, and speedups.

    python benchmarks/bench_sym_kl.py [--device cuda|cpu] [--out FILE.csv] [--quick]
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

import smart_kernels as sk  # noqa: E402

GPU_SHAPES = [
    (32, 3, torch.float32),
    (4096, 32000, torch.float32),
    (8192, 50257, torch.bfloat16),
    (4096, 128256, torch.bfloat16),
]
CPU_SHAPES = [(32, 3, torch.float32), (256, 32000, torch.float32), (64, 50257, torch.bfloat16)]


def mtdnn_sym_kl(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The mt-dnn / smart-pytorch formulation (stop-gradient targets), batchmean."""
    loss = F.kl_div(F.log_softmax(a, -1), F.softmax(b, -1).detach(), reduction="batchmean")
    return loss + F.kl_div(F.log_softmax(b, -1), F.softmax(a, -1).detach(), reduction="batchmean")


def providers(device: torch.device) -> dict:
    out = {"eager": mtdnn_sym_kl}
    if device.type == "cuda" or os.environ.get("SMART_KERNELS_BENCH_COMPILE_CPU"):
        out["compile"] = torch.compile(mtdnn_sym_kl, dynamic=False)
    for name, info in sk.backends().items():
        if name != "reference" and info.reason(device) is None:
            out[name] = lambda a, b, _n=name: sk.sym_kl(a, b, grad="stop_grad", backend=_n)
    return out


def bench_shape(
    n: int, v: int, dtype: torch.dtype, device: torch.device, copy_bw: float, provs: dict
) -> list[dict]:
    a = (torch.randn(n, v, device=device) * 2).to(dtype).requires_grad_()
    b = (torch.randn(n, v, device=device) * 2).to(dtype).requires_grad_()
    elt = a.element_size()
    io_bytes = 4 * n * v * elt
    grads_bytes = 2 * n * v * elt
    inputs_bytes = 2 * n * v * elt
    rows = []
    for name, fn in provs.items():

        def step(fn=fn):
            a.grad = None
            b.grad = None
            fn(a, b).backward()

        def forward_only(fn=fn):
            fn(a, b)

        try:
            fwd_ms = common.time_ms(forward_only, device)
            ms = common.time_ms(step, device)
            a.grad = None
            b.grad = None
            peak = common.peak_extra_bytes(step, device)
        except Exception as exc:  # report, don't hide: one provider failing keeps the others
            print(f"  {name} {n}x{v} {dtype}: FAILED {type(exc).__name__}: {exc}")
            continue
        extra = None if peak is None else max(peak - grads_bytes, 0)
        gbps = io_bytes / (ms * 1e-3) / 1e9
        rows.append(
            {
                "device": common.device_name(device),
                "op": "sym_kl_fwd_bwd",
                "N": n,
                "V": v,
                "dtype": str(dtype).replace("torch.", ""),
                "provider": name,
                "ms": f"{ms:.4f}",
                "us": f"{ms * 1e3:.1f}",
                "fwd_ms": f"{fwd_ms:.4f}",
                "fwd_us": f"{fwd_ms * 1e3:.1f}",
                "GB/s": f"{gbps:.0f}",
                "%copy_bw": f"{100 * gbps / copy_bw:.0f}",
                "extra_MB": "" if extra is None else f"{extra / 2**20:.1f}",
                "extra_%inputs": "" if extra is None else f"{100 * extra / inputs_bytes:.2f}",
            }
        )
    base = {r["provider"]: float(r["ms"]) for r in rows}
    base_fwd = {r["provider"]: float(r["fwd_ms"]) for r in rows}
    for r in rows:
        ms, fwd = float(r["ms"]), float(r["fwd_ms"])
        r["x_vs_eager"] = f"{base['eager'] / ms:.2f}" if "eager" in base else ""
        r["x_vs_compile"] = f"{base['compile'] / ms:.2f}" if "compile" in base else ""
        r["fwd_x_vs_eager"] = f"{base_fwd['eager'] / fwd:.2f}" if "eager" in base else ""
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default=None, help="CSV path (default benchmarks/out/...)")
    parser.add_argument("--quick", action="store_true", help="only the smaller shapes")
    args = parser.parse_args()
    device = torch.device(args.device)
    shapes = GPU_SHAPES if device.type == "cuda" else CPU_SHAPES
    if args.quick:
        shapes = shapes[:2]
    copy_bw = common.copy_bandwidth_gbps(device)
    print(
        f"device: {common.device_name(device)}  torch {torch.__version__}  "
        f"copy bandwidth {copy_bw:.0f} GB/s (measured)"
    )
    provs = providers(device)
    rows = []
    for n, v, dtype in shapes:
        rows += bench_shape(n, v, dtype, device, copy_bw, provs)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    for r in rows:
        r["copy_GB/s"] = f"{copy_bw:.0f}"
        r["torch"] = torch.__version__
    out = args.out or os.path.join(
        os.path.dirname(os.path.abspath(__file__)),
        "out",
        "sym_kl_" + common.device_name(device).replace(" ", "_") + ".csv",
    )
    common.write_csv(out, rows)
    common.print_table(
        rows,
        [
            "N",
            "V",
            "dtype",
            "provider",
            "ms",
            "GB/s",
            "%copy_bw",
            "extra_MB",
            "x_vs_eager",
            "x_vs_compile",
            "fwd_us",
            "fwd_x_vs_eager",
        ],
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
