"""Typed settings whose type, check and documentation are declared once, on the field.

A recipe section (and `replit-ft prep`'s settings) is a dataclass whose fields are made by
`setting(default, doc, ...)`. `build(cls, values)` turns a plain mapping (parsed YAML, or
command-line flags) into the dataclass: it names unknown keys with the closest known one,
converts and checks every value against the field's type and rule, and then runs the
class's own `check()` for rules that tie several fields together. Every problem is a
`SettingError` that carries the key, so the caller can say where it was written (a
recipe's file and line, an override, a flag).

Hand-written rather than pydantic: the kit needs only these few rules, and the error has
to point at a YAML line or a command-line flag, which pydantic's error model does not know.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass
from typing import Any


class SettingError(ValueError):
    """A setting that is unknown or wrong; `key` is its dotted name, `problem` what is wrong."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"{key}: {problem}" if key else problem)
        self.key = key
        self.problem = problem

    def under(self, prefix: str) -> SettingError:
        """The same error with its key inside section `prefix`."""
        return SettingError(f"{prefix}.{self.key}" if self.key else prefix, self.problem)


@dataclass(frozen=True)
class Rule:
    """What a setting may hold, beyond its type; `doc` says what it is for."""

    doc: str
    choices: tuple[Any, ...] = ()  # for lists: each item
    minimum: float | None = None  # inclusive
    above: float | None = None  # exclusive
    maximum: float | None = None  # inclusive
    below: float | None = None  # exclusive
    # "path": a file or folder, relative to the recipe file that names it; "path or hub id":
    # the same, unless it reads `owner/name` and no such folder exists.
    path: str = ""
    hint: str = ""  # added to the message of a wrong value

    def check(self, value: Any) -> str | None:
        """What is wrong with `value` (already of the right type), or None."""
        items = value if isinstance(value, list) else [value]
        if self.choices:
            for item in items:
                if item not in self.choices:
                    choices = ", ".join(map(_show, self.choices))
                    return f"{_show(item)} is not one of {choices}{self.hint}"
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            return None
        bounds = (
            (self.minimum, value >= (self.minimum or 0), "at least"),
            (self.above, value > (self.above or 0), "more than"),
            (self.maximum, value <= (self.maximum or 0), "at most"),
            (self.below, value < (self.below or 0), "less than"),
        )
        for bound, ok, words in bounds:
            if bound is not None and not ok:
                return f"must be {words} {bound:g}, got {value!r}"
        return None


def setting(default: Any, doc: str, **rule: Any) -> Any:
    """A dataclass field with its documentation and rule (see `Rule` for the keywords)."""
    metadata = {"rule": Rule(doc, **rule)}
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def rule_of(cls: type, name: str) -> Rule | None:
    """The rule declared on field `name` of `cls`."""
    return {f.name: f.metadata.get("rule") for f in dataclasses.fields(cls)}.get(name)


def build(cls: type, values: Any) -> Any:
    """`cls` from a mapping: unknown keys, wrong types and broken rules raise SettingError."""
    if not isinstance(values, dict):
        raise SettingError("", f"expected a mapping of settings, got {_show(values)}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in values:
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise SettingError(str(key), f"unknown key{hint}; known: {', '.join(names)}")
    kwargs = {}
    for name, value in values.items():
        try:
            kwargs[name] = convert(hints[name], value)
        except SettingError as err:
            raise (err.under(name) if err.key else SettingError(name, err.problem)) from None
        rule = rule_of(cls, name)
        if rule is not None and (problem := rule.check(kwargs[name])):
            raise SettingError(name, problem)
    made = cls(**kwargs)
    if hasattr(made, "check"):
        made.check()
    return made


def convert(hint: Any, value: Any) -> Any:
    """`value` as type `hint` (YAML's ints count as floats; nothing else is coerced)."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        hint = next(a for a in args if a is not type(None))
    if dataclasses.is_dataclass(hint):
        return build(hint, value)
    origin, args = typing.get_origin(hint) or hint, typing.get_args(hint)
    if origin is list:
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list):
            raise SettingError("", f"expected a list, got {_show(value)}")
        return [convert(args[0], item) for item in items] if args else items
    if origin is dict:
        if not isinstance(value, dict):
            raise SettingError("", f"expected a mapping, got {_show(value)}")
        return {str(k): convert(args[1], v) for k, v in value.items()} if args else value
    if origin is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if origin is float and isinstance(value, float) and value != value:
        raise SettingError("", "expected a number, got NaN")
    if isinstance(value, bool) and origin is not bool or not isinstance(value, origin):
        raise SettingError("", f"expected {_type_name(origin)}, got {_show(value)}")
    return value


def describe(cls: type, prefix: str = "") -> list[tuple[str, str, str, str]]:
    """(key, type, default, doc) of every setting of `cls`, sections flattened, for help text."""
    rows = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        hint, key = hints[f.name], prefix + f.name
        inner = [a for a in typing.get_args(hint) if a is not type(None)]
        section = (
            hint
            if dataclasses.is_dataclass(hint)
            else next((a for a in inner if dataclasses.is_dataclass(a)), None)
        )
        rule = f.metadata.get("rule")
        if section is not None and rule is None:
            rows += describe(section, key + ".")
            continue
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        doc = rule.doc if rule else ""
        if rule and rule.choices:
            doc += f" One of: {', '.join(map(_show, rule.choices))}."
        if section is not None:
            rows.append((key, "section", _show(default), doc))
            rows += describe(section, key + ".")
        else:
            rows.append((key, _type_text(hint), _show(default), doc))
    return rows


def _type_name(origin: Any) -> str:
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(
        origin, getattr(origin, "__name__", str(origin))
    )


def _type_text(hint: Any) -> str:
    text = str(hint).replace("typing.", "")
    return text if not isinstance(hint, type) else hint.__name__


def _show(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value) if isinstance(value, str) else str(value)
