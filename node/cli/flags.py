"""Command-line flags made from the typed config and manifest dataclasses, so a flag's default and
help text come from one place: the field's default and its one-line comment."""

from __future__ import annotations

import argparse
import dataclasses
import inspect
from functools import lru_cache


@lru_cache(maxsize=None)
def field_comments(cls) -> dict[str, str]:
    """{field: its trailing `# comment`} from a dataclass's source."""
    out = {}
    for line in inspect.getsource(cls).splitlines():
        name, sep, rest = line.strip().partition(":")
        if sep and name.isidentifier() and "#" in rest:
            out[name] = rest.split("#", 1)[1].strip()
    return out


def field_help(cls, name: str, *, show_default: bool = True) -> str:
    """A field's comment, with its default (argparse escapes: % doubled)."""
    text = field_comments(cls).get(name, "")
    default = {f.name: f for f in dataclasses.fields(cls)}[name].default
    if show_default and default is not dataclasses.MISSING and default not in ("", ()) and not isinstance(default, bool):
        shown = " ".join(map(str, default)) if isinstance(default, tuple) else default
        text = f"{text} (default: {shown})" if text else f"default: {shown}"
    return text.replace("%", "%%")


def add_field_flag(p: argparse.ArgumentParser, cls, name: str, *, flag: str | None = None, dest: str | None = None,
                   **kwargs) -> None:
    """A flag whose default, type and help come from dataclass field `cls.name`."""
    f = {f.name: f for f in dataclasses.fields(cls)}[name]
    default = f.default
    kwargs.setdefault("help", field_help(cls, name))
    if isinstance(default, bool):
        kwargs.setdefault("action", argparse.BooleanOptionalAction)
    elif isinstance(default, tuple):
        kwargs.setdefault("nargs", "+")
        default = list(default)
    elif default is not dataclasses.MISSING and type(default) in (int, float):
        kwargs.setdefault("type", type(default))
    if default is not dataclasses.MISSING:
        kwargs.setdefault("default", default)
    p.add_argument(flag or "--" + name.replace("_", "-"), dest=dest or name, **kwargs)
