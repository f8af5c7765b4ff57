"""Integrations of SMART with training frameworks; each submodule imports its framework itself,
so importing this package costs nothing.

* :mod:`smart_kernels.integrations.transformers`: ``SmartTrainer``, a Hugging Face
  ``transformers.Trainer`` with SMART's ``L + λ_s·R_s + μ·D_Breg`` and the momentum teacher
  (needs ``transformers`` and ``accelerate``).
"""
