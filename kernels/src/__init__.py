"""Compute kernels for llmlite's hot paths, installed as ``llmlite.kernels``.

The quantized linear layer currently runs on its pure-PyTorch backend
(``llmlite.quant.linear``); Triton kernels register themselves here as further backends with
``llmlite.quant.linear.register_backend``.
"""
