"""Registers the ``llmlite`` model with lm-evaluation-harness, so that ``lm_eval --model llmlite`` works.

lm-eval has no plugin entry point for models. ``llmlite-lm-eval.pth`` imports this module when
Python starts; it only adds an import hook, which waits for ``lm_eval.models`` (where lm-eval
registers its own models) and then adds ``llmlite`` as a lazy entry: nothing heavy is imported
unless that model is asked for.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys

WATCHED = "lm_eval.models"
ENTRY = "llmlite.evaluation.harness:LlmliteLM"


class _RegisterAfterImport(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != WATCHED:
            return None
        sys.meta_path.remove(self)  # find the real module with the other finders
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            return spec
        run = spec.loader.exec_module

        def exec_module(module) -> None:
            run(module)
            from lm_eval.api.registry import model_registry

            if "llmlite" not in model_registry:
                model_registry.register("llmlite", target=ENTRY)

        spec.loader.exec_module = exec_module
        return spec


def install() -> None:
    """Add the hook (once); if lm-eval's models are already imported, register right away."""
    if WATCHED in sys.modules:
        from lm_eval.api.registry import model_registry

        if "llmlite" not in model_registry:
            model_registry.register("llmlite", target=ENTRY)
    elif not any(isinstance(f, _RegisterAfterImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegisterAfterImport())


install()
