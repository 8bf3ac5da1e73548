"""Declaring and reading run-config options: the bottom of tandem's config layer.

Flower hands every app a flat mapping of kebab-case keys. A section of it is a
frozen dataclass whose fields are declared with :func:`option` (key, default,
rule, check or choices); :func:`parse_section` builds one from the mapping and
raises :class:`ConfigError` naming the key, the value and the rule.

This module imports nothing from tandem, so every module (datasets, models,
the registries, a method's protocol) can raise :class:`ConfigError` or declare
options without pulling in the rest of the configuration.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any, TypeVar, get_type_hints

__all__ = [
    "ConfigError",
    "Scalar",
    "option",
    "parse_section",
    "registered",
    "reject_unknown_keys",
    "section_keys",
    "section_values",
]

T = TypeVar("T")
V = TypeVar("V")
Scalar = bool | int | float | str
#: Accepted values of a string option: fixed, or read from a registry when parsed.
Choices = Iterable[str] | Callable[[], Iterable[str]]


class ConfigError(ValueError):
    """An invalid run-config value: names the key, the value and the rule.

    The message is one line (``run config 'key' = value: rule``), so it reads
    the same in a traceback, a log line and Flower's run status.
    """

    def __init__(self, key: str, value: object, rule: str) -> None:
        self.key = key
        self.value = value
        self.rule = rule
        one_line = " ".join(str(rule).split())
        super().__init__(f"run config '{key}' = {value!r}: {one_line}")


def option(
    key: str,
    default: Scalar,
    rule: str = "",
    check: Callable[[Any], bool] | None = None,
    choices: Choices | None = None,
) -> Any:
    """Declare a dataclass field read from the run-config ``key``.

    Parameters
    ----------
    key : str
        The flat kebab-case run-config key.
    default : bool | int | float | str
        The value used when the key is absent.
    rule : str (default: "")
        The rule in words, shown when ``check`` fails.
    check : callable, optional
        Returns ``True`` for an acceptable value.
    choices : iterable of str or callable, optional
        The accepted values of a string option (the rule is derived from
        them). A callable is called at parse time, so the names can come from
        a registry that is imported only then.
    """
    if choices is not None and not callable(choices):
        choices = tuple(choices)
    meta = {"key": key, "rule": rule, "check": check, "choices": choices}
    return dataclasses.field(default=default, metadata=meta)


def _coerce(key: str, value: object, kind: type) -> Scalar:
    """Convert a run-config value to the field's type, strictly."""
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        raise ConfigError(key, value, "must be true or false")
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(key, value, "must be an integer")
        return value
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(key, value, "must be a number")
        if not math.isfinite(float(value)):
            raise ConfigError(key, value, "must be a finite number")
        return float(value)
    if kind is str:
        if not isinstance(value, str):
            raise ConfigError(key, value, "must be a string")
        return value
    raise TypeError(f"unsupported option type {kind!r} for '{key}'")


def section_keys(cls: type) -> tuple[str, ...]:
    """Run-config keys read by the dataclass ``cls`` (and its nested sections)."""
    keys: list[str] = []
    hints = get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if "key" in f.metadata:
            keys.append(f.metadata["key"])
        elif dataclasses.is_dataclass(hints[f.name]):
            keys.extend(section_keys(hints[f.name]))
    return tuple(keys)


def section_values(section: object) -> dict[str, Scalar]:
    """Every run-config key of a parsed section (and nested ones) with its value."""
    out: dict[str, Scalar] = {}
    if section is None or not dataclasses.is_dataclass(section):
        return out
    for f in dataclasses.fields(section):
        value = getattr(section, f.name)
        if "key" in f.metadata:
            out[f.metadata["key"]] = value
        elif dataclasses.is_dataclass(value):
            out.update(section_values(value))
    return out


def parse_section(cls: type[T], flat: Mapping[str, object]) -> T:
    """Build the frozen dataclass ``cls`` from a flat run-config mapping.

    Missing keys take their defaults; present ones are type-checked and
    validated. Nested dataclass fields are parsed from the same mapping.

    Raises
    ------
    ConfigError
        If a value has the wrong type, is not one of the choices or breaks the
        field's rule.
    """
    hints = get_type_hints(cls)
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        kind = hints[f.name]
        if "key" not in f.metadata:
            if dataclasses.is_dataclass(kind):
                values[f.name] = parse_section(kind, flat)  # type: ignore[arg-type]
            continue
        key = f.metadata["key"]
        raw = flat.get(key, f.default)
        value = _coerce(key, raw, kind)
        choices = f.metadata["choices"]
        if choices is not None:
            allowed = tuple(choices() if callable(choices) else choices)
            if value not in allowed:
                raise ConfigError(key, value, f"must be one of {', '.join(allowed)}")
        check = f.metadata["check"]
        if check is not None and not check(value):
            raise ConfigError(key, value, f.metadata["rule"])
        values[f.name] = value
    return cls(**values)


def reject_unknown_keys(flat: Mapping[str, object], known: Iterable[str]) -> None:
    """Raise :class:`ConfigError` for the first key that no section reads."""
    known = set(known)
    for key in sorted(flat):
        if key not in known:
            close = difflib.get_close_matches(key, sorted(known), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(key, flat[key], f"is not a tandem run-config key{hint}")


def registered(
    table: Mapping[str, V], key: str, name: str, also: Iterable[str] = ()
) -> V:
    """``table[name]``, or a :class:`ConfigError` for ``key`` listing the names.

    ``also`` are further accepted names handled before the lookup (e.g.
    ``auto``), shown first in the list.
    """
    try:
        return table[name]
    except KeyError:
        names = ", ".join([*also, *table])
        raise ConfigError(key, name, f"must be one of {names}") from None
