"""Options from three places, one precedence: a config's defaults < a YAML recipe < explicit options.

A config is a dataclass whose fields are declared with ``option`` (default, help text and CLI
flags in one place: the CLI is generated from them) and whose class names its ``VERB``. A recipe
is a YAML mapping whose keys are the command's long options (``group-size`` or ``group_size``),
with ``verb:`` naming the command(s) it is for. ``build`` checks every value against its field's
type hint and runs the config's own ``validate``, so the Python API, a recipe and the CLI give
the same one-line errors. A leaf.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import fields
from pathlib import Path
from typing import Any

from llmlite.errors import LlmliteError


def option(
    default: Any = dataclasses.MISSING,
    help: str = "",
    *,
    factory: Any = dataclasses.MISSING,
    flags: tuple[str, ...] = (),
    negative: str | None = None,
    choices: tuple | None = None,
    positional: str | None = None,
    shown: str | None = None,
    cli_required: str | None = None,
) -> Any:
    """A config field with its CLI description, declared once beside its default.

    ``flags``: the option's names (default ``--field-name``); ``negative``: the flag that sets a
    boolean to false (default ``--no-field-name``); ``choices``: the values argparse offers;
    ``positional``: ``"?"``, ``"1"`` or ``"+"`` for a positional argument; ``shown``: the default as
    help shows it (default: the value); ``cli_required``: what the value is, for the CLI's one-line
    error when it is missing (the API may leave it unset).
    """
    meta = {
        "help": help,
        "flags": flags,
        "negative": negative,
        "choices": choices,
        "positional": positional,
        "shown": shown,
        "cli_required": cli_required,
    }
    if factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def read_recipe(path: str | Path, verb: str | None = None) -> dict[str, Any]:
    """The options in a YAML recipe, keys normalised to Python names; given the running ``verb``,
    a recipe whose ``verb:`` names other commands is refused."""
    import yaml

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise LlmliteError(f"no such recipe: {path}") from None
    except IsADirectoryError:
        raise LlmliteError(f"recipe {path} is a folder; pass a YAML file of option: value") from None
    except UnicodeDecodeError:
        raise LlmliteError(
            f"recipe {path} is not a text file (not UTF-8); pass a YAML file of option: value"
        ) from None
    except (OSError, yaml.YAMLError) as e:
        raise LlmliteError(f"cannot read recipe {path}: {_yaml_problem(e)}; fix the YAML") from None
    if not isinstance(data, dict):
        found = "empty" if data is None else f"a {type(data).__name__}"
        raise LlmliteError(f"recipe {path} is {found}; it must be a mapping of option: value")
    options = {str(k).replace("-", "_"): v for k, v in data.items()}
    verbs = options.pop("verb", None)
    verbs = [verbs] if isinstance(verbs, str) else verbs
    if verbs is not None and (not isinstance(verbs, list) or not all(isinstance(v, str) for v in verbs)):
        raise LlmliteError(f"recipe {path}: verb must name a command, e.g. verb: quantize")
    if verb is not None and verbs is not None and verb not in verbs:
        raise LlmliteError(
            f"recipe {path} is for llmlite {' / '.join(verbs)}, not {verb}; run it with that command"
        )
    return options


def _yaml_problem(e: Exception) -> str:
    """A YAML error on one line: the problem and where (``line 2, column 8``)."""
    problem, mark = getattr(e, "problem", None), getattr(e, "problem_mark", None)
    if problem and mark is not None:
        return f"{problem} at line {mark.line + 1}, column {mark.column + 1}"
    return " ".join(str(e).split())


def build(cls: type, recipe: str | Path | None = None, **options: Any):
    """An options object from the defaults, an optional recipe, then ``options``."""
    names = {f.name for f in fields(cls)}
    merged = read_recipe(recipe, getattr(cls, "VERB", None)) if recipe else {}
    unknown = sorted(set(merged) - names)
    if unknown:
        valid = ", ".join(sorted(n.replace("_", "-") for n in names))
        shown = ", ".join(k if k.isprintable() else repr(k) for k in unknown)
        raise LlmliteError(f"recipe {recipe}: unknown option(s) {shown}; valid: {valid}")
    unknown = sorted(set(options) - names)
    if unknown:
        valid = ", ".join(sorted(names))
        raise LlmliteError(f"unknown option(s) {', '.join(unknown)} for {cls.__name__}; valid: {valid}")
    merged.update(options)
    try:
        config = cls(**merged)
    except TypeError as e:
        raise LlmliteError(f"bad recipe option: {e}") from None
    _check_types(config, recipe)
    return config.validate()


def _check_types(config: Any, recipe: Any) -> None:
    """Each option's value against its field's type hint (a recipe can hold any YAML value)."""
    hints = typing.get_type_hints(type(config))
    for f in dataclasses.fields(config):
        value, hint = getattr(config, f.name), hints.get(f.name, Any)
        if not _matches(value, hint):
            name = f.name.replace("_", "-")
            raise LlmliteError(f"option {name} must be {_describe(hint)}, got {value!r}")


def _matches(value: Any, hint: Any) -> bool:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return any(_matches(value, arg) for arg in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:  # NaN and infinity are no settings
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if typing.get_origin(hint) is list:
        (item,) = typing.get_args(hint)
        return isinstance(value, list) and all(_matches(v, item) for v in value)
    return isinstance(value, hint) if isinstance(hint, type) else True


def _describe(hint: Any) -> str:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(hint) if a is not type(None))
    if typing.get_origin(hint) is list:
        return f"a list of {_describe(typing.get_args(hint)[0])}"
    names = {bool: "true or false", int: "a whole number", float: "a number", str: "text"}
    return names.get(hint, getattr(hint, "__name__", str(hint)))
