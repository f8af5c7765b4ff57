"""SmartTrainer (smart_kernels.integrations.transformers) on tiny BERTs built from a config:
training runs for sequence classification, regression and token classification; the objective
equals a manual ``L + λ_s·R_s + μ·D_Breg``; λ_s = μ = 0 is the plain Trainer bit for bit; the
teacher is the EMA of the parameter trajectory, updated once per optimizer step, saved with
checkpoints and restored on resume; the model gets the word embeddings as ``inputs_embeds`` (no
double embedding).
"""

from __future__ import annotations

import math
import os

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate", reason="transformers.Trainer needs accelerate")

from transformers import (  # noqa: E402
    BertConfig,
    BertForSequenceClassification,
    BertForTokenClassification,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    default_data_collator,
)

from smart_kernels import reference  # noqa: E402
from smart_kernels.integrations.transformers import (  # noqa: E402
    TEACHER_FILE,
    SmartArguments,
    SmartTrainer,
)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny models: with several threads on a loaded 2-core machine, thread synchronization costs
    # ~10x the compute. One thread here, restored afterwards.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


T = 8  # tokens per example
N = 16  # examples
TASKS = ("sequence", "regression", "token")


def make_model(task: str, *, dropout: float = 0.1, seed: int = 0):
    cfg = BertConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=32, type_vocab_size=2,
        hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout,
        num_labels=1 if task == "regression" else 3,
    )  # fmt: skip
    torch.manual_seed(seed)
    cls = BertForTokenClassification if task == "token" else BertForSequenceClassification
    return cls(cfg)


def make_data(task: str, n: int = N, seed: int = 1) -> list[dict[str, torch.Tensor]]:
    """Padded examples (lengths 5..8, pad id 0); token labels are -100 on [CLS] and padding."""
    g = torch.Generator().manual_seed(seed)
    data = []
    for i in range(n):
        length = 5 + i % 4
        ids = torch.randint(1, 100, (T,), generator=g)
        ids[length:] = 0
        mask = (torch.arange(T) < length).long()
        types = (torch.arange(T) >= length // 2).long() * mask
        if task == "sequence":
            labels = torch.tensor(i % 3)
        elif task == "regression":
            labels = torch.randn((), generator=g)
        else:
            labels = torch.randint(0, 3, (T,), generator=g)
            labels[0] = -100
            labels[length:] = -100
        data.append(dict(input_ids=ids, attention_mask=mask, token_type_ids=types, labels=labels))
    return data


def make_args(tmp_path, name: str = "out", **kw) -> TrainingArguments:
    kw = dict(
        output_dir=str(tmp_path / name), max_steps=4, per_device_train_batch_size=4,
        report_to=[], use_cpu=True, logging_steps=1, save_strategy="no", disable_tqdm=True,
        learning_rate=1e-2, seed=0,
    ) | kw  # fmt: skip
    return TrainingArguments(**kw)


def params(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


class Capture(TrainerCallback):
    """Copies of the student's parameters after each optimizer step."""

    def __init__(self, model):
        self.model = model
        self.steps: list[dict[str, torch.Tensor]] = []

    def on_step_end(self, args, state, control, **kwargs):
        self.steps.append(params(self.model))


# ---- training runs --------------------------------------------------------------------------


def train_and_check(tmp_path, task: str, **train_args) -> SmartTrainer:
    """4 SMART steps (λ_s = μ = 1, paper schedule): finite, non-negative logged terms, R_s and
    D_Breg > 0 somewhere, a frozen eval-mode teacher updated 4 times that moved off θ0 but lags
    the student. Shared with the GPU test."""
    model = make_model(task)
    before = params(model)
    smart = SmartArguments(noise_std=1e-3, step_size=1e-2, radius=1e-2)
    args = make_args(tmp_path, **train_args)
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
    assert teacher.decay == 0.999  # paper schedule over max_steps=4: 0.99 only for update 0
    assert not teacher.module.training and all(not p.requires_grad for p in teacher.parameters())
    after = {n: p.cpu() for n, p in params(model).items()}
    tparams = {n: p.detach().cpu() for n, p in teacher.module.named_parameters()}
    changed = [n for n in after if not torch.equal(after[n], before[n])]
    assert changed
    for n in changed:  # the teacher moved off θ0 but lags the student
        assert not torch.equal(tparams[n], before[n]) and not torch.equal(tparams[n], after[n])
    return trainer


@pytest.mark.parametrize("task", TASKS)
def test_trains_and_updates_teacher(tmp_path, task):
    train_and_check(tmp_path, task)


def test_warns_that_bf16_mixed_precision_rounds_the_paper_radius_away(tmp_path):
    """Trainer(bf16=True): autocast is on only inside the model's forward, so SmartTrainer
    itself gives SMARTLoss the autocast dtype; with the paper's radius (1e-5) it warns once."""
    model = make_model("sequence")
    args = make_args(tmp_path, bf16=True, max_steps=2)
    trainer = SmartTrainer(model=model, args=args, train_dataset=make_data("sequence"))
    with pytest.warns(UserWarning, match="under torch.bfloat16 autocast") as record:
        trainer.train()
    assert sum("autocast" in str(w.message) for w in record) == 1


def test_teacher_is_ema_of_trajectory_once_per_optimizer_step(tmp_path):
    model = make_model("sequence")
    theta0 = params(model)
    betas = [0.5, 0.8, 0.3]
    smart = SmartArguments(teacher_schedule=lambda step: betas[step])
    capture = Capture(model)
    args = make_args(tmp_path, max_steps=3, gradient_accumulation_steps=2)
    trainer = SmartTrainer(
        model=model, args=args, train_dataset=make_data("sequence"), smart_args=smart,
        callbacks=[capture],
    )  # fmt: skip
    trainer.train()
    assert len(capture.steps) == 3 and trainer.teacher.step == 3  # 6 micro-batches, 3 updates
    expected = {n: t.double() for n, t in theta0.items()}
    for beta, theta in zip(betas, capture.steps, strict=True):
        expected = {n: beta * t + (1 - beta) * theta[n].double() for n, t in expected.items()}
    teacher = dict(trainer.teacher.module.named_parameters())
    assert teacher.keys() == expected.keys()
    for n, t in expected.items():
        torch.testing.assert_close(teacher[n].double(), t, rtol=1e-6, atol=1e-7, msg=n)
    # the teacher did not follow the student exactly: the check above is not vacuous
    assert any(not torch.equal(teacher[n], capture.steps[-1][n]) for n in teacher)


@pytest.mark.parametrize("skipped", [False, True])
def test_no_teacher_update_when_the_optimizer_step_was_skipped(tmp_path, monkeypatch, skipped):
    """fp16 loss scaling skips the optimizer step on inf/NaN gradients; the Trainer still calls
    on_step_end. The teacher then neither moves nor advances its β schedule."""
    model = make_model("sequence")
    trainer = SmartTrainer(model=model, args=make_args(tmp_path), smart_args=SmartArguments())
    teacher = trainer.create_teacher()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    before = params(teacher.module)
    accelerator = type(trainer.accelerator)
    monkeypatch.setattr(accelerator, "optimizer_step_was_skipped", property(lambda a: skipped))
    trainer._update_teacher()
    assert teacher.step == (0 if skipped else 1)
    moved = any(not torch.equal(before[n], p) for n, p in teacher.module.named_parameters())
    assert moved != skipped


def test_paper_schedule_uses_max_steps(tmp_path):
    trainer = SmartTrainer(
        model=make_model("sequence"), args=make_args(tmp_path, max_steps=20),
        train_dataset=make_data("sequence"),
    )  # fmt: skip
    teacher = trainer.create_teacher()  # before training: the total comes from max_steps
    assert [teacher.decay_at(s) for s in (0, 1, 2, 19)] == [0.99, 0.99, 0.999, 0.999]


@pytest.mark.parametrize("task", ("sequence", "token"))
def test_zero_weights_reproduce_plain_trainer(tmp_path, task):
    data = make_data(task)
    plain_model = make_model(task)  # dropout on: the random streams must match too
    plain = Trainer(model=plain_model, args=make_args(tmp_path, "plain"), train_dataset=data)
    plain.train()
    smart_model = make_model(task)
    smart = SmartTrainer(
        model=smart_model, args=make_args(tmp_path, "smart"), train_dataset=data,
        smart_args=SmartArguments(smart_weight=0.0, bregman_weight=0.0),
    )  # fmt: skip
    smart.train()
    assert smart.teacher is None
    losses = [h["loss"] for h in plain.state.log_history if "loss" in h]
    assert losses == [h["loss"] for h in smart.state.log_history if "loss" in h]
    for (n, p), (m, q) in zip(
        plain_model.named_parameters(), smart_model.named_parameters(), strict=True
    ):
        assert n == m and torch.equal(p, q), n


# ---- the objective on one batch ----------------------------------------------------------------


@pytest.mark.parametrize("task", TASKS)
def test_loss_matches_manual_objective(tmp_path, task):
    lam, mu = 0.7, 0.3
    smart = SmartArguments(
        smart_weight=lam, bregman_weight=mu, num_steps=2, step_size=0.05, noise_std=0.1,
        radius=0.2, teacher_schedule=0.9, backend="reference",
    )  # fmt: skip
    model = make_model(task, dropout=0.0)
    trainer = SmartTrainer(
        model=model, args=make_args(tmp_path), train_dataset=make_data(task), smart_args=smart
    )
    teacher = trainer.create_teacher()
    with torch.no_grad():  # a teacher away from the student: D_Breg > 0
        for p in teacher.parameters():
            p.add_(torch.randn_like(p), alpha=0.05)
    batch = default_data_collator(make_data(task)[:4])
    model.train()

    torch.manual_seed(123)
    loss = trainer.compute_loss(model, batch)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()

    torch.manual_seed(123)
    ids, am, tt = batch["input_ids"], batch["attention_mask"], batch["token_type_ids"]
    tokens = am.bool()
    embed = model.bert.embeddings.word_embeddings(ids)
    out = model(inputs_embeds=embed, attention_mask=am, token_type_ids=tt, labels=batch["labels"])
    logits = out.logits
    rows = tokens if task == "token" else None

    def f(e):
        return model(inputs_embeds=e, attention_mask=am, token_type_ids=tt).logits

    def div(a, b):
        if task == "regression":
            return ((a - b) ** 2).sum(-1).mean()
        return reference.sym_kl(a, b, mask=rows)

    noise = reference.init_noise(embed, 0.1, mask=tokens)
    for _ in range(2):
        noise.requires_grad_()
        (g,) = torch.autograd.grad(div(f(embed.detach() + noise), logits.detach()), noise)
        noise = reference.perturb_step(
            noise.detach(), g, step_size=0.05, radius=0.2, norm="inf", mask=tokens
        )
    r_s = div(f(embed + noise), logits)
    with torch.no_grad():
        t_logits = teacher.module(input_ids=ids, attention_mask=am, token_type_ids=tt).logits
    d_breg = div(logits, t_logits)
    assert r_s > 0 and d_breg > 0
    manual = out.loss + lam * r_s + mu * d_breg
    manual.backward()

    torch.testing.assert_close(loss, manual, rtol=1e-6, atol=0)
    for n, p in model.named_parameters():
        torch.testing.assert_close(grads[n], p.grad, rtol=1e-5, atol=1e-7, msg=n)


def test_gradient_accumulation_scaling(tmp_path):
    """R_s and D_Breg are per-micro-batch means: when the Trainer takes the returned loss as
    already scaled for gradient accumulation (the task loss normalized by num_items_in_batch),
    SmartTrainer divides them by the accumulation steps itself; otherwise the Trainer does."""
    smart = SmartArguments(noise_std=0.1, step_size=0.05, radius=0.2, backend="reference")
    model = make_model("sequence", dropout=0.0)
    trainer = SmartTrainer(model=model, args=make_args(tmp_path), smart_args=smart)
    trainer.create_teacher()
    with torch.no_grad():
        for p in trainer.teacher.parameters():
            p.add_(torch.randn_like(p), alpha=0.05)
    batch = default_data_collator(make_data("sequence")[:4])
    model.train()
    trainer.model_accepts_loss_kwargs = True  # BERT's forward takes **kwargs
    trainer.current_gradient_accumulation_steps = 2
    with torch.no_grad():
        task = model(**batch).loss
        torch.manual_seed(5)
        per_batch = trainer.compute_loss(model, batch) - task  # the Trainer will divide by 2
        torch.manual_seed(5)
        scaled = trainer.compute_loss(model, batch, num_items_in_batch=torch.tensor(4)) - task
    assert per_batch > 0
    torch.testing.assert_close(scaled, per_batch / 2, rtol=0, atol=1e-6)  # minus a loss ~1


def test_gradient_accumulation_matches_one_large_batch(tmp_path):
    """2 micro-batches of 2 accumulated = 1 batch of 4: the same parameters and teacher after
    each optimizer step, with D_Breg on (the teacher has moved after the first step). Without
    SmartTrainer's model_accepts_loss_kwargs = False, transformers 5 leaves BERT's mean loss
    undivided under accumulation (twice the gradient)."""
    smart = SmartArguments(smart_weight=0.0, bregman_weight=1.0, teacher_schedule=0.5)
    runs = []
    for ga, batch in ((1, 4), (2, 2)):
        model = make_model("sequence", dropout=0.0)
        capture = Capture(model)
        args = make_args(
            tmp_path, f"ga{ga}", max_steps=3, per_device_train_batch_size=batch,
            gradient_accumulation_steps=ga, learning_rate=0.5, optim="sgd",
        )  # fmt: skip
        trainer = SmartTrainer(
            model=model, args=args, train_dataset=make_data("sequence"), smart_args=smart,
            callbacks=[capture],
        )  # fmt: skip
        trainer.train()
        runs.append((capture.steps, params(trainer.teacher.module)))
    (steps1, teacher1), (steps2, teacher2) = runs
    assert len(steps1) == len(steps2) == 3
    for a, b in zip(steps1, steps2, strict=True):
        for n in a:
            torch.testing.assert_close(a[n], b[n], rtol=1e-5, atol=1e-6, msg=n)
    for n in teacher1:
        torch.testing.assert_close(teacher1[n], teacher2[n], rtol=1e-5, atol=1e-6, msg=n)
    assert any(not torch.equal(steps1[0][n], steps1[-1][n]) for n in steps1[0])  # it trained


def test_masks(tmp_path):
    """Noise / norm mask: the attention mask. Rows of R_s and D_Breg: token-level logits, the
    attention mask and, with mask_ignored_labels, labels != -100 too; sequence level: all."""
    batch = default_data_collator(make_data("token")[:4])
    embed = torch.zeros(4, T, 32)
    tok_logits, seq_logits = torch.zeros(4, T, 3), torch.zeros(4, 3)
    am = batch["attention_mask"].bool()
    for flag, expected in ((False, am), (True, am & (batch["labels"] != -100))):
        trainer = SmartTrainer(
            model=make_model("token"), args=make_args(tmp_path),
            smart_args=SmartArguments(mask_ignored_labels=flag),
        )  # fmt: skip
        mask, rows = trainer._masks(batch, embed, tok_logits)
        assert torch.equal(mask, am) and torch.equal(rows, expected)
        seq = default_data_collator(make_data("sequence")[:4])  # [B] labels: attention mask only
        mask, rows = trainer._masks(seq, embed, seq_logits)
        assert torch.equal(mask, seq["attention_mask"].bool()) and rows is None
    assert trainer._masks({}, embed, tok_logits) == (None, None)
    assert not torch.equal(am, am & (batch["labels"] != -100))  # the data has ignored labels


def test_eval_loss_is_task_loss(tmp_path):
    model = make_model("sequence")
    trainer = SmartTrainer(model=model, args=make_args(tmp_path))
    batch = default_data_collator(make_data("sequence")[:4])
    model.eval()
    with torch.no_grad():
        assert torch.equal(trainer.compute_loss(model, batch), model(**batch).loss)


def test_word_embeddings_fed_as_inputs_embeds(tmp_path):
    """The model's embeddings module gets the WORD embeddings as ``inputs_embeds`` (it adds
    position / type embeddings and LayerNorm once); the word-embedding table is looked up once
    per batch; the teacher embeds the input ids itself."""
    model = make_model("sequence", dropout=0.0)
    trainer = SmartTrainer(
        model=model, args=make_args(tmp_path), smart_args=SmartArguments(teacher_schedule=0.9)
    )
    teacher = trainer.create_teacher()
    batch = default_data_collator(make_data("sequence")[:4])
    ids = batch["input_ids"]
    word = model.bert.embeddings.word_embeddings

    model.eval()
    with torch.no_grad():  # the premise: word embeddings as inputs_embeds == input ids
        a = model(input_ids=ids, attention_mask=batch["attention_mask"]).logits
        b = model(inputs_embeds=word(ids), attention_mask=batch["attention_mask"]).logits
    torch.testing.assert_close(a, b, rtol=0, atol=0)

    calls, lookups, teacher_calls = [], [], []

    def record(into):
        def hook(module, args, kwargs):
            into.append(dict(kwargs, args=args))

        return hook

    hooks = [
        model.bert.embeddings.register_forward_pre_hook(record(calls), with_kwargs=True),
        word.register_forward_hook(lambda m, args, out: lookups.append(out.detach())),
        teacher.module.bert.embeddings.register_forward_pre_hook(
            record(teacher_calls), with_kwargs=True
        ),
    ]
    model.train()
    trainer.compute_loss(model, batch)
    for h in hooks:
        h.remove()
    assert len(lookups) == 1  # ours; the model never embeds the ids itself
    torch.testing.assert_close(lookups[0], word.weight[ids].detach(), rtol=0, atol=0)
    assert len(calls) == 3  # clean pass, one ascent step, perturbed pass
    for c in calls:
        assert c.get("input_ids") is None and not c["args"]
        assert c["inputs_embeds"].shape == (4, T, 32)
    torch.testing.assert_close(calls[0]["inputs_embeds"], lookups[0], rtol=0, atol=0)
    assert len(teacher_calls) == 1 and torch.equal(teacher_calls[0]["input_ids"], ids)


# ---- checkpoints -------------------------------------------------------------------------------


class TeacherAtSave(TrainerCallback):
    def __init__(self):
        self.trainer = None
        self.saved: dict[int, dict[str, torch.Tensor]] = {}

    def on_save(self, args, state, control, **kwargs):
        sd = self.trainer.teacher.state_dict()
        self.saved[state.global_step] = {
            k: v.clone() for k, v in sd.items() if isinstance(v, torch.Tensor)
        }


def _assert_state_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], torch.Tensor):
            assert torch.equal(a[k], b[k]), k
        else:
            assert a[k] == b[k], k


def test_checkpoint_saves_and_resume_restores_teacher(tmp_path):
    data = make_data("sequence")
    smart = SmartArguments(noise_std=1e-3, step_size=1e-2, radius=1e-2, teacher_schedule="paper")
    ckpt = dict(save_strategy="steps", save_steps=2, lr_scheduler_type="constant")

    at_save = TeacherAtSave()
    full_model = make_model("sequence")
    full = SmartTrainer(
        model=full_model, args=make_args(tmp_path, "full", **ckpt), train_dataset=data,
        smart_args=smart, callbacks=[at_save],
    )  # fmt: skip
    at_save.trainer = full
    full.train()
    final = full.teacher.state_dict()
    assert full.teacher.step == 4 and sorted(at_save.saved) == [2, 4]
    for step in (2, 4):
        path = tmp_path / "full" / f"checkpoint-{step}" / TEACHER_FILE
        saved = torch.load(path, weights_only=True)
        assert saved["_extra_state"]["step"] == step
        _assert_state_equal(
            {k: v for k, v in saved.items() if k != "_extra_state"}, at_save.saved[step]
        )

    # Resume a fresh run from checkpoint-2: the teacher is restored, then follows the same path.
    class FirstStep(TrainerCallback):
        teacher = None

        def on_step_begin(self, args, state, control, **kwargs):
            if self.teacher is None:
                self.teacher = {k: v.clone() for k, v in resumed.teacher.state_dict().items()
                                if isinstance(v, torch.Tensor)}  # fmt: skip

    first = FirstStep()
    resumed_model = make_model("sequence", seed=7)  # weights come from the checkpoint
    resumed = SmartTrainer(
        model=resumed_model, args=make_args(tmp_path, "resumed", **ckpt), train_dataset=data,
        smart_args=smart, callbacks=[first],
    )  # fmt: skip
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-2"))
    _assert_state_equal(first.teacher, at_save.saved[2])
    assert resumed.teacher.step == 4
    _assert_state_equal(resumed.teacher.state_dict(), final)
    for (n, p), (m, q) in zip(
        full_model.named_parameters(), resumed_model.named_parameters(), strict=True
    ):
        assert n == m and torch.equal(p, q), n

    # resume_from_checkpoint=True picks the last checkpoint (nothing left to train here).
    again = SmartTrainer(
        model=make_model("sequence", seed=8), args=make_args(tmp_path, "full", **ckpt),
        train_dataset=data, smart_args=smart,
    )  # fmt: skip
    again.train(resume_from_checkpoint=True)
    _assert_state_equal(again.teacher.state_dict(), final)

    # save_model at the end writes the teacher next to the model
    again.save_model(str(tmp_path / "final"))
    assert os.path.isfile(tmp_path / "final" / TEACHER_FILE)


def test_no_teacher_when_off(tmp_path):
    for smart in (SmartArguments(teacher=False), SmartArguments(bregman_weight=0.0)):
        trainer = SmartTrainer(
            model=make_model("sequence"), args=make_args(tmp_path, max_steps=1),
            train_dataset=make_data("sequence"), smart_args=smart,
        )  # fmt: skip
        trainer.train()
        assert trainer.teacher is None
        assert "bregman_loss" not in trainer.state.log_history[0]
        trainer.save_model()
        assert not os.path.exists(tmp_path / "out" / TEACHER_FILE)


# ---- errors ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, error",
    [
        (dict(smart_weight=-1.0), ValueError),
        (dict(bregman_weight=float("nan")), ValueError),
        (dict(smart_weight="1"), TypeError),
        (dict(teacher_schedule=1.5), ValueError),
        (dict(teacher_schedule="linear"), ValueError),
        (dict(teacher_schedule=None), TypeError),
        (dict(teacher=1), TypeError),
        (dict(rule="fgsm"), ValueError),
        (dict(num_steps=-1), ValueError),
        (dict(noise_std=-1e-5), ValueError),
        (dict(backend="triton2"), ValueError),
    ],
)
def test_bad_arguments(kwargs, error):
    with pytest.raises(error, match=next(iter(kwargs))):
        SmartArguments(**kwargs)


def test_bad_trainer_input(tmp_path):
    with pytest.raises(TypeError, match="smart_args"):
        SmartTrainer(model=make_model("sequence"), args=make_args(tmp_path), smart_args={})
    model = make_model("sequence")
    trainer = SmartTrainer(model=model, args=make_args(tmp_path))
    batch = default_data_collator(make_data("sequence")[:2])
    batch["inputs_embeds"] = model.bert.embeddings.word_embeddings(batch.pop("input_ids"))
    model.train()
    with pytest.raises(ValueError, match="input_ids"):
        trainer.compute_loss(model, batch)
