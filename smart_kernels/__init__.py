"""smart_kernels: fast, exact kernels for SMART fine-tuning (Jiang et al., ACL 2020).

Public API (see README.md and DESIGN §2)::

    sk.sym_kl(input, target, *, reduction="batchmean", grad="full", mask=None, backend=None)
    sk.kl(input, target, *, reduction="batchmean", mask=None, backend=None)
    sk.ema_update_(teacher, student, decay, *, backend=None)
    sk.ema(teacher, student, decay, *, backend=None)
    sk.MomentumTeacher(model, decay=0.99, *, schedule=None, total_steps=None, dtype=None)
    sk.backends()
"""

from smart_kernels._backends import backends
from smart_kernels.ops.ema import ema, ema_update_
from smart_kernels.ops.sym_kl import kl, sym_kl
from smart_kernels.teacher import MomentumTeacher

__all__ = ["MomentumTeacher", "backends", "ema", "ema_update_", "kl", "sym_kl"]
__version__ = "0.1.0"
