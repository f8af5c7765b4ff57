"""smart_step benchmarks: one whole training step (forward + backward + AdamW step) of a Hugging
Face model built from a config (random weights, no download), with and without SMART.

Cases (shape = batch B x tokens T x logits width C):
    CUDA: BERT-base sequence classification (B 32, T 128, C 2) and a GPT-2-small language model
          with token-level logits (B 8, T 512, V 50257), bf16 autocast; --quick runs both too
          (the issue's targets are set on both, and the GPU check script runs --quick).
    CPU:  a tiny BERT and a 2-layer GPT-2 with the full 50257 vocabulary (fp32); --smoke: a
          tinier BERT and a tinier GPT-2 (covers both paths).

Providers (all: same model, inputs, task loss, AdamW; λ_s = μ = 1; one ascent step, S = 1):
    plain          the task loss only (cross-entropy; next-token cross-entropy for the LM).
    smart-pytorch  + λ_s·R_s with the real ``smart_pytorch.SMARTLoss`` (0.0.4) and its defaults,
                   ``loss_fn=sym_kl_loss`` (sum reduction, normalize-the-sum rule).
    ours-compat    the same with ``smart_kernels.compat.smart_pytorch`` (same semantics).
    ours-paper     + λ_s·R_s with ``sk.SMARTLoss`` (paper rule, its defaults, attention mask)
                   + μ·``sk.bregman_loss`` against a ``sk.MomentumTeacher`` (paper β schedule),
                   updated after ``optimizer.step()``.
    floor          the model passes ours-paper needs, with none of our ops (plain stand-ins):
                   1 clean forward (with graph) + 1 adversarial forward whose backward reaches the
                   noise only (``autograd.grad``: no weight gradients) + 1 adversarial forward
                   (with graph) + 1 teacher forward (no grad) + the backward of
                   ``task + adv.sum()`` through both graphs + the AdamW step. Left out: the noise
                   initialisation (a zero leaf stands in), the divergences and their gradients
                   (a plain sum stands in), the projected ascent step (the raw noise gradient is
                   the new noise) and the EMA update of the teacher.
    floor-compat   the model passes ours-compat needs: the floor without the teacher forward.

Perturbations are applied to the word embeddings only and fed as ``inputs_embeds`` (the model adds
position / type embeddings itself). Each provider gets its own fresh model (the same initial
weights); the optimizer, teacher and loss objects are created on its first (warm-up) call, so the
timed steps exclude them, and "peak MiB" (memory above what was allocated before the step) counts
the step's transient memory (activations, gradients, the losses' buffers), not the persistent
teacher weights or AdamW moments. A case's providers are timed together, in alternating rounds of
one step each (``interleave``: a drift of the machine's speed falls on all of them alike; all
their models are alive at once, ~15 GB for GPT-2 small).

Harness fit: the op has mode "full" only; a provider's ``fn(*inputs)`` runs the whole step
(forward, ``backward()``, ``optimizer.step()``, ``zero_grad``) and returns the loss detached as a
0-d leaf requiring grad, so the harness's own ``.backward()`` on it is a no-op-sized fill.
Rows: time, samples and peak memory only (``bandwidth=False``: a step has no meaningful minimal
byte count; ``min_bytes``, 3x the parameter bytes, is not used by the interleaved timing). Use a
larger ``--budget-ms`` (per provider, e.g. 2000) for more than the minimum of 5 samples per
provider on the GPU cases. A time limit that stops a case midway loses all of that case's rows
(they are written when the whole case is done).

    python -m benchmarks --op smart_step [--quick] [--budget-ms 2000]
    python benchmarks/bench_smart_step.py [harness options]
"""

from __future__ import annotations

import contextlib
import copy
import functools
import gc
import importlib
import os
import sys
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F

if __package__ in (None, ""):  # run as a script
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import smart_kernels as sk  # noqa: E402
from benchmarks.spec import Case, OpBench, Provider  # noqa: E402

LAMBDA_S = 1.0  # λ_s (weights do not change the cost)
MU = 1.0  # μ
LR = 2e-5

# Model configs by case name: (architecture, config kwargs). Defaults of BertConfig / GPT2Config
# are BERT-base and GPT-2 small.
MODELS: dict[str, tuple[str, dict]] = {
    "bert-base": ("bert", dict(num_labels=2)),
    "gpt2-small": ("gpt2", dict()),
    "bert-tiny": ("bert", dict(vocab_size=8000, hidden_size=128, num_hidden_layers=2,
                               num_attention_heads=2, intermediate_size=512, num_labels=2)),
    "gpt2-tiny": ("gpt2", dict(n_embd=128, n_layer=2, n_head=2, n_positions=128)),
    "bert-smoke": ("bert", dict(vocab_size=100, hidden_size=32, num_hidden_layers=1,
                                num_attention_heads=2, intermediate_size=64,
                                max_position_embeddings=16, num_labels=2)),
    "gpt2-smoke": ("gpt2", dict(vocab_size=128, n_embd=32, n_layer=1, n_head=2, n_positions=16,
                                bos_token_id=0, eos_token_id=0)),
}  # fmt: skip


def _case(model: str, b: int, t: int, c: int, dtype: torch.dtype) -> Case:
    return Case((b, t, c), dtype, (("model", model),), name=model)  # label "gpt2-small 8x512x50257"


BERT_BASE = _case("bert-base", 32, 128, 2, torch.bfloat16)
GPT2_SMALL = _case("gpt2-small", 8, 512, 50257, torch.bfloat16)
CPU_CASES = [
    _case("bert-tiny", 8, 64, 2, torch.float32),
    _case("gpt2-tiny", 2, 128, 50257, torch.float32),
]
SMOKE_CASES = [
    _case("bert-smoke", 2, 8, 2, torch.float32),
    _case("gpt2-smoke", 2, 8, 128, torch.float32),
]


def cases(device: torch.device, size: str) -> list[Case]:
    if size == "smoke":
        return SMOKE_CASES
    if device.type != "cuda":
        return CPU_CASES
    return [GPT2_SMALL, BERT_BASE]  # the LM case first: the one a time limit must not cut


def _build(name: str) -> torch.nn.Module:
    """A randomly initialised model for MODELS[name] on the current default device."""
    import transformers

    arch, kwargs = MODELS[name]
    if arch == "bert":
        return transformers.BertForSequenceClassification(transformers.BertConfig(**kwargs))
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(**kwargs))


@functools.cache
def _param_bytes(name: str) -> int:
    with torch.device("meta"):
        model = _build(name)
    return sum(p.numel() * p.element_size() for p in model.parameters())


def min_bytes(case: Case, mode: str) -> int:
    return 3 * _param_bytes(dict(case.extra)["model"])


class Workload:
    """One case's model and batch, and the per-provider step state (created on first use).

    ids [B, T] int64; mask [B, T] (int64 for the model, ``rows`` bool for our ops); labels: [B]
    class ids (sequence classification) or [B, T] next-token ids with -100 at the last position
    (language model)."""

    def __init__(self, case: Case, device: torch.device):
        name = dict(case.extra)["model"]
        self.lm = MODELS[name][0] == "gpt2"
        b, t, c = case.shape
        torch.manual_seed(0)
        with torch.device(device):
            self.model = _build(name).train()
        gen = torch.Generator(device=device).manual_seed(0)
        vocab = self.model.config.vocab_size
        self.ids = torch.randint(0, vocab, (b, t), device=device, generator=gen)
        self.mask = torch.ones(b, t, dtype=torch.long, device=device)
        self.rows = self.mask.bool()
        if self.lm:
            self.labels = torch.cat([self.ids[:, 1:], torch.full_like(self.ids[:, :1], -100)], 1)
        else:
            self.labels = torch.randint(0, c, (b,), device=device, generator=gen)
        self.autocast = (
            torch.autocast(device.type, dtype=case.dtype)
            if case.dtype != torch.float32
            else contextlib.nullcontext()
        )
        self.state: dict[str, dict] = {}

    def logits(self, *, ids=None, embeds=None) -> torch.Tensor:
        return self.model(input_ids=ids, inputs_embeds=embeds, attention_mask=self.mask).logits

    def task_loss(self, logits: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.flatten(0, -2), self.labels.flatten(), ignore_index=-100)

    def embed(self) -> torch.Tensor:
        """The word embeddings only (position / type embeddings are added by the model)."""
        return self.model.get_input_embeddings()(self.ids)

    def step(
        self, name: str, loss_fn: Callable[[Workload, dict], torch.Tensor], setup
    ) -> torch.Tensor:
        """forward (``loss_fn`` under autocast) + backward + AdamW step; returns the loss as a
        detached 0-d leaf that requires grad (the harness calls ``.backward()`` on it)."""
        st = self.state.get(name)
        quiet = contextlib.nullcontext()
        if st is None:
            st = self.state[name] = setup(self)
            st["opt"] = torch.optim.AdamW(self.model.parameters(), lr=LR)
            quiet = _precision_warning_off()  # a new SMARTLoss warns on its first call only
        with self.autocast, quiet:
            loss = loss_fn(self, st)
        loss.backward()
        st["opt"].step()
        st["opt"].zero_grad(set_to_none=True)
        if "teacher" in st:
            st["teacher"].update(self.model)
        return loss.detach().requires_grad_()


@contextlib.contextmanager
def _precision_warning_off():
    """Timed at the paper's δ under bf16 autocast, where SMARTLoss warns that δ is below the
    matmul inputs' resolution: true, and irrelevant to the cost."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="SMARTLoss: under torch.bfloat16 autocast")
        yield


def make_inputs(case: Case, device: torch.device) -> list[torch.Tensor]:
    """[ids]: the workload (model, batch, state) travels with the ids tensor as an attribute, so
    it lives exactly as long as the harness holds the inputs."""
    gc.collect()  # the previous measurement's workload (closures make reference cycles)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    work = Workload(case, device)
    work.ids._smart_step = work
    return [work.ids]


# ---- providers ------------------------------------------------------------------------------


def _plain(w: Workload, st: dict) -> torch.Tensor:
    return w.task_loss(w.logits(ids=w.ids))


def _smart_pytorch_setup(lib) -> Callable[[Workload], dict]:
    def setup(w: Workload) -> dict:
        return {"smart": lib.SMARTLoss(eval_fn=lambda e: w.logits(embeds=e),
                                       loss_fn=lib.sym_kl_loss)}  # fmt: skip

    return setup


def _smart_pytorch(w: Workload, st: dict) -> torch.Tensor:
    embed = w.embed()
    logits = w.logits(embeds=embed)
    return w.task_loss(logits) + LAMBDA_S * st["smart"](embed, logits)


def _paper_setup(w: Workload) -> dict:
    smart = sk.SMARTLoss(lambda e: w.logits(embeds=e))
    teacher = sk.MomentumTeacher(w.model, schedule="paper", total_steps=10_000)
    return {"smart": smart, "teacher": teacher}


def _paper(w: Workload, st: dict) -> torch.Tensor:
    rows = w.rows if w.lm else None  # the mask of the loss rows: tokens of an LM
    embed = w.embed()
    logits = w.logits(embeds=embed)
    r_s = st["smart"](embed, logits, mask=w.rows)
    teacher_logits = st["teacher"](input_ids=w.ids, attention_mask=w.mask).logits
    d_breg = sk.bregman_loss(logits, teacher_logits, mask=rows)
    return w.task_loss(logits) + LAMBDA_S * r_s + MU * d_breg


def _floor_setup(teacher: bool) -> Callable[[Workload], dict]:
    def setup(w: Workload) -> dict:
        noise = torch.zeros_like(w.embed(), requires_grad=True)  # stands in for init_noise
        st = {"noise": noise}
        if teacher:
            st["teacher_model"] = copy.deepcopy(w.model).eval().requires_grad_(False)
        return st

    return setup


def _floor(w: Workload, st: dict) -> torch.Tensor:
    embed = w.embed()
    logits = w.logits(embeds=embed)  # clean forward, with graph
    noise = st["noise"]
    adv = w.logits(embeds=embed.detach() + noise)  # ascent forward
    (g,) = torch.autograd.grad(adv.sum(dtype=torch.float32), noise)  # backward to the noise only
    adv = w.logits(embeds=embed + g)  # final adversarial forward, with graph
    if "teacher_model" in st:
        with torch.no_grad():  # teacher forward (its logits are not used: no divergence)
            st["teacher_model"](input_ids=w.ids, attention_mask=w.mask)
    return w.task_loss(logits) + adv.sum(dtype=torch.float32)


def _provider(name: str, loss_fn, setup) -> Provider:
    def fn(ids: torch.Tensor) -> torch.Tensor:
        return ids._smart_step.step(name, loss_fn, setup)

    return Provider(name, fn)


def _import(module: str) -> tuple[object | None, str | None]:
    try:
        return importlib.import_module(module), None
    except ImportError as exc:
        return None, str(exc)


def providers(device: torch.device) -> list[Provider]:
    names = ("plain", "smart-pytorch", "ours-compat", "ours-paper", "floor", "floor-compat")
    _, missing = _import("transformers")
    if missing:
        return [Provider(n, skip=f"transformers not installed ({missing})") for n in names]
    out = [_provider("plain", _plain, lambda w: {})]
    lib, missing = _import("smart_pytorch")
    if lib is None:
        out.append(Provider("smart-pytorch", skip=f"smart-pytorch not installed ({missing})"))
    else:
        out.append(_provider("smart-pytorch", _smart_pytorch, _smart_pytorch_setup(lib)))
    lib, _ = _import("smart_kernels.compat.smart_pytorch")
    if lib is None:
        out.append(Provider("ours-compat", skip="smart_kernels.compat not available"))
    else:
        out.append(_provider("ours-compat", _smart_pytorch, _smart_pytorch_setup(lib)))
    out.append(_provider("ours-paper", _paper, _paper_setup))
    out.append(_provider("floor", _floor, _floor_setup(teacher=True)))
    out.append(_provider("floor-compat", _floor, _floor_setup(teacher=False)))
    return out


SMART_STEP = OpBench(
    "smart_step",
    cases,
    make_inputs,
    providers,
    min_bytes,
    modes=("full",),
    bandwidth=False,
    interleave=True,
)
OPS = [SMART_STEP]

if __name__ == "__main__":
    from benchmarks.harness import main

    main(default_ops="smart_step")
