"""SMART under DistributedDataParallel: 2 processes (gloo, CPU) train a small model with the full
objective ``L + λ_s·R_s + μ·D_Breg`` (SMARTLoss + MomentumTeacher + bregman_loss) for a few SGD
steps; afterwards parameters and teacher are identical on both ranks and equal (1e-6) to one
process training on the same global batch.

Why the single-process run is the mean of two half-batch losses: DDP gives every parameter the
mean over ranks of the per-rank gradients, ``g = (∇L(b₀) + ∇L(b₁)) / 2``, where ``L(b_r)`` is the
objective on rank r's half of the global batch. One process reproduces it exactly with the loss
``(L(b₀) + L(b₁)) / 2``, each half computed on its own (scaling by 1/2 is exact in floating point).
The task loss and both SMART terms are means over rows (``batchmean``), so on the parameters
that is also what a single forward over the global batch would give; but SMARTLoss's inner ascent
step is not a sum over examples: its noise gradient on the whole batch is half that of a half
batch, and the normalized step ``g / (‖g‖ + eps)`` is scale-invariant only up to ``eps``. Running
the halves separately also lets both runs draw the same initial noise δ₀: each half's SMART call
seeds the global generator with (step, rank) first, so rank r and the single process's half r
perturb identically (the noise is seeded, not zero: with δ₀ = 0 the ascent gradient of the
symmetric KL at f(x + 0) = f(x) vanishes and R_s would be 0).

Runs each kernel backend available on CPU (reference, native) inside the same two processes.
"""

from __future__ import annotations

import datetime
import gc
import os
import socket
import traceback
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from helpers import CPU_BACKENDS
from torch import nn

import smart_kernels as sk

WORLD = 2
STEPS = 3
VOCAB, HIDDEN, CLASSES, TOKENS, PER_RANK = 40, 16, 3, 6, 4
# Large enough that R_s and D_Breg move the parameters well above the tolerance.
SMART = dict(num_steps=1, step_size=0.1, noise_std=0.05, radius=0.2)
LAMBDA_S, MU, LR, DECAY = 1.0, 1.0, 0.2, 0.5
BACKENDS = [b for b in ("reference", "native") if b in CPU_BACKENDS]
MODES = ("wrapper", "static")  # DDP defaults / static_graph=True (see train_ddp)
TIMEOUT_S = 45  # the workers' deadline; a hang fails the test instead of blocking CI

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
    reason="torch.distributed with gloo is not available",
)


class TinyEncoder(nn.Module):
    """Word embeddings + learned position embeddings + one transformer encoder layer + masked
    mean pool + linear head: ids [B, T] (or word embeddings [B, T, H]) -> logits [B, C]."""

    def __init__(self):
        super().__init__()
        self.word = nn.Embedding(VOCAB, HIDDEN)
        self.pos = nn.Parameter(torch.randn(TOKENS, HIDDEN) * 0.1)
        self.layer = nn.TransformerEncoderLayer(
            HIDDEN, nhead=2, dim_feedforward=32, dropout=0.0, batch_first=True
        )
        self.head = nn.Linear(HIDDEN, CLASSES)

    def forward(self, input_ids=None, *, inputs_embeds=None, attention_mask):
        x = self.word(input_ids) if inputs_embeds is None else inputs_embeds
        h = self.layer(x + self.pos, src_key_padding_mask=~attention_mask)
        m = attention_mask.unsqueeze(-1).to(h.dtype)
        return self.head((h * m).sum(1) / m.sum(1))


def new_model() -> TinyEncoder:
    torch.manual_seed(0)
    return TinyEncoder()


def global_batch(step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ids [2N, T], attention mask (bool, >= 2 real tokens, padding at the end) [2N, T],
    labels [2N]: the same in every process."""
    gen = torch.Generator().manual_seed(100 + step)
    n = WORLD * PER_RANK
    ids = torch.randint(0, VOCAB, (n, TOKENS), generator=gen)
    lengths = torch.randint(2, TOKENS + 1, (n, 1), generator=gen)
    mask = torch.arange(TOKENS) < lengths
    labels = torch.randint(0, CLASSES, (n,), generator=gen)
    return ids, mask, labels


def half(batch, rank: int):
    return tuple(t[rank * PER_RANK : (rank + 1) * PER_RANK] for t in batch)


def objective(model, word, smart, teacher, batch, seed: int, backend: str):
    """``CE + λ_s·R_s + μ·D_Breg`` on one (half) batch and its terms. ``model`` may be the DDP
    wrapper; ``word`` is its word embedding module."""
    ids, mask, labels = batch
    embed = word(ids)
    logits = model(inputs_embeds=embed, attention_mask=mask)
    task = F.cross_entropy(logits, labels)
    torch.manual_seed(seed)  # δ₀ of this half: the same draw in the DDP and single runs
    r_s = smart(embed, logits, mask=mask, attention_mask=mask)
    d_breg = sk.bregman_loss(logits, teacher(input_ids=ids, attention_mask=mask), backend=backend)
    loss = task + LAMBDA_S * r_s + MU * d_breg
    return loss, torch.stack([task, r_s, d_breg]).detach()


def make_smart(model, backend: str) -> sk.SMARTLoss:
    def eval_fn(embed, attention_mask):
        return model(inputs_embeds=embed, attention_mask=attention_mask)

    return sk.SMARTLoss(eval_fn, backend=backend, **SMART)


def state(model: nn.Module, teacher: sk.MomentumTeacher, terms: list) -> dict:
    return {
        "params": {n: p.detach().clone() for n, p in model.named_parameters()},
        "teacher": {n: p.detach().clone() for n, p in teacher.module.named_parameters()},
        "terms": torch.stack(terms),  # [steps, (halves,) 3]
    }


def train_ddp(rank: int, backend: str, mode: str) -> dict:
    """``mode``: ``"wrapper"`` (DDP's defaults; the adversarial forwards go through the DDP
    wrapper too) or ``"static"`` (``static_graph=True``; they go through ``.module``, which
    SMARTLoss insists on)."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = DDP(new_model(), static_graph=mode == "static")
    teacher = sk.MomentumTeacher(model, decay=DECAY, backend=backend)
    if mode == "static":
        try:
            sk.SMARTLoss(model, backend=backend)  # the DDP module itself as eval_fn
        except ValueError as e:
            assert str(e).startswith("eval_fn:"), e
        else:
            raise AssertionError("SMARTLoss took a static-graph DDP module as eval_fn")
    smart = make_smart(model if mode == "wrapper" else model.module, backend)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    terms = []
    for step in range(STEPS):
        batch = half(global_batch(step), rank)
        seed = 1000 * step + rank
        loss, t = objective(model, model.module.word, smart, teacher, batch, seed, backend)
        loss.backward()  # DDP all-reduces the mean of the ranks' gradients
        opt.step()
        opt.zero_grad(set_to_none=True)
        teacher.update(model)  # unwraps .module; each rank updates from identical parameters
        terms.append(t)
    return state(model.module, teacher, terms)


def train_single(backend: str) -> dict:
    model = new_model()
    teacher = sk.MomentumTeacher(model, decay=DECAY, backend=backend)
    smart = make_smart(model, backend)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    terms = []
    for step in range(STEPS):
        batch = global_batch(step)
        losses, ts = [], []
        for r in range(WORLD):  # rank r's half, with rank r's seed
            seed = 1000 * step + r
            loss, t = objective(model, model.word, smart, teacher, half(batch, r), seed, backend)
            losses.append(loss)
            ts.append(t)
        (sum(losses) / WORLD).backward()  # = DDP's mean of the per-rank gradients
        opt.step()
        opt.zero_grad(set_to_none=True)
        teacher.update(model)
        terms.append(torch.stack(ts))
    return state(model, teacher, terms)


def _worker(rank: int, port: int, out_dir: str) -> None:
    """One DDP rank (spawned): trains with every backend and mode, saves
    ``{backend}_{mode}_rank{rank}.pt``."""

    def body(reached: Callable[[str], None]) -> None:
        import torch.distributed as dist

        torch.set_num_threads(1)
        dist.init_process_group(
            "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
            timeout=datetime.timedelta(seconds=TIMEOUT_S),
        )  # fmt: skip
        for backend in BACKENDS:
            for mode in MODES:
                result = train_ddp(rank, backend, mode)
                torch.save(result, os.path.join(out_dir, f"{backend}_{mode}_rank{rank}.pt"))
                reached(f"trained {backend} {mode}")

    rank_main(rank, out_dir, body)


def rank_main(rank: int, out_dir: str, body: Callable[[Callable[[str], None]], None]) -> None:
    """A spawned rank's frame around ``body(reached)`` (which initialises the process group, or
    has the Trainer do it, and trains; ``reached(stage)`` records the last stage for a crash
    report): a traceback goes to ``error_rank{rank}.txt``; the group is torn down in lockstep;
    the process leaves without interpreter finalization."""
    import torch.distributed as dist

    def reached(stage: str) -> None:
        with open(os.path.join(out_dir, f"stage_rank{rank}.txt"), "w") as f:
            f.write(stage)

    try:
        try:
            body(reached)
            # Tear gloo down in lockstep with nothing of DDP left alive: a process group whose
            # last reference dies during interpreter finalization, or a peer that closes its
            # sockets while this rank is still in a collective, can make gloo's threads call
            # std::terminate (seen once in CI as "terminate called without an active exception").
            gc.collect()
            if dist.is_initialized():
                dist.barrier()
        finally:
            if dist.is_initialized():
                reached("destroying the process group")
                dist.destroy_process_group()
                reached("destroyed the process group")
    except BaseException:
        with open(os.path.join(out_dir, f"error_rank{rank}.txt"), "w") as f:
            f.write(traceback.format_exc())
        raise
    # Everything is written and the group destroyed: leave without interpreter finalization,
    # where gloo threads still holding tensors can abort the process (pytorch/pytorch#179291).
    os._exit(0)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(worker, world: int, out, timeout_s: float) -> None:
    """Spawns ``worker(rank, port, str(out))`` for each rank (fresh interpreters, as torchrun
    does) and waits up to ``timeout_s``; a hang, a non-zero exit or a crash fails with the ranks'
    tracebacks (``error_rank*.txt``) and last stages (``stage_rank*.txt``) found in ``out``."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    port = free_port()
    procs = [ctx.Process(target=worker, args=(r, port, str(out))) for r in range(world)]
    for p in procs:
        p.start()
    deadline = datetime.datetime.now() + datetime.timedelta(seconds=timeout_s)
    for p in procs:
        p.join(timeout=max((deadline - datetime.datetime.now()).total_seconds(), 0.1))
    hung = [p for p in procs if p.is_alive()]
    for p in hung:
        p.kill()
        p.join(5)
    errors = "".join(f.read_text() for f in sorted(out.glob("error_rank*.txt")))
    errors += "".join(f"{f.stem}: {f.read_text()}\n" for f in sorted(out.glob("stage_rank*.txt")))
    assert not hung, f"workers did not finish in {timeout_s} s\n{errors}"
    codes = [p.exitcode for p in procs]
    assert codes == [0] * world, f"exit codes {codes}\n{errors}"


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory) -> dict[str, list[dict]]:
    """{(backend, mode): [rank 0 result, rank 1 result]} from one 2-process run."""
    out = tmp_path_factory.mktemp("ddp")
    run_ranks(_worker, WORLD, out, TIMEOUT_S + 10)
    return {
        (b, m): [torch.load(out / f"{b}_{m}_rank{r}.pt", weights_only=True) for r in range(WORLD)]
        for b in BACKENDS
        for m in MODES
    }


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float, what: str):
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].shape == b[name].shape, (what, name)
        err = (a[name] - b[name]).abs().max().item()
        assert err <= atol, f"{what}: {name} differs by {err:.3g} (tolerance {atol})"


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_ddp_matches_single_process(ddp_results, backend, mode):
    ranks = ddp_results[backend, mode]
    # identical across ranks (bitwise: the same all-reduced gradient, the same update)
    for key in ("params", "teacher"):
        assert_same(ranks[0][key], ranks[1][key], 0.0, f"{key} rank 0 vs 1")

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = train_single(backend)
    finally:
        torch.set_num_threads(threads)
    # each rank's loss terms are those of its half in the single run
    for r in range(WORLD):
        torch.testing.assert_close(ranks[r]["terms"], single["terms"][:, r], atol=1e-6, rtol=0)
    for key in ("params", "teacher"):
        assert_same(ranks[0][key], single[key], 1e-6, f"{key} DDP vs single process")

    # not vacuous: the SMART terms are sizeable and training moved the parameters
    assert (single["terms"][:, :, 1] > 1e-4).all(), single["terms"]
    assert (single["terms"][1:, :, 2] > 1e-5).all(), single["terms"]  # teacher lags after step 0
    init = dict(new_model().named_parameters())
    moved = max((single["params"][n] - init[n].detach()).abs().max().item() for n in init)
    assert moved > 1e-2
