"""``SmartTrainer``: a Hugging Face ``transformers.Trainer`` that trains with SMART (Jiang et al.,
ACL 2020), ``L + λ_s·R_s + μ·D_Breg``, on the fused ops::

    from smart_kernels.integrations.transformers import SmartArguments, SmartTrainer

    trainer = SmartTrainer(
        model=model, args=training_args, train_dataset=train, eval_dataset=dev,
        smart_args=SmartArguments(smart_weight=1.0, bregman_weight=1.0),  # the paper's defaults
    )
    trainer.train()

Each training batch: the WORD embeddings ``e = model.get_input_embeddings()(input_ids)`` are fed as
``inputs_embeds`` (the model adds position / type embeddings and LayerNorm itself, once), giving
the task loss ``L`` (the Trainer's own: the model's loss, label smoothing or ``compute_loss_func``)
and the logits; ``R_s`` is :class:`smart_kernels.SMARTLoss` on ``e`` with the attention mask
(padding gets no noise; for token-level logits [B, T, C] it also masks the loss rows);
``D_Breg = ℓ_s(f(x; θ), f(x; θ̃))`` compares the logits with a :class:`smart_kernels.MomentumTeacher`
θ̃ run on the same ``input_ids`` (through its own embeddings). ``ℓ_s`` is the symmetric KL, or the
squared error for regression (``problem_type == "regression"`` or ``num_labels == 1``).

The teacher is created from the model when training starts (``θ̃ = θ``, on the model's device),
updated ``θ̃ ← β·θ̃ + (1 − β)·θ`` after every optimizer step (once per step under gradient
accumulation; a ``TrainerCallback.on_step_end``), saved as ``teacher.pt`` by ``save_model`` (so in
every checkpoint folder and next to the final model) and restored by
``train(resume_from_checkpoint=...)``. Evaluation and prediction use the plain task loss.

Gradient accumulation: the task loss, ``R_s`` and ``D_Breg`` are means over each micro-batch and
the Trainer divides their sum by the accumulation steps: SmartTrainer sets
``model_accepts_loss_kwargs = False`` (classification heads ignore ``num_items_in_batch``; with it
on, the Trainer would leave their mean undivided and scale it by the number of processes). With a
``compute_loss_func`` (or ``model_accepts_loss_kwargs`` set back to True for a model whose loss
is normalized by ``num_items_in_batch``), the SMART terms are divided by the accumulation steps
themselves, so their accumulated gradient stays that of their mean.

DDP: the adversarial forwards of ``R_s`` run through the module inside the DDP wrapper (DDP
expects one forward per backward; ``ddp_static_graph=True`` would otherwise silently corrupt the
gradients); the backward's gradients are all-reduced as usual.

The teacher is not updated when the optimizer skipped its step (fp16 loss-scale overflow).

Logged with the training loss (unweighted means over the micro-batches since the last log, on this
process): ``smart_loss`` (R_s) and ``bregman_loss`` (D_Breg).

Needs ``transformers`` (written against the stable Trainer API: ``compute_loss``, ``save_model``,
``train``, ``log``, callbacks) and ``accelerate`` (the Trainer's own requirement).
"""

from __future__ import annotations

import numbers
import os
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import get_last_checkpoint
from transformers.utils import logging

from smart_kernels.loss import SMARTLoss, bregman_loss
from smart_kernels.ops._checks import check_number
from smart_kernels.teacher import MomentumTeacher

logger = logging.get_logger(__name__)

TEACHER_FILE = "teacher.pt"  # the teacher's state_dict in a checkpoint / output folder
IGNORE_INDEX = -100  # the label of positions that carry no target (transformers' convention)
LOG_KEYS = ("smart_loss", "bregman_loss")


# accelerate's mixed_precision setting -> the autocast dtype of the model's forward
_AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class SmartArguments:
    """SMART's hyperparameters for :class:`SmartTrainer` (validated on creation).

    Args:
        smart_weight: λ_s, the weight of the adversarial regularizer R_s (0: off).
        bregman_weight: μ, the weight of the momentum Bregman term D_Breg (0: off, no teacher).
        num_steps: S, ascent steps of the perturbation (>= 0).
        step_size: η of each ascent step.
        noise_std: σ of the initial noise.
        radius: ε of the projection (None: no projection).
        norm: ``"inf"``, ``"l2"`` or ``"l1"``; scope: ``"token"`` or ``"sequence"`` (the groups
            of the norm).
        rule: ``"paper"`` (projected normalized-gradient ascent) or ``"normalize_sum"``
            (mt-dnn / smart-pytorch).
        grad: ``"full"`` (exact gradients of ℓ_s) or ``"stop_grad"`` (mt-dnn's convention).
        teacher: use the momentum teacher (D_Breg); ``False`` drops the term.
        teacher_schedule: β: ``"paper"`` (0.99 for the first 10% of the optimizer steps, then
            0.999; the total is the Trainer's ``max_steps``), a float in [0, 1] (constant), or a
            callable ``step -> β`` (``step``: updates done before this one, from 0).
        mask_ignored_labels: token-level tasks: also leave out of R_s and D_Breg the positions
            whose label is -100 (special tokens, continuation sub-words), not only padding; they
            still get noise (they are real input tokens). Default: every attended token counts
            (R_s and D_Breg need no label).
        backend: kernel backend of the fused ops (None: auto; ``"reference"``: pure PyTorch).
    """

    smart_weight: float = 1.0
    bregman_weight: float = 1.0
    num_steps: int = 1
    step_size: float = 1e-3
    noise_std: float = 1e-5
    radius: float | None = 1e-5
    norm: str = "inf"
    scope: str = "token"
    rule: str = "paper"
    grad: str = "full"
    teacher: bool = True
    teacher_schedule: str | float | Callable[[int], float] = "paper"
    mask_ignored_labels: bool = False
    backend: str | None = None

    def __post_init__(self) -> None:
        for name in ("smart_weight", "bregman_weight"):
            check_number(name, getattr(self, name))
        for name in ("teacher", "mask_ignored_labels"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name}: expected a bool, got {getattr(self, name)!r}")
        schedule = self.teacher_schedule
        if isinstance(schedule, str):
            if schedule != "paper":
                raise ValueError(
                    f"teacher_schedule: expected 'paper', a float in [0, 1] or a callable, "
                    f"got {schedule!r}"
                )
        elif isinstance(schedule, numbers.Real) and not isinstance(schedule, bool):
            if not 0.0 <= float(schedule) <= 1.0:
                raise ValueError(f"teacher_schedule: expected a β in [0, 1], got {schedule!r}")
        elif not callable(schedule):
            raise TypeError(
                f"teacher_schedule: expected 'paper', a float in [0, 1] or a callable, "
                f"got {schedule!r}"
            )
        SMARTLoss(_no_model, **self.smart_loss_kwargs())  # validates the rest

    @property
    def uses_teacher(self) -> bool:
        """Whether D_Breg is computed (``teacher`` and ``bregman_weight > 0``)."""
        return self.teacher and self.bregman_weight > 0

    def smart_loss_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of :class:`smart_kernels.SMARTLoss` (all but ``loss``)."""
        return dict(
            num_steps=self.num_steps, step_size=self.step_size, noise_std=self.noise_std,
            radius=self.radius, norm=self.norm, scope=self.scope, rule=self.rule,
            grad=self.grad, backend=self.backend,
        )  # fmt: skip


class SmartTrainer(Trainer):
    """A ``transformers.Trainer`` that trains with SMART (see the module docstring).

    ``SmartTrainer(*args, smart_args=SmartArguments(...), **kwargs)``: everything but
    ``smart_args`` goes to ``transformers.Trainer``. Works for sequence classification
    (including regression, ``num_labels=1``) and token classification: any model that takes
    ``inputs_embeds``, has ``get_input_embeddings()`` and returns ``logits``; training batches
    need ``input_ids``.

    Attributes:
        smart_args: the :class:`SmartArguments`.
        teacher: the :class:`~smart_kernels.MomentumTeacher` (None before training starts or
            when off).
    """

    def __init__(self, *args, smart_args: SmartArguments | None = None, **kwargs) -> None:
        if smart_args is None:
            smart_args = SmartArguments()
        elif not isinstance(smart_args, SmartArguments):
            raise TypeError(
                f"smart_args: expected SmartArguments or None, got {type(smart_args).__name__}"
            )
        self.smart_args = smart_args
        self._smart_losses = {
            kind: SMARTLoss(_perturbed_logits, loss=kind, **smart_args.smart_loss_kwargs())
            for kind in ("sym_kl", "mse")
        }
        self._teacher: MomentumTeacher | None = None
        self._resume_dir: str | None = None
        self._smart_log_sums: dict[str, torch.Tensor] = {}
        self._smart_log_count = 0
        super().__init__(*args, **kwargs)
        if self.compute_loss_func is None:
            # Sequence / token classification heads return a mean over the micro-batch and
            # ignore num_items_in_batch; a model whose forward takes **kwargs would make the
            # Trainer skip dividing by the accumulation steps (and multiply by the number of
            # processes), scaling the task loss by GA·N. Off: the Trainer divides the whole
            # objective (task loss and SMART terms alike) by the accumulation steps.
            self.model_accepts_loss_kwargs = False
        self.add_callback(_TeacherCallback(self))

    # ---- the teacher ----------------------------------------------------------------------

    @property
    def teacher(self) -> MomentumTeacher | None:
        return self._teacher

    def create_teacher(self) -> MomentumTeacher | None:
        """(Re)create the teacher as a copy of the current model (θ̃ = θ, on its device), with
        the schedule of ``smart_args``; called when training starts. Returns it (None when the
        teacher is off)."""
        self._teacher = None
        sa = self.smart_args
        if not sa.uses_teacher:
            return None
        schedule = sa.teacher_schedule
        if isinstance(schedule, str):
            total = self.state.max_steps or self.args.max_steps
            if not total or total <= 0:
                raise ValueError(
                    "teacher_schedule='paper' needs the number of optimizer steps: create the "
                    "teacher once training has started, or set TrainingArguments.max_steps"
                )
            kwargs = dict(schedule="paper", total_steps=int(total))
        elif callable(schedule):
            kwargs = dict(schedule=schedule)
        else:
            kwargs = dict(decay=float(schedule))
        self._teacher = MomentumTeacher(self.model, backend=sa.backend, **kwargs)
        return self._teacher

    def _start_teacher(self) -> None:
        teacher = self.create_teacher()
        if teacher is None or self._resume_dir is None:
            return
        path = os.path.join(self._resume_dir, TEACHER_FILE)
        if os.path.isfile(path):
            teacher.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        else:
            logger.warning(
                f"{self._resume_dir} has no {TEACHER_FILE}: the teacher restarts as a copy of the "
                "resumed model"
            )

    def _update_teacher(self) -> None:
        # No update (and no step of the β schedule) when the optimizer skipped its step (fp16
        # loss scaling found inf/NaN gradients): the parameters did not move.
        if self._teacher is not None and not self.accelerator.optimizer_step_was_skipped:
            self._teacher.update(self.model)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """The Trainer's ``save_model``, plus the teacher's state as ``teacher.pt`` in the same
        folder (on the process that saves)."""
        if self._teacher is not None and self.args.should_save:
            folder = output_dir if output_dir is not None else self.args.output_dir
            os.makedirs(folder, exist_ok=True)
            torch.save(self._teacher.state_dict(), os.path.join(folder, TEACHER_FILE))
        super().save_model(output_dir, _internal_call=_internal_call)

    def train(self, resume_from_checkpoint: str | bool | None = None, *args, **kwargs):
        """The Trainer's ``train``; when resuming, the teacher is restored from the checkpoint's
        ``teacher.pt``."""
        if resume_from_checkpoint is True and os.path.isdir(self.args.output_dir):
            resume_from_checkpoint = get_last_checkpoint(self.args.output_dir) or True
        resume = resume_from_checkpoint
        self._resume_dir = os.fspath(resume) if isinstance(resume, (str, os.PathLike)) else None
        try:
            return super().train(resume_from_checkpoint, *args, **kwargs)
        finally:
            self._resume_dir = None

    # ---- the loss -------------------------------------------------------------------------

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ):
        """``L + λ_s·R_s + μ·D_Breg`` in training (``model.training``); the Trainer's loss
        otherwise. ``inputs``: the batch (``input_ids`` [B, T], ``attention_mask``, labels, ...)."""
        if not model.training:
            return super().compute_loss(
                model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
            )
        input_ids = inputs.get("input_ids")
        if not isinstance(input_ids, torch.Tensor) or "inputs_embeds" in inputs:
            raise ValueError(
                "SmartTrainer: a training batch needs input_ids (and no inputs_embeds): SMART "
                f"perturbs the word embeddings of the input ids; got keys {sorted(inputs)}"
            )
        sa = self.smart_args
        unwrapped = self.accelerator.unwrap_model(model)
        # WORD embeddings only: the model adds position / type embeddings and LayerNorm itself.
        embed = unwrapped.get_input_embeddings()(input_ids)
        task_inputs = {k: v for k, v in inputs.items() if k != "input_ids"}
        task_inputs["inputs_embeds"] = embed
        loss, outputs = super().compute_loss(
            model, task_inputs, return_outputs=True, num_items_in_batch=num_items_in_batch
        )
        logits = _logits(outputs)
        label_keys = {"labels", *(self.label_names or ())}
        model_kwargs = {k: v for k, v in inputs.items() if k != "input_ids" and k not in label_keys}
        kind = "mse" if _is_regression(unwrapped, logits) else "sym_kl"
        mask, rows = self._masks(inputs, embed, logits)

        extra = None
        if sa.smart_weight > 0:
            # The adversarial forwards bypass a DDP wrapper (its hooks still all-reduce the
            # gradients of the one backward): DDP expects one forward per backward, and with
            # static_graph=True extra forwards through it give wrong gradients without an error.
            # Other wrappers (FSDP) stay: their forward gathers the parameters.
            adv_model = model.module if isinstance(model, DistributedDataParallel) else model
            low = _AUTOCAST_DTYPES.get(getattr(self.accelerator, "mixed_precision", "no"))
            if low is not None:  # accelerate's autocast is on inside model.forward only
                self._smart_losses[kind]._warn_if_rounded_away(low, autocast=True)
            r_s = self._smart_losses[kind](
                embed, logits, mask=mask, loss_mask=rows, model=adv_model,
                model_kwargs=model_kwargs,
            )  # fmt: skip
            extra = sa.smart_weight * r_s
            self._log_term("smart_loss", r_s)
        if self._teacher is not None:
            teacher_logits = _logits(self._teacher(input_ids=input_ids, **model_kwargs))
            d_breg = bregman_loss(logits, teacher_logits, loss=kind, mask=rows, backend=sa.backend)
            term = sa.bregman_weight * d_breg
            extra = term if extra is None else extra + term
            self._log_term("bregman_loss", d_breg)
        if extra is not None:
            self._smart_log_count += 1
            if self._loss_is_scaled_for_ga(num_items_in_batch):
                extra = extra / getattr(self, "current_gradient_accumulation_steps", 1)
            loss = loss + extra
        return (loss, outputs) if return_outputs else loss

    def _masks(
        self, inputs: Mapping[str, Any], embed: torch.Tensor, logits: torch.Tensor
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(tokens, rows): bool [B, T], the tokens that get noise and count in the norms (the
        attention mask), and bool ``logits.shape[:-1]`` or None, the rows of R_s and D_Breg that
        count: for token-level logits the attended tokens, and of those only the labelled ones
        (labels != -100) if ``mask_ignored_labels``; for sequence-level logits every row."""
        tokens = embed.shape[:-1]
        am = inputs.get("attention_mask")
        mask = am != 0 if isinstance(am, torch.Tensor) and am.shape == tokens else None
        if logits.shape[:-1] != tokens:
            return mask, None
        rows = mask
        labels = inputs.get("labels")
        if (
            self.smart_args.mask_ignored_labels
            and isinstance(labels, torch.Tensor)
            and labels.shape == tokens
        ):
            labeled = labels != IGNORE_INDEX
            rows = labeled if rows is None else rows & labeled
        return mask, rows

    def _loss_is_scaled_for_ga(self, num_items_in_batch) -> bool:
        """Whether the Trainer uses the returned loss as is under gradient accumulation (the task
        loss normalized over the whole accumulated batch) instead of dividing it by the steps."""
        flag = getattr(self, "loss_is_scaled_for_ga", None)
        if flag is not None:
            return bool(flag)
        accepts = getattr(self, "model_accepts_loss_kwargs", False)
        custom = getattr(self, "compute_loss_func", None) is not None
        return bool(accepts and num_items_in_batch is not None) or custom

    # ---- logging --------------------------------------------------------------------------

    def _log_term(self, key: str, value: torch.Tensor) -> None:
        value = value.detach().float()
        total = self._smart_log_sums.get(key)
        self._smart_log_sums[key] = value if total is None else total + value

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        """The Trainer's ``log``; training logs also get the means of R_s and D_Breg."""
        if "loss" in logs and self._smart_log_count:
            count = self._smart_log_count
            for key, total in self._smart_log_sums.items():
                logs[key] = total.item() / count
            self._smart_log_sums = {}
            self._smart_log_count = 0
        super().log(logs, *args, **kwargs)


class _TeacherCallback(TrainerCallback):
    """Creates the trainer's teacher when training starts (restoring it when resuming) and
    updates it after every optimizer step."""

    def __init__(self, trainer: SmartTrainer) -> None:
        self._trainer = weakref.ref(trainer)

    def on_train_begin(self, args, state, control, **kwargs):
        trainer = self._trainer()
        if trainer is not None:
            trainer._start_teacher()

    def on_step_end(self, args, state, control, **kwargs):
        trainer = self._trainer()
        if trainer is not None:
            trainer._update_teacher()


def _perturbed_logits(
    embed: torch.Tensor, *, model: nn.Module, model_kwargs: Mapping[str, Any]
) -> torch.Tensor:
    """SMARTLoss's ``eval_fn``: the model's logits from (perturbed) word embeddings."""
    return _logits(model(inputs_embeds=embed, **model_kwargs))


def _no_model(embed: torch.Tensor) -> torch.Tensor:
    raise RuntimeError("placeholder eval_fn (only used to validate SmartArguments)")


def _logits(outputs: Any) -> torch.Tensor:
    if isinstance(outputs, Mapping) and isinstance(outputs.get("logits"), torch.Tensor):
        return outputs["logits"]
    raise TypeError(
        "SmartTrainer: the model must return an output with `logits` (a ModelOutput, "
        f"return_dict=True); got {type(outputs).__name__}"
    )


def _is_regression(model: nn.Module, logits: torch.Tensor) -> bool:
    config = getattr(model, "config", None)
    problem = getattr(config, "problem_type", None)
    if problem is not None:
        return problem == "regression"
    return getattr(config, "num_labels", None) == 1 or logits.shape[-1] == 1
