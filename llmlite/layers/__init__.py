"""Compressed linear layers that other packages build and ``models`` loads: ``lowrank``
(``LowRankLinear``, two dense linears). Imports nothing of llmlite but ``errors``."""

from llmlite.layers.lowrank import CONFIG_KEY, LowRankLinear, install_low_rank, low_rank_ranks

__all__ = ["CONFIG_KEY", "LowRankLinear", "install_low_rank", "low_rank_ranks"]
