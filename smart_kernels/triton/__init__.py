"""Triton kernels and their launchers. Imported lazily: ``import smart_kernels`` works without
triton, and TRITON_INTERPRET must be set before these modules are imported."""
