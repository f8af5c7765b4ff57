"""smart_kernels: fast, exact kernels for SMART fine-tuning (Jiang et al., ACL 2020).

Public API (see README.md and DESIGN §2)::

    sk.sym_kl(input, target, *, reduction="batchmean", grad="full", mask=None, backend=None)
    sk.kl(input, target, *, reduction="batchmean", mask=None, backend=None)
    sk.backends()
"""

from smart_kernels._backends import backends
from smart_kernels.ops.sym_kl import kl, sym_kl

__all__ = ["backends", "kl", "sym_kl"]
__version__ = "0.1.0"
