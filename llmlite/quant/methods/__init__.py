"""The compression methods the layer walk can run, one file each.

Every module in this folder defines ``METHOD`` (a ``llmlite.quant.method.Method``); adding a
method is adding a file: it is found here by name, the CLI, the API and recipes accept it.
"""

from __future__ import annotations

import importlib
import pkgutil

from llmlite.errors import LlmliteError
from llmlite.quant.method import Method


def _discover() -> dict[str, Method]:
    found: dict[str, Method] = {}
    for info in pkgutil.iter_modules(__path__):
        method = importlib.import_module(f"{__name__}.{info.name}").METHOD
        if method.name in found:
            raise ValueError(f"two methods are named {method.name}")
        found[method.name] = method
    return dict(sorted(found.items()))


METHODS: dict[str, Method] = _discover()


def get(name: str) -> Method:
    """The method called ``name``; an unknown name is a one-line error listing the known ones."""
    if name not in METHODS:
        raise LlmliteError(f"unknown method '{name}'; use one of: {', '.join(METHODS)}")
    return METHODS[name]
