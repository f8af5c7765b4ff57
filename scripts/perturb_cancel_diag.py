"""Diagnose bf16 perturb_step at [8, 2048, 4096] (l2, token) against the fp64 oracle on CUDA:
failures of the 2x-eager rule with no allowance, with the old 64-ulp cancellation mask, and with
tests' fp32_slack; and the fp32 l2 group-norm error of each backend (sk.normalize vs fp64)."""

import sys

import torch

sys.path.insert(0, "tests")
from test_perturb import RULES, fp32_slack, within_eager  # noqa: E402

import smart_kernels as sk  # noqa: E402
from smart_kernels import reference  # noqa: E402

dev = sys.argv[2] if len(sys.argv) > 2 else "cuda"
shape = (8, 2048, 4096)
kind = "cuda" if dev == "cuda" else "cpu"
backends = [b for b in ("native", "triton") if getattr(sk.backends()[b], kind) is None]
for seed in range(int(sys.argv[1]) if len(sys.argv) > 1 else 2):
    torch.manual_seed(seed)
    noise = (torch.randn(shape, device=dev) * 1e-5).to(torch.bfloat16)
    grad = torch.randn(shape, device=dev).to(torch.bfloat16)
    g32 = grad.float()
    ref_n = reference.normalize(g32.double(), norm="l2", scope="token")
    for b in backends + ["eager"]:
        y = (
            reference.normalize(g32, norm="l2", scope="token")
            if b == "eager"
            else sk.normalize(g32, norm="l2", scope="token", backend=b)
        )
        rel = ((y.double() - ref_n).abs() / ref_n.abs().clamp_min(1e-30)).amax().item()
        print(f"seed {seed} l2 normalize fp32 {b}: max rel err {rel / 2**-24:.1f} half-ulps")
    for rule in RULES:
        kw = dict(norm="l2", scope="token", rule=rule, radius=6e-4)
        ref = reference.perturb_step(noise.double(), grad.double(), **kw)
        eager = reference.perturb_step(noise, grad, **kw)
        slack = fp32_slack(noise, grad, 1e-3, rule=rule, norm="l2", scope="token", radius=6e-4)
        d = noise.double()
        t = 1e-3 * (
            reference.normalize(grad.double(), norm="l2", scope="token", eps=1e-6)
            if rule == "paper"
            else grad.double()
        )
        ratio = (d + t).abs() / (d.abs() + t.abs())
        old = torch.where(ratio <= 64 * 2**-23, float("inf"), 0.0).double()
        for b in backends:
            out = sk.perturb_step(noise, grad, backend=b, **kw)
            err = (out.double() - ref).abs()
            bound = 2 * (eager.double() - ref).abs() + 2**-7 * ref.abs()
            bad = (err > bound + old).nonzero()
            print(
                f"seed {seed} {rule} {b}: none {within_eager(out, eager, ref)} "
                f"old-mask {within_eager(out, eager, ref, old)} "
                f"slack {within_eager(out, eager, ref, slack)}; "
                f"{bad.shape[0]} bad under old mask"
            )
            for i in map(tuple, bad[:3].tolist()):
                print(
                    f"    {i} |s|/terms {ratio[i].item() / 2**-23:.0f} fp32-ulp, err "
                    f"{err[i].item():.3g} eager-err {(eager.double() - ref).abs()[i].item():.3g} "
                    f"ref {ref[i].item():.3g} slack {slack[i].item():.3g}"
                )
