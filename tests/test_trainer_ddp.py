"""SmartTrainer under DDP: 2 processes (gloo, CPU) launched as torchrun would (RANK, WORLD_SIZE,
MASTER_ADDR, ... in the environment), tiny BERT, 3 optimizer steps, per-device batch 2.

- Without R_s (λ_s = 0, μ = 1: deterministic) the result equals one process training on the
  global batch of 4 (1e-6): the Trainer's DDP scaling of the loss is right (with
  model_accepts_loss_kwargs on, transformers 5 would multiply BERT's mean loss by the world
  size).
- With R_s, DDP's ``static_graph=True`` gives the same parameters as the default: the adversarial
  forwards bypass the DDP wrapper (through it, a static graph silently corrupts the gradients).
- Parameters and teacher are identical on both ranks in every configuration.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("accelerate", reason="transformers.Trainer needs accelerate")

from test_ddp import rank_main, run_ranks  # noqa: E402
from test_trainer import make_args, make_data, make_model, params  # noqa: E402

from smart_kernels.integrations.transformers import SmartArguments, SmartTrainer  # noqa: E402

WORLD = 2
TIMEOUT_S = 90
# name: (λ_s, ddp_static_graph)
CONFIGS = {"no_smart": (0.0, False), "smart": (1.0, False), "smart_static": (1.0, True)}

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
    reason="torch.distributed with gloo is not available",
)


def train(out: Path, name: str, batch: int, **ddp) -> dict[str, dict[str, torch.Tensor]]:
    smart_weight = CONFIGS[name][0]
    smart = SmartArguments(
        smart_weight=smart_weight, bregman_weight=1.0, teacher_schedule=0.5,
        noise_std=1e-3, step_size=1e-2, radius=1e-2,
    )  # fmt: skip
    model = make_model("sequence", dropout=0.0)
    args = make_args(
        out, name, max_steps=3, per_device_train_batch_size=batch, learning_rate=0.5,
        optim="sgd", **ddp,
    )  # fmt: skip
    trainer = SmartTrainer(
        model=model, args=args, train_dataset=make_data("sequence"), smart_args=smart
    )
    trainer.train()
    return {"params": params(model), "teacher": params(trainer.teacher.module)}


def _worker(rank: int, port: int, out_dir: str) -> None:
    """One rank, started the way torchrun starts it: trains every configuration."""
    out = Path(out_dir)

    def body(reached: Callable[[str], None]) -> None:
        os.environ.update(
            RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD),
            LOCAL_WORLD_SIZE=str(WORLD), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
        )  # fmt: skip
        torch.set_num_threads(1)
        for name, (_, static) in CONFIGS.items():
            result = train(
                out / f"rank{rank}", name, 2, ddp_backend="gloo", ddp_static_graph=static,
                ddp_timeout=TIMEOUT_S,
            )  # fmt: skip
            torch.save(result, out / f"{name}_rank{rank}.pt")
            reached(f"trained {name}")

    rank_main(rank, out_dir, body)


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory) -> dict[str, list[dict]]:
    out = tmp_path_factory.mktemp("trainer_ddp")
    run_ranks(_worker, WORLD, out, TIMEOUT_S + 30)
    return {
        name: [torch.load(out / f"{name}_rank{r}.pt", weights_only=True) for r in range(WORLD)]
        for name in CONFIGS
    }


def assert_close(a: dict, b: dict, atol: float, what: str) -> None:
    for key in ("params", "teacher"):
        assert a[key].keys() == b[key].keys()
        for n in a[key]:
            err = (a[key][n] - b[key][n]).abs().max().item()
            assert err <= atol, f"{what}: {key} {n} differs by {err:.3g} (tolerance {atol})"


@pytest.mark.parametrize("name", list(CONFIGS))
def test_ranks_identical(ddp_runs, name):
    rank0, rank1 = ddp_runs[name]
    assert_close(rank0, rank1, 0.0, f"{name}: rank 0 vs 1")
    init = params(make_model("sequence", dropout=0.0))
    assert max((rank0["params"][n] - t).abs().max().item() for n, t in init.items()) > 1e-3


def test_matches_one_process_on_the_global_batch(ddp_runs, tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = train(tmp_path, "no_smart", WORLD * 2, use_cpu=True)
    finally:
        torch.set_num_threads(threads)
    assert_close(ddp_runs["no_smart"][0], single, 1e-6, "DDP vs one process")


def test_static_graph_equals_default(ddp_runs):
    assert_close(ddp_runs["smart_static"][0], ddp_runs["smart"][0], 1e-6, "static vs default")
