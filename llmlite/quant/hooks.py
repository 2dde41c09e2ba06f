"""Reading what a submodule receives inside a forward pass, and no further."""

from __future__ import annotations

from torch import Tensor, nn


class Stop(Exception):
    """Raised by a hook to end a forward pass early once the wanted input has been seen."""


def input_of(target: nn.Module, module: nn.Module, x: Tensor, kwargs: dict) -> Tensor:
    """The input ``target`` receives when ``module`` is called with ``x``; stops right there."""
    seen = []

    def grab(_m, args):
        seen.append(args[0])
        raise Stop

    handle = target.register_forward_pre_hook(grab)
    try:
        module(x, **kwargs)
    except Stop:
        pass
    finally:
        handle.remove()
    return seen[0]
