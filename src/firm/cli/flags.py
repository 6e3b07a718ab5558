"""Command-line flags generated from a config dataclass (TRL's convention).

Every field becomes ``--field-name`` with the field's docstring as help and its default shown;
a flag left out stays None, so only what the user typed overrides a preset or the defaults.
One mechanism for every command: ``firm train`` (FirmConfig), ``firm reward fit`` (FitConfig),
``firm synthetic`` (SyntheticConfig). OneLineParser is the parser of every `firm` command line.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import os
import textwrap
from pathlib import Path
from typing import Any, Collection, Mapping

from firm.config import ConfigError, coerce
from firm.errors import FirmError


def field_docs(cls: type) -> dict[str, str]:
    """Docstrings of a dataclass's fields (the string literal under each field), for --help and
    the docs. Works for any config dataclass (FirmConfig, FitConfig, SyntheticConfig, ...)."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs: dict[str, str] = {}
    for node, nxt in zip(body, body[1:] + [None]):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            if isinstance(nxt, ast.Expr) and isinstance(getattr(nxt, "value", None), ast.Constant):
                docs[node.target.id] = " ".join(str(nxt.value.value).split())
    return docs


class UsageError(FirmError):
    """A command line argparse cannot read (an unknown flag, a missing value, a bad choice)."""


class DefaultOnceFormatter(argparse.HelpFormatter):
    """Help that shows each flag's default once: ``[default: X]`` appended where the help text
    does not state a default itself and there is one to show (argparse's own
    ArgumentDefaultsHelpFormatter adds "(default: None)" even after a generated "[default: 3]")."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        nothing = default is None or default is False or default == argparse.SUPPRESS or default in ("", [], ())
        if "default" in text.lower() or nothing or not action.option_strings \
                or isinstance(action, argparse._StoreTrueAction):
            return text
        return f"{text} [default: {default_text(action.default)}]"


def default_text(value: Any) -> str:
    if isinstance(value, tuple):
        return ",".join(f"{v:g}" for v in value)
    return repr(value) if isinstance(value, str) else str(value)


class OneLineParser(argparse.ArgumentParser):
    """argparse that raises UsageError instead of printing the usage block and exiting, so a bad
    command line is one line and exit code 2 like every other input error. Its subparsers are of
    the same class (argparse's default parser_class is the parent's type), and each shows every
    default once (DefaultOnceFormatter)."""

    def __init__(self, *args: Any, **kwargs: Any):
        kwargs.setdefault("formatter_class", DefaultOnceFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):  # type: ignore[override]
        raise UsageError(f"{self.prog}: {message} (see {self.prog} --help)")


def check_output_folder(path: str | Path, flag: str = "--out") -> None:
    """Fail before the work, not after it, when an output folder cannot be made: it is a file,
    or the nearest existing folder above it is a file or not writable."""
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"{flag} {path} exists and is not a folder")
    ancestor = next(p for p in (folder, *folder.parents) if p.exists())
    if not ancestor.is_dir():
        raise ConfigError(f"{flag} {path}: cannot create a folder there ({ancestor} is a file)")
    if not os.access(ancestor, os.W_OK):
        raise ConfigError(f"{flag} {path}: cannot create a folder there ({ancestor} is not writable)")


def flag_name(field_name: str) -> str:
    return "--" + field_name.replace("_", "-")


def _default(f: dataclasses.Field) -> Any:
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return f.default


def _metavar(f: dataclasses.Field) -> str:
    kind = (f.type if isinstance(f.type, str) else f.type.__name__).replace(" ", "").removesuffix("|None")
    return {"tuple[float,...]": "FLOATS"}.get(kind, kind.upper())


def add_dataclass_flags(parser: argparse.ArgumentParser, cls: type, title: str,
                        skip: Collection[str] = (), default_notes: Mapping[str, str] | None = None) -> None:
    """One flag per field of ``cls`` (except ``skip``), in an argument group called ``title``.
    ``default_notes`` words a field's default where it is not simply the field's (``{shown}``
    stands for the field's default)."""
    docs = field_docs(cls)
    notes = default_notes or {}
    group = parser.add_argument_group(title)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        shown = default_text(_default(f))
        note = notes.get(f.name, "{shown}").format(shown=shown)
        group.add_argument(flag_name(f.name), dest=f.name, default=None, metavar=_metavar(f),
                           help=f"{docs.get(f.name, '')} [default: {note}]")


def dataclass_overrides(args: argparse.Namespace, cls: type, skip: Collection[str] = ()) -> dict[str, Any]:
    """The fields the user set on the command line, converted to their types."""
    return {f.name: coerce(f, getattr(args, f.name)) for f in dataclasses.fields(cls)
            if f.name not in skip and getattr(args, f.name, None) is not None}
