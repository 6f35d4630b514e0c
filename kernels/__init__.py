"""Triton kernels of gradkernels: device code and its tile policy.

- ``linear.py``, ``attention.py``: only ``@triton.jit`` code;
- ``linear_configs.py``, ``attention_configs.py``: the tile policy of each family (what the autotuners
  may try, and the rules that prune it), with the generated ``attention_tiles.py``;
- ``arch.py``: the GPU architectures the policy knows; ``_common.py``: ``@triton.jit`` helpers.

Installed as ``gradkernels.kernels`` (never as a top-level ``kernels`` module). The bottom layer: nothing
here imports ``gradkernels``.
"""
