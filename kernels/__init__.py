"""Triton kernels of gradkernels: only ``@triton.jit`` code and the config factories.

Installed as ``gradkernels.kernels`` (never as a top-level ``kernels`` module).
"""
