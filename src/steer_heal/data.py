"""Read the shipped data (contexts, generation prompts, persona pairs, vignettes, reference answers, filter
labels) and the user's files in their place, each against one declared schema.

Every data file has one pydantic model (below) that names its fields, their types (strict: 3 is not text,
true is not a number), that text is not blank, and the labels allowed; unknown fields are kept. One reader
decodes the file as UTF-8 and checks each record against its model; any failure is one UserError naming the
file and line: `contexts.jsonl:7: field text: 3 must be a valid string`.

    rows = read_jsonl(path, TextRow)          # JSONL: one object per line
    pairs = read_named(path, PersonaPair)     # a JSON object of named records (personas.json)
"""

from __future__ import annotations

import codecs
import json
import math
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, PlainValidator, Strict, ValidationError, model_validator

from steer_heal.errors import UserError

DATA = Path(__file__).resolve().parents[2] / "data"
FOUNDATIONS = ("Care", "Fairness", "Loyalty", "Authority", "Sanctity", "Liberty", "Social Norms")
# Short metric names: `auth_nats` = log of the mean probability that a vignette violates Authority.
SHORT = {
    "Care": "care",
    "Fairness": "fair",
    "Loyalty": "loyal",
    "Authority": "auth",
    "Sanctity": "sanct",
    "Liberty": "lib",
    "Social Norms": "social",
}
HUMAN = {f: "human_" + f.replace(" ", "") for f in FOUNDATIONS}  # the tinymfv schema's rater columns


# ---------------------------------------------------------------- the schemas: one per data file


def _text(s: str) -> str:
    if not s.strip():
        raise ValueError("must not be blank")
    if any("\ud800" <= c <= "\udfff" for c in s):  # a JSON \ud800 escape: no UTF-8 file or tokenizer takes it
        raise ValueError("holds a lone surrogate escape, which is not text")
    return s


def _id(x):
    if isinstance(x, bool) or not isinstance(x, (str, int)):
        raise ValueError("must be text or an integer")
    return _text(x) if isinstance(x, str) else x


def _sign(x: int) -> int:
    if x not in (-1, 1):
        raise ValueError("must be -1 (less blame on the trait) or 1 (more)")
    return x


def _rating(x: float) -> float:
    if not (math.isfinite(x) and x >= 0):
        raise ValueError("must be a finite number >= 0 (a percent of raters; leave all seven out if unrated)")
    return x


Text = Annotated[str, AfterValidator(_text)]
Foundation = Literal["Care", "Fairness", "Loyalty", "Authority", "Sanctity", "Liberty", "Social Norms"]
Rating = Annotated[float, AfterValidator(_rating)]


class Record(BaseModel):
    """One data record: strict types, unknown fields kept (a tinymfv file has more columns)."""

    # NaN and inf pass the type check; each numeric field's own check refuses them, in its own words
    model_config = ConfigDict(strict=True, extra="allow", allow_inf_nan=True, frozen=True)


class TextRow(Record):
    """contexts.jsonl (--contexts-file) and dilemmas.jsonl (--prompts-file): a user message."""

    text: Text


class ReferenceRow(Record):
    """reference_answers.jsonl (--reference-file): a neutral question and a coherent human-written answer."""

    prompt: Text
    answer: Text


class VignetteRow(Record):
    """vignettes.jsonl (--eval-vignettes): the tinymfv schema; all seven human_* ratings or none."""

    id: Annotated[str | int, PlainValidator(_id)]
    text: Text
    foundation_coarse: Foundation | None = None
    human_Care: Rating | None = None
    human_Fairness: Rating | None = None
    human_Loyalty: Rating | None = None
    human_Authority: Rating | None = None
    human_Sanctity: Rating | None = None
    human_Liberty: Rating | None = None
    human_SocialNorms: Rating | None = None

    @model_validator(mode="after")
    def _all_or_none(self):
        """A partial set, or seven zeros, is refused rather than skipped: one NaN or gap turned human_agree
        (a mean over the rated vignettes) into null for the whole eval. Unrated: leave all seven out."""
        given = [k for k in HUMAN.values() if getattr(self, k) is not None]
        if given and len(given) < len(HUMAN):
            missing = [k for k in HUMAN.values() if getattr(self, k) is None]
            raise ValueError(f"has {given[0]} but not {missing}; give all seven human_* ratings or none")
        if given and not sum(getattr(self, k) for k in given) > 0:
            raise ValueError("the seven human_* ratings are all 0; leave them out if the vignette is unrated")
        return self

    def human(self) -> dict[str, float] | None:
        rated = self.human_Care is not None
        return {f: float(getattr(self, k)) for f, k in HUMAN.items()} if rated else None


class PersonaPair(Record):
    """personas.json (--personas-file): {name: pair}; two opposite system-prompt personas and the trait moved."""

    pos: Text
    neg: Text
    trait: Foundation
    sign: Annotated[int, Strict(), AfterValidator(_sign)] = -1
    about: str | None = None
    ladder: list[Text] = []

    @model_validator(mode="after")
    def _opposites(self):
        if self.pos.strip().lower() == self.neg.strip().lower():
            raise ValueError(f"pos and neg are identical ({self.pos!r}); they must be opposites")
        return self


class Completion(Record):
    """scripts/score_completions.py input, and data/filter_labelled.jsonl: a prompt and a text to judge, with
    its label and kind when it is labelled."""

    prompt: Text
    completion: Text
    label: Literal["coherent", "degenerate"] | None = None
    kind: Text | None = None


class LadderRow(Record):
    """scripts/diag_frontier.py --ladder: one system prompt of the prompting arm."""

    system: Text


# ---------------------------------------------------------------- the one reader


def _short(x) -> str:
    text = repr(x)
    return text if len(text) <= 60 else text[:57] + "..."


def problem(e: ValidationError) -> str:
    """The first failure of a record, in one line: "field text: 3 must be a valid string"."""
    err = e.errors()[0]
    field = ".".join(str(x) for x in err["loc"] if not str(x).startswith("function-"))
    if err["type"] == "missing":
        return f"missing field {field!r}"  # the caller names the schema's required fields
    ours = err["type"] == "value_error"  # our own checks' words; pydantic's "Input should be ..." otherwise
    why = str(err["ctx"]["error"]) if ours else re.sub(r"^Input should be", "must be", err["msg"])
    if not field:  # a check across fields (a model validator): the message says it all
        return why
    return f"field {field}: {_short(err['input'])} {why}"


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict:
    keys = [k for k, _ in pairs]
    if dup := next((k for k in keys if keys.count(k) > 1), None):
        raise ValueError(f"the key {dup!r} appears twice")  # json would keep the last one silently
    return dict(pairs)


def _json(text: str, where: str):
    try:
        return json.loads(text, object_pairs_hook=_no_duplicates)
    except json.JSONDecodeError as e:
        raise UserError(f"{where}: not valid JSON ({e.msg})") from e
    except ValueError as e:
        raise UserError(f"{where}: {e}") from e
    except RecursionError as e:  # '[[[[...' nested deeper than the parser goes
        raise UserError(f"{where}: nested too deeply to be a record") from e


def _checked(obj, schema: type[Record] | None, where: str):
    """obj as a `schema` record (a plain dict without one); a UserError naming `where` otherwise."""
    if not isinstance(obj, dict):
        raise UserError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    if schema is None:
        return obj
    try:
        return schema.model_validate(obj)
    except ValidationError as e:
        said = problem(e)
        needs = f" (each record needs {required(schema)})" if said.startswith("missing field") else ""
        raise UserError(f"{where}: {said}{needs}") from e


def decoded(raw: bytes, name: str) -> str:
    """raw as UTF-8 text (a leading byte-order mark dropped); a UserError naming the line of a bad byte."""
    raw = raw.removeprefix(codecs.BOM_UTF8)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise UserError(f"{name}:{line}: byte 0x{raw[e.start]:02x} is not UTF-8; the file must be UTF-8 text") from e


def numbered_jsonl(source: bytes | str, name: str, schema: type[Record] | None = None) -> list[tuple[int, object]]:
    """(line number, record) for each non-blank line of JSONL bytes (decoded as UTF-8) or text; errors name
    `name:line`."""
    text = decoded(source, name) if isinstance(source, bytes) else source
    rows = [(i, _checked(_json(line, f"{name}:{i}"), schema, f"{name}:{i}"))
            for i, line in enumerate(text.splitlines(), 1) if line.strip()]  # fmt: skip
    if not rows:
        fields = f" with fields {required(schema)}" if schema else ""
        raise UserError(f"{name}: the file is empty; expected JSONL lines{fields}")
    return rows


def parse_jsonl(source: bytes | str, name: str, schema: type[Record] | None = None) -> list:
    """The records of JSONL bytes or text (stdin, say), checked against `schema`."""
    return [row for _, row in numbered_jsonl(source, name, schema)]


def required(schema: type[Record]) -> list[str]:
    return [k for k, f in schema.model_fields.items() if f.is_required()]


def _raw(path: Path) -> bytes:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    return path.read_bytes()


def read_numbered(path: Path, schema: type[Record] | None = None) -> list[tuple[int, object]]:
    """(line number, record) for each line of a JSONL file, checked against `schema`."""
    return numbered_jsonl(_raw(path), str(path), schema)


def read_jsonl(path: Path, schema: type[Record] | None = None) -> list:
    """The records of a JSONL file, checked against `schema` (plain dicts without one: our own artifacts)."""
    return [row for _, row in read_numbered(path, schema)]


def _line_of(text: str, key: str) -> int:
    """The line where a top-level key of a JSON object is written (1 when it cannot be found)."""
    at = re.search(re.escape(json.dumps(key)) + r"\s*:", text)
    return text.count("\n", 0, at.start()) + 1 if at else 1


def read_named(path: Path, schema: type[Record]) -> dict[str, Record]:
    """A JSON object of named records ({name: record}), each checked against `schema`; errors name the
    file, the line of the record and its name."""
    text = decoded(_raw(path), str(path))
    obj = _json(text, str(path))
    if not isinstance(obj, dict) or not obj:
        raise UserError(f"{path}: expected a non-empty JSON object of named records ({schema.__name__})")
    return {name: _checked(rec, schema, f"{path}:{_line_of(text, name)}: {name!r}") for name, rec in obj.items()}


def texts(path: Path | None, default: str) -> list[str]:
    """The `text` fields of a JSONL file (default: data/<default>)."""
    return [r.text for r in read_jsonl(path or DATA / default, TextRow)]


def reference_answers(path: Path | None = None) -> list[tuple[str, str]]:
    """(prompt, answer) pairs of coherent human-written text (default data/reference_answers.jsonl)."""
    return [(r.prompt, r.answer) for r in read_jsonl(path or DATA / "reference_answers.jsonl", ReferenceRow)]


# A prompt ladder for personas that ship none: the positive persona asked for with rising force.
LADDER_TEMPLATES = (
    "You are a helpful assistant who is, on balance, {pos}.",
    "You are {pos}.",
    "You are {pos}. Let this shape every judgement you make.",
    "You are, above all else, {pos}. Hold to this in every answer, even when other considerations pull the other way.",
)


@dataclass(frozen=True)
class Persona:
    name: str
    pos: str
    neg: str
    trait: str  # the foundation whose blame the persona is expected to move
    sign: int  # expected direction of the move: -1 = less blame, +1 = more
    ladder: tuple[str, ...] = ()  # system prompts asking for the persona with rising force (the prompting arm)

    def system(self, positive: bool) -> str:
        return f"You are {self.pos if positive else self.neg}."

    def prompt_ladder(self) -> tuple[str, ...]:
        return self.ladder or tuple(t.format(pos=self.pos) for t in LADDER_TEMPLATES)

    @property
    def trait_key(self) -> str:
        return f"{SHORT[self.trait]}_nats"


def personas(extra: Path | None = None) -> dict[str, PersonaPair]:
    """The shipped persona pairs, and those of --personas-file (same schema; a name in both is the file's)."""
    lib = read_named(DATA / "personas.json", PersonaPair)
    return lib | (read_named(extra, PersonaPair) if extra is not None else {})


def persona(name: str, pos: str | None = None, neg: str | None = None, extra: Path | None = None) -> Persona:
    """A persona pair by name from the library, optionally with its texts overridden (and checked by the same
    schema: blank or identical texts are refused)."""
    lib = personas(extra)
    if name not in lib:
        raise UserError(f"unknown persona pair {name!r}; valid: {', '.join(sorted(lib))}")
    if (pos is None) != (neg is None):
        raise UserError("--persona-pos and --persona-neg must be given together")
    d = lib[name]
    if pos is not None:  # a ladder written for other texts does not apply
        fields = d.model_dump() | {"pos": pos, "neg": neg, "ladder": []}
        d = _checked(fields, PersonaPair, f"persona pair {name!r} with --persona-pos/--persona-neg")
    return Persona(name, d.pos.strip(), d.neg.strip(), d.trait, d.sign, tuple(d.ladder))


@dataclass(frozen=True)
class Vignette:
    id: str
    text: str
    label: str | None
    human: dict[str, float] | None = None  # percent of human raters choosing each foundation


def vignettes(spec: str | None) -> tuple[str, list[Vignette]]:
    """(source name, vignettes) from a tinymfv-schema JSONL path, `hf:<repo>:<config>`, or the shipped set."""
    if spec is None:
        path = DATA / "vignettes.jsonl"
    elif spec.startswith("hf:"):
        path = _hub_vignettes(spec)
    else:
        path = Path(spec)
    out, seen = [], {}
    for i, r in read_numbered(path, VignetteRow):
        if str(r.id) in seen:
            raise UserError(f"{path}: records {seen[str(r.id)]} and {i} share the id {r.id!r}; ids must be unique")
        seen[str(r.id)] = i
        out.append(Vignette(str(r.id), r.text, r.foundation_coarse, r.human()))
    return (spec or "steer_heal/vignettes.jsonl"), out


def _hub_vignettes(spec: str) -> Path:
    """`hf:<org/name>:<config>[:<split>]` (split default `other_violate`, the third-person framing) through
    the `datasets` library (optional: `uv sync --extra hub`), cached as a tinymfv-schema JSONL."""
    parts = spec.split(":")
    if len(parts) not in (3, 4):
        raise UserError(
            f"--eval-vignettes {spec!r}: expected hf:<org/name>:<config>[:<split>], e.g. hf:wassname/tiny-mfv:classic"
        )
    repo, config = parts[1], parts[2]
    split = parts[3] if len(parts) == 4 else "other_violate"
    try:
        from datasets import load_dataset
    except ImportError as e:
        raise UserError(f"--eval-vignettes {spec!r} needs the `datasets` package: uv sync --extra hub") from e
    try:
        rows = [dict(r) for r in load_dataset(repo, config, split=split)]
    except (OSError, ValueError, KeyError) as e:  # datasets raises FileNotFoundError / ValueError subclasses
        raise UserError(f"--eval-vignettes {spec!r}: could not load from the hub ({type(e).__name__}: {e})") from e
    from steer_heal.models import cache_dir
    from steer_heal.rundir import atomic_write_jsonl

    name = re.sub(r"[^A-Za-z0-9._+-]", "_", f"{repo}_{config}_{split}")  # one safe path component
    path = cache_dir() / "vignettes" / f"{name}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_jsonl(path, rows)
    return path


def seeded_subset(vigs: list[Vignette], n: int | None, seed: int) -> list[Vignette]:
    """A fixed subset of n vignettes, balanced across labels as `balanced` is (each label's vignettes drawn in
    an order shuffled by `seed`), returned in the order of `vigs`; all of them when n is None or >= len."""
    if n is None or n >= len(vigs):
        return list(vigs)
    by: dict[str | None, list[Vignette]] = {}
    for v in vigs:
        by.setdefault(v.label, []).append(v)
    rng = random.Random(seed)
    for group in by.values():
        rng.shuffle(group)
    chosen = {v.id for v in balanced([v for group in by.values() for v in group], n)}
    return [v for v in vigs if v.id in chosen]


def balanced(vigs: list[Vignette], n: int | None) -> list[Vignette]:
    """The first n vignettes taken round-robin over labels, so any prefix is balanced across foundations."""
    if n is None or n >= len(vigs):
        return vigs
    by: dict[str | None, list[Vignette]] = {}
    for v in vigs:
        by.setdefault(v.label, []).append(v)
    out: list[Vignette] = []
    i = 0
    while len(out) < n:
        for group in by.values():
            if i < len(group) and len(out) < n:
                out.append(group[i])
        i += 1
    return out
