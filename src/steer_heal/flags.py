"""The run's flags: what each field accepts (`Range`), its flag name, and the command line checked against
them before tyro reads it, so that every mistake ends in one `error:` line naming the flag, the value and
what is valid (tyro's own messages are boxes of many lines).

    argv = checked(argv, default)              # canonical flags (--fast_dev_run -> --fast-dev-run) or UserError
    cfg = quiet_cli(cls, default, argv, doc)   # tyro.cli; a refusal it still finds becomes one UserError line

The table of flags is derived from the config's fields (`leaves`), so it cannot drift from the config: a
field's type gives how many values its flag takes and what each must be.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import io
import math
import re
import typing
from dataclasses import dataclass
from typing import Annotated, Literal

import tyro

from steer_heal.errors import UserError


@dataclass(frozen=True)
class Range:
    """A field's valid values: lo <(=) x <(=) hi (open ends are strict). Tuples are checked per item."""

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False
    min_len: int = 0

    def ok(self, x: float) -> bool:
        if not math.isfinite(x):
            return False
        if self.lo is not None and not (x > self.lo if self.lo_open else x >= self.lo):
            return False
        return self.hi is None or (x < self.hi if self.hi_open else x <= self.hi)

    def describe(self, kind: str) -> str:
        """'an integer >= 1', 'a finite number > 0 and <= 1', ... (`kind` names the value's type)."""
        num = lambda x: str(int(x)) if float(x).is_integer() else f"{x:g}"  # noqa: E731
        lo = None if self.lo is None else f"{'>' if self.lo_open else '>='} {num(self.lo)}"
        hi = None if self.hi is None else f"{'<' if self.hi_open else '<='} {num(self.hi)}"
        return " ".join([kind, " and ".join(x for x in (lo, hi) if x)]).strip()


def flag(name: str) -> str:
    """The command-line flag of a config field (flags are flat: the field name with dashes)."""
    return "--" + name.replace("_", "-")


def range_of(hint) -> tuple[Range | None, type | None]:
    """The Range in a field's type (inside Optional / Annotated) and the annotated base type."""
    if typing.get_origin(hint) is typing.Union or type(hint).__name__ == "UnionType":
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return range_of(args[0]) if len(args) == 1 else (None, None)
    if typing.get_origin(hint) is Annotated:
        base, *meta = typing.get_args(hint)
        return next((m for m in meta if isinstance(m, Range)), None), base
    return None, hint


def leaves(cfg) -> list[tuple[str, str, object, object]]:
    """(section, field name, value, type hint) for every leaf field of a (nested) config."""
    out = []
    hints = typing.get_type_hints(type(cfg), include_extras=True)
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        if dataclasses.is_dataclass(v):
            out += [(f.name, n, x, h) for _, n, x, h in leaves(v)]
        else:
            out.append(("", f.name, v, hints[f.name]))
    return out


# ---------------------------------------------------------------- what one flag takes


@dataclass(frozen=True)
class Flag:
    """One flag's grammar: how many values (0, 1, 2, or None = any number) and what each value must be."""

    name: str  # the field name
    nargs: int | None
    kind: type  # bool, int, float or str (str: any text, a path)
    choices: tuple[str, ...] = ()  # a Literal's values
    optional: bool = False  # the word None is accepted
    rng: Range | None = None

    def valid(self) -> str:
        """What a value may be, for the message: 'an integer >= 1', 'one of nll, kl_rev, kl_fwd', ..."""
        if self.choices:
            what = "one of " + ", ".join(self.choices)
        elif self.kind in (int, float):
            kind = "an integer" if self.kind is int else "a finite number"
            what = self.rng.describe(kind) if self.rng else kind
        else:
            what = "text"
        return what + (", or None" if self.optional else "")

    def value_error(self, text: str) -> str | None:
        """Why `text` is not a value of this flag (None when it is). Ranges are checked later (config.validate)."""
        if self.optional and text == "None":
            return None
        if self.choices:
            return None if text in self.choices else f"{text!r} is not a valid choice"
        try:
            {int: int, float: float}.get(self.kind, str)(text)
        except ValueError:
            return f"{text!r} is not {'an integer' if self.kind is int else 'a number'}"
        return None


def _unwrap(hint) -> tuple[object, bool]:
    """(the type inside Optional / Annotated, whether None is allowed)."""
    optional = False
    if typing.get_origin(hint) is typing.Union or type(hint).__name__ == "UnionType":
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        optional, hint = len(args) < len(typing.get_args(hint)), args[0]
    if typing.get_origin(hint) is Annotated:
        hint = typing.get_args(hint)[0]
    return hint, optional


def grammar(name: str, hint) -> Flag:
    """The Flag of a config field, read from its type hint."""
    rng, _ = range_of(hint)
    base, optional = _unwrap(hint)
    nargs: int | None = 1
    if typing.get_origin(base) is tuple:
        args = typing.get_args(base)
        nargs, base = (None, args[0]) if len(args) == 2 and args[1] is Ellipsis else (len(args), args[0])
    if typing.get_origin(base) is Literal:
        return Flag(name, nargs, str, tuple(map(str, typing.get_args(base))), optional, rng)
    if base is bool:
        return Flag(name, 0, bool)
    kind = base if base in (int, float) else str
    return Flag(name, nargs, kind, (), optional, rng)


def table(default) -> dict[str, Flag]:
    """Every flag of a config, by its canonical spelling; a bool field also answers to --no-<name>."""
    out = {}
    for _, name, _, hint in leaves(default):
        g = grammar(name, hint)
        out[flag(name)] = g
        if g.kind is bool:
            out["--no-" + flag(name)[2:]] = g
    return out


# ---------------------------------------------------------------- the command line, checked


def _is_value(tok: str) -> bool:
    """A token a flag can take as its value: anything but a flag ('-1.5' is a number, '-x' a flag)."""
    if not tok.startswith("-"):
        return True
    try:
        float(tok)
        return True
    except ValueError:
        return False


def undecodable(text: str) -> bool:
    """Whether text holds bytes that were not UTF-8 (Python keeps them as lone surrogates, which no UTF-8
    file, log or JSON record can hold)."""
    return any("\ud800" <= c <= "\udfff" for c in text)


def canonical(tok: str) -> str:
    """--fast_dev_run -> --fast-dev-run (tyro takes both spellings; we read flags in one)."""
    if not tok.startswith("--"):
        return tok
    name, eq, value = tok.partition("=")
    return name.replace("_", "-") + eq + value


def _unknown(tok: str, flags: dict[str, Flag]) -> str:
    near = difflib.get_close_matches(tok.split("=")[0], list(flags), n=1)
    hint = f"; did you mean {near[0]}?" if near else "; see --help for the flags"
    return f"unknown flag {tok!r}{hint}"


def _take(f: Flag, opt: str, inline: str | None, rest: list[str]) -> tuple[list[str], int]:
    """The values given to one flag and how many tokens of `rest` they used; a UserError if they are not
    what the flag takes (too few, or a flag where a value should be)."""
    if f.nargs == 0:
        if inline is not None:
            on = flag(f.name)
            raise UserError(f"{opt} takes no value (got {inline!r}); write {on} or --no-{on[2:]}")
        return [], 0
    values = [] if inline is None else [inline]
    used = 0
    while (f.nargs is None or len(values) < f.nargs) and used < len(rest) and _is_value(rest[used]):
        values.append(rest[used])
        used += 1
    if f.nargs is not None and len(values) < f.nargs:
        nxt = rest[used] if used < len(rest) else None
        need = f"a value ({f.valid()})" if f.nargs == 1 else f"{f.nargs} values, got {len(values)} (each {f.valid()})"
        seen = f"; {nxt!r} is read as a flag (write {opt}={nxt} for a value that starts with '-')" if nxt else ""
        raise UserError(f"{opt} needs {need}{seen}")
    return values, used


def checked(argv: list[str], default) -> list[str]:
    """argv with every flag in its canonical spelling, after checking that each flag exists, gets as many
    values as it takes, and each value has its type; a UserError naming the flag, the value and what is
    valid otherwise. Ranges (and everything that depends on more than one flag) are config.validate's."""
    flags, out, i = table(default), [], 0
    while i < len(argv):
        tok = canonical(argv[i])
        opt, eq, inline = tok.partition("=")
        if tok in ("-h", "--help"):
            out.append(tok)
            i += 1
            continue
        if tok == "--" or not tok.startswith("-"):
            raise UserError(f"unexpected argument {tok!r}; every value follows its flag (see --help)")
        if opt not in flags:
            raise UserError(_unknown(tok, flags))
        f = flags[opt]
        values, used = _take(f, opt, inline if eq else None, argv[i + 1 :])
        for v in values:
            if undecodable(v):  # config.json, events.jsonl and the log are UTF-8: such a value cannot be recorded
                raise UserError(f"{opt} {v!r} has bytes that are not UTF-8; valid: {f.valid()} in UTF-8")
            if err := f.value_error(v):
                raise UserError(f"{opt} {err}; valid: {f.valid()}")
        out += [f"{opt}={inline}", *values[1:]] if eq else [opt, *values]  # '--run-name=-x' stays one token
        i += 1 + used
    return out


_BOX = re.compile(r"[\u2500-\u257f]")  # the box-drawing characters tyro frames its messages with


def _first_line(text: str) -> str:
    """The first line of a tyro message with its frame removed ('Error parsing --x: ...')."""
    lines = [_BOX.sub("", x).strip() for x in text.splitlines()]
    body = [x for x in lines if x and not x.startswith(("Value error", "For full helptext", "Argument helptext"))]
    return body[0] if body else "the command line was not accepted"


def quiet_cli(cls, default, argv: list[str], description: str):
    """tyro.cli on a checked argv; should tyro still refuse it, its boxed message becomes one UserError line.
    --help prints as tyro prints it."""
    if "-h" in argv or "--help" in argv:
        return tyro.cli(cls, default=default, args=argv, description=description)
    said = io.StringIO()
    try:
        with contextlib.redirect_stderr(said), contextlib.redirect_stdout(said):
            return tyro.cli(cls, default=default, args=argv, description=description)
    except SystemExit as e:
        raise UserError(f"{_first_line(said.getvalue())} (see --help)") from e
