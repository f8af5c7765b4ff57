"""Drop-in replacements for other SMART implementations, running on smart_kernels' fused ops.

* :mod:`smart_kernels.compat.smart_pytorch`: smart-pytorch 0.0.4 (``SMARTLoss``, ``kl_loss``,
  ``sym_kl_loss``, ``js_loss``, ``inf_norm``) with its signatures, defaults and semantics::

      from smart_kernels.compat.smart_pytorch import SMARTLoss, sym_kl_loss
"""
