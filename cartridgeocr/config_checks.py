"""Config values checked against the type they must have, as one-line `ConfigError`s.

Hydra and OmegaConf take ``key=value`` overrides as they come: ``max_pixels=lots`` is the string
"lots" until some ``int()`` or comparison deep inside fails with a traceback. These checks
run where a value is first taken, and name the key, the value and what it must be.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import types
import typing
from typing import Any

from cartridgeocr.errors import ConfigError
from cartridgeocr.errors import quoted as shown  # the one short repr of a user's value


def number(
    value: Any,
    key: str,
    *,
    integer: bool = False,
    minimum: float | None = None,
    allow_none: bool = False,
    hint: str = "",
) -> Any:
    """``value`` as an int (``integer``) or a float, at least ``minimum``; None when allowed.

    Whole floats pass as ints (``max_pixels=1e8``); booleans and strings never pass as numbers.
    """
    if value is None and allow_none:
        return None
    kind = "an integer" if integer else "a number"
    if minimum is not None:
        kind += f" >= {minimum:g}"
    if allow_none:
        kind += " or null"
    tail = f" ({hint})" if hint else ""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ConfigError(f"{key}={shown(value)}: must be {kind}{tail}")
    if not math.isfinite(float(value)):
        raise ConfigError(f"{key}={shown(value)}: must be {kind}{tail}")
    if integer:
        if not float(value).is_integer():
            raise ConfigError(f"{key}={shown(value)}: must be {kind}{tail}")
        value = int(value)
    else:
        value = float(value)
    if minimum is not None and value < minimum:
        raise ConfigError(f"{key}={shown(value)}: must be {kind}{tail}")
    return value


def flag(value: Any, key: str) -> bool:
    """A boolean config value: true or false, nothing else."""
    if isinstance(value, bool):
        return value
    raise ConfigError(f"{key}={shown(value)}: must be true or false")


def _check(value: Any, hint: Any, key: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if hint is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        rest = [a for a in args if a is not type(None)]
        if len(rest) == 1:
            return _check(value, rest[0], key)
        return value
    if hint is bool:
        return flag(value, key)
    if hint is int:
        return number(value, key, integer=True)
    if hint is float:
        return number(value, key)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}={shown(value)}: must be a string")
        return value
    if origin in (tuple, list) or hint in (tuple, list):
        if isinstance(value, str) and args and args[0] is str:
            value = [value]  # directions=outward: a list of one
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{key}={shown(value)}: must be a list, e.g. [a, b]")
        inner = args[0] if args else Any
        return type(value)(_check(v, inner, f"{key}[{i}]") for i, v in enumerate(value))
    return value


def dataclass_values(cls: type, values: dict, prefix: str) -> dict:
    """``values`` for the fields of dataclass ``cls``, each checked against the field's type
    (numbers, booleans, strings, lists; ``X | None``), named ``<prefix>.<field>`` when wrong.
    Unknown keys are left for the dataclass to refuse."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    out = dict(values)
    for name, value in values.items():
        if name in names and name in hints:
            out[name] = _check(value, hints[name], f"{prefix}.{name}")
    return out
