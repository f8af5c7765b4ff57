"""SmartTrainer on a CUDA device with bf16 autocast (TrainingArguments(bf16=True)): the three
tasks train, R_s and D_Breg are finite and positive, the teacher lives on the GPU in fp32 and is
updated once per optimizer step. Skipped without a GPU."""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("accelerate", reason="transformers.Trainer needs accelerate")

from test_trainer import TASKS, make_args, make_data, make_model, params  # noqa: E402

from smart_kernels.integrations.transformers import SmartArguments, SmartTrainer  # noqa: E402

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("task", TASKS)
def test_trains_on_cuda_under_bf16_autocast(tmp_path, task):
    model = make_model(task)
    before = params(model)
    smart = SmartArguments(noise_std=1e-3, step_size=1e-2, radius=1e-2)
    args = make_args(tmp_path, use_cpu=False, bf16=True)
    trainer = SmartTrainer(model=model, args=args, train_dataset=make_data(task), smart_args=smart)
    out = trainer.train()
    assert out.global_step == 4 and math.isfinite(out.training_loss)
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 4
    for h in logs:
        for key in ("loss", "smart_loss", "bregman_loss"):
            assert math.isfinite(h[key]) and h[key] >= 0, (key, h)
    assert any(h["smart_loss"] > 0 for h in logs) and any(h["bregman_loss"] > 0 for h in logs)
    teacher = trainer.teacher
    assert teacher is not None and teacher.step == 4
    tparams = dict(teacher.module.named_parameters())
    assert all(p.is_cuda and p.dtype == torch.float32 for p in tparams.values())
    after = params(model)
    changed = [n for n in after if not torch.equal(after[n].cpu(), before[n])]
    assert changed
    for n in changed:  # the teacher moved off θ0 but lags the student
        t = tparams[n].detach().cpu()
        assert not torch.equal(t, before[n]) and not torch.equal(t, after[n].cpu())
