"""Settings from the command line, one way for every command: dotlist overrides (`section.key=value`) and named
presets (a name -> a dotlist), applied to any tree of settings dataclasses, frozen or not.

`with_overrides(settings, items)` returns a copy with the items applied; every item is checked (the key exists,
the value parses as the key's type) before anything is built, and each dataclass is rebuilt once with all of its
changes (a frozen one validates the combination in `__post_init__`, never a half-applied state).
`with_preset(settings, presets, name)` is the same for a preset's dotlist, refusing an unknown name with the
names allowed. Errors are ValueErrors that name the key and what it accepts.
"""

from __future__ import annotations

import ast
import dataclasses
from typing import (
    Any,
    Iterable,
    Literal,
    Mapping,
    Optional,
    Sequence,
    TypeVar,
    Union,
    get_args,
    get_origin,
    get_type_hints,
)

T = TypeVar("T")
Presets = Mapping[str, Sequence[str]]  # preset name -> dotlist


def with_preset(settings: T, presets: Presets, name: Optional[str]) -> T:
    """`settings` with preset `name`'s dotlist applied (None: unchanged)."""
    if name is None:
        return settings
    if name not in presets:
        raise ValueError(f"unknown preset {name!r}; allowed: {', '.join(presets)}")
    return with_overrides(settings, presets[name])


def with_overrides(settings: T, items: Iterable[str]) -> T:
    """A copy of `settings` with dotlist `items` ("model.context_dim=56", later items win) applied."""
    changes: dict[tuple[str, ...], Any] = {}
    for item in items:
        path, value = parse_item(settings, item)
        changes[path] = value
    return _rebuild(settings, (), changes)


def parse_item(settings: Any, item: str) -> tuple[tuple[str, ...], Any]:
    """'section.key=value' -> (("section", "key"), the value parsed as the key's type)."""
    if "=" not in item:
        raise ValueError(f"override {item!r} is not of the form section.key=value")
    key, raw = item.split("=", 1)
    key = key.strip().lstrip("+")
    *path, leaf = key.split(".")
    node: Any = settings
    for i, part in enumerate(path):
        if not dataclasses.is_dataclass(node) or part not in _field_names(node):
            raise _unknown_key(key, node, ".".join(path[:i]))
        node = getattr(node, part)
    if not dataclasses.is_dataclass(node) or leaf not in _field_names(node):
        raise _unknown_key(key, node, ".".join(path))
    hint = get_type_hints(type(node))[leaf]
    if dataclasses.is_dataclass(hint):
        raise ValueError(f"{key} is a section, not a key; set one of its keys, e.g. {key}.<key>=value")
    return (*path, leaf), parse_value(key, raw.strip(), hint)


def _rebuild(node: Any, prefix: tuple[str, ...], changes: dict[tuple[str, ...], Any]) -> Any:
    """`node` (at `prefix`) with the changes under it, each dataclass rebuilt once; untouched ones kept."""
    mine = {p[len(prefix)]: v for p, v in changes.items() if len(p) == len(prefix) + 1 and p[: len(prefix)] == prefix}
    below = {p[len(prefix)] for p in changes if len(p) > len(prefix) + 1 and p[: len(prefix)] == prefix}
    if not mine and not below:
        return node
    for name in below:
        mine[name] = _rebuild(getattr(node, name), (*prefix, name), changes)
    return dataclasses.replace(node, **mine)


def _field_names(node) -> list[str]:
    return [f.name for f in dataclasses.fields(node)]


def _unknown_key(key: str, node, section: str) -> ValueError:
    allowed = ", ".join(_field_names(node)) if dataclasses.is_dataclass(node) else "(none)"
    where = f"section '{section}'" if section else "the top level"
    return ValueError(f"unknown config key {key!r}; keys allowed in {where}: {allowed}")


def parse_value(key: str, raw: str, hint) -> Any:
    """The text `raw` of key `key` as a value of type `hint` (bool, int, float, str, a Literal of strings, or
    Optional of one of these)."""
    optional = get_origin(hint) is Union and type(None) in get_args(hint)
    base = [a for a in get_args(hint) if a is not type(None)][0] if optional else hint
    if get_origin(base) is Literal:
        choices = get_args(base)
        if raw in choices:
            return raw
        raise ValueError(f"{key}={raw!r}; allowed: {', '.join(choices)}")
    if raw.lower() in ("none", "null", "~", ""):
        if optional:
            return None
        if base is str:
            return ""
        raise ValueError(f"{key} cannot be empty/None; give a {base.__name__}")
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        value = raw
    if base is bool:
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        if isinstance(value, bool):
            return value
    elif base is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif base is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif base is str:
        return raw if not isinstance(value, str) else value
    raise ValueError(f"{key}={raw!r}: expected a {base.__name__}")
