"""How a setting is declared, once: its default, its help, what "auto" means for it, its flag. The flags,
the environment variables and the settings page are all read from these declarations, and a value's type is
the field's own annotation (resolved with typing.get_type_hints), never its spelling."""

from __future__ import annotations

import argparse
import dataclasses
import functools
import types
import typing
from collections.abc import Callable
from dataclasses import MISSING, Field
from typing import Any, Literal, TypeVar

T = TypeVar("T")
ENV_PREFIX = "VQA_"


def setting(default: T, help: str, *, auto: str | None = None, flag: str | None = None,
            parse: Callable[[str], Any] | None = None, metavar: str | None = None, dest: str | None = None,
            action: str | None = None, shown: str | None = None) -> T:
    """A field of a settings group. `auto`: what the placeholder default resolves to (for the help and the page).
    For `cluster`'s own options, which have flags but no variables: `flag` (default --the-name), `parse` (the text
    to the flag's value), `metavar`, `dest`, `action` (argparse's), `shown` (the default as the flag takes it)."""
    meta = {"help": help, "auto": auto, "flag": flag, "parse": parse, "metavar": metavar, "dest": dest,
            "action": action, "shown": shown}
    return dataclasses.field(default=default, metadata=meta)


def setting_list(help: str, **kw: Any) -> Any:
    """A list-valued option, empty by default; the same keywords as setting()."""
    declared: Any = setting(None, help, **kw)  # a Field, typed as its default for the dataclass declaring it
    return dataclasses.field(default_factory=list, metadata=declared.metadata)


@functools.cache
def hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def kind(cls: type, f: Field[Any]) -> tuple[Any, bool]:
    """A field's type without its `| None`, and whether it may be None."""
    typ = hints(cls)[f.name]
    if isinstance(typ, types.UnionType) or typing.get_origin(typ) is typing.Union:
        args = [a for a in typing.get_args(typ) if a is not type(None)]
        return (args[0] if len(args) == 1 else typ), True
    return typ, False


def choices(typ: Any) -> tuple[str, ...] | None:
    return typing.get_args(typ) if typing.get_origin(typ) is Literal else None


def type_name(cls: type, f: Field[Any]) -> str:
    typ, optional = kind(cls, f)
    name = " | ".join(choices(typ) or ()) or getattr(typ, "__name__", str(typ))
    return name + " | None" if optional else name


def default_text(f: Field[Any]) -> str:
    if f.metadata.get("shown") is not None:
        return str(f.metadata["shown"])
    value = f.default if f.default is not MISSING else None
    if f.metadata.get("auto") is not None:
        return "auto" if value in ("auto", 0, -1, -1.0) else str(value)
    return "" if value is None or value == [] else str(value).lower() if isinstance(value, bool) else str(value)


def group_title(cls: type) -> tuple[str, str]:
    """A group's title and what it is about, from its docstring's first line ("Batching: how questions ...")."""
    title, _, about = (cls.__doc__ or cls.__name__).strip().split("\n")[0].partition(": ")
    return title.rstrip("."), about


def env_name(f: Field[Any]) -> str:
    return ENV_PREFIX + f.name.upper()


def flag_name(f: Field[Any]) -> str:
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def dest(f: Field[Any]) -> str:
    """Where argparse puts the field's flag (`--retry-body-kb`: args.retry_body_kb)."""
    return f.metadata.get("dest") or flag_name(f).removeprefix("--").replace("-", "_")


def parse_bool(raw: str) -> bool:
    """`true`/`false` and friends, for a VQA_* variable or a boolean flag given a value (`--exact-preprocess no`)."""
    low = raw.strip().lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"expected true or false, not {raw!r}")


def from_text(cls: type, f: Field[Any], raw: str) -> Any:
    """A VQA_* variable's text as the field's type; empty is None where None is allowed."""
    typ, optional = kind(cls, f)
    if optional and raw == "":
        return None
    try:
        if typ is bool:
            return parse_bool(raw)
        if typ in (int, float):
            return typ(raw)
    except ValueError:
        what = "true or false" if typ is bool else "a whole number" if typ is int else "a number"
        raise ValueError(f"invalid setting {env_name(f)}={raw!r}: expected {what}") from None
    return raw


def to_text(value: Any) -> str:
    """The inverse of from_text: what a VQA_* variable holds for a value."""
    return "" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


def check_types(obj: Any, literals: bool = True) -> None:
    """Every field of a group holds its annotation's type (a Literal: one of its values, unless not `literals`),
    named when not."""
    cls = type(obj)
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        typ, optional = kind(cls, f)
        if value is None and optional:
            continue
        allowed = choices(typ)
        if allowed is not None and not literals:
            ok, want = isinstance(value, str), "expected text"
        elif allowed is not None:
            ok, want = value in allowed, "expected " + ", ".join(allowed[:-1]) + " or " + allowed[-1]
        elif typ is bool:
            ok, want = isinstance(value, bool), "expected true or false"
        elif typ in (int, float):
            ok = isinstance(value, int if typ is int else (int, float)) and not isinstance(value, bool)
            want = "expected a whole number" if typ is int else "expected a number"
        elif typ is str:
            ok, want = isinstance(value, str), "expected text"
        else:
            continue
        if not ok:
            raise invalid(f.name, value, want)


def invalid(name: str, value: Any, why: str) -> ValueError:
    return ValueError(f"invalid setting {name}={value!r}: {why}")


def help_text(cls: type, f: Field[Any], env: bool) -> str:
    where = f"env {env_name(f)}, " if env else ""
    default = default_text(f)
    auto = f.metadata.get("auto")
    return (f"{f.metadata['help']} [{where}default {default or 'none'}"
            + (f"; auto: {auto}" if auto and default == "auto" else "") + "]")


def add_flags(parser: argparse._ActionsContainer, cls: type, *, env: bool, exclude: tuple[str, ...] = ()) -> None:
    """One flag per field of `cls`. With `env` (serve's settings) a flag defaults to None, so that the environment
    can fill in; without (cluster's options), to the field's default."""
    for f in dataclasses.fields(cls):
        if f.name in exclude or f.metadata.get("help") is None:
            continue
        typ, _ = kind(cls, f)
        meta = f.metadata
        kw: dict[str, Any] = {"help": help_text(cls, f, env)}
        if meta.get("dest"):
            kw["dest"] = meta["dest"]
        if meta.get("action"):
            kw["action"] = meta["action"]
            if meta["action"] == "append":
                kw["type"] = str
        elif typ is bool:  # `--exact-preprocess` alone, or with a value (`--exact-preprocess false`)
            kw.update(type=parse_bool, nargs="?", const=True)
        else:
            kw["type"] = meta.get("parse") or (typ if typ in (int, float) else str)
            if meta.get("metavar") or choices(typ):
                kw["metavar"] = meta.get("metavar") or "{" + ",".join(choices(typ) or ()) + "}"
        if meta.get("action") != "store_true":
            kw["default"] = None if env or f.default is MISSING else (
                meta["shown"] if meta.get("shown") is not None else f.default)
        parser.add_argument(flag_name(f), **kw)
