"""smart_kernels benchmark harness: ``python -m benchmarks --help``."""
