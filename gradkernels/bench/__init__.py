"""Microbenchmarks and memory comparison: ``python -m gradkernels.bench``."""
