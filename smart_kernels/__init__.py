"""smart_kernels: fast, exact kernels for SMART fine-tuning (Jiang et al., ACL 2020).

Public API (see README.md and DESIGN §2)::

    sk.sym_kl(input, target, *, reduction="batchmean", grad="full", mask=None, backend=None)
    sk.kl(input, target, *, reduction="batchmean", mask=None, backend=None)
    sk.init_noise(like, std=1e-5, *, mask=None, generator=None, backend=None)
    sk.normalize(x, *, norm="inf", scope="token", eps=1e-6, backend=None)
    sk.perturb_step(noise, grad, *, step_size=1e-3, radius=1e-5, norm="inf", scope="token",
                    rule="paper", eps=1e-6, mask=None, backend=None)
    sk.ema_update_(teacher, student, decay, *, backend=None)
    sk.ema(teacher, student, decay, *, backend=None)
    sk.MomentumTeacher(model, decay=0.99, *, schedule=None, total_steps=None, dtype=None,
                       backend=None)
    sk.SMARTLoss(eval_fn, *, loss="sym_kl", num_steps=1, step_size=1e-3, noise_std=1e-5,
                 radius=1e-5, norm="inf", scope="token", rule="paper", grad="full",
                 reduction="batchmean", eps=1e-6, backend=None)
        (embed, logits, *, mask=None, loss_mask=None, **eval_kwargs) -> R_s
    sk.bregman_loss(logits, teacher_logits, *, loss="sym_kl", mask=None, reduction="batchmean",
                    backend=None)
    sk.backends()
"""

from smart_kernels._backends import backends
from smart_kernels.loss import SMARTLoss, bregman_loss
from smart_kernels.ops.ema import ema, ema_update_
from smart_kernels.ops.perturb import init_noise, normalize, perturb_step
from smart_kernels.ops.sym_kl import kl, sym_kl
from smart_kernels.teacher import MomentumTeacher

__all__ = [
    "MomentumTeacher",
    "SMARTLoss",
    "backends",
    "bregman_loss",
    "ema",
    "ema_update_",
    "init_noise",
    "kl",
    "normalize",
    "perturb_step",
    "sym_kl",
]
__version__ = "0.1.0"
