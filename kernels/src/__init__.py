"""Compute kernels for llmlite's hot paths, installed as ``llmlite.kernels`` (see kernels/README.md).

``cpu`` is the ``auto`` backend of ``QuantLinear`` (registered by ``llmlite.quant.linear``): on the
CPU, per layer shape, the fastest of the torch reference, ``int4pack`` (torch's packed 4-bit
kernel) and ``native`` (compiled 4-bit dequantisation, then a float product); on a CUDA device,
``cuda``: the Triton w4a16 kernels of ``triton_w4a16`` (imported only there: triton is optional).
"""
