"""Read the shipped data (contexts, generation prompts, persona pairs, vignettes) and user files.

Every loader checks its input and raises UserError naming the file and line of the first bad record.
"""

from __future__ import annotations

import json
import math
import random
import re
from dataclasses import dataclass
from pathlib import Path

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


def parse_jsonl(lines, name: str, required: tuple[str, ...] = ()) -> list[dict]:
    """JSON objects, one per non-blank line, each with non-empty `required` fields; errors name `name:line`."""
    return [row for _, row in numbered_jsonl(lines, name, required)]


def numbered_jsonl(lines, name: str, required: tuple[str, ...] = ()) -> list[tuple[int, dict]]:
    """`parse_jsonl`'s objects with the line number of each, for a later check to name the line."""
    rows = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{name}:{i}: not valid JSON ({e.msg})") from e
        if not isinstance(row, dict):
            raise UserError(f"{name}:{i}: expected a JSON object, got {type(row).__name__}")
        missing = [k for k in required if not row.get(k)]
        if missing:
            raise UserError(f"{name}:{i}: missing field(s) {missing}; each line needs {list(required)}")
        wrong = [k for k in required if not isinstance(row[k], (str, int))]
        if wrong:
            raise UserError(f"{name}:{i}: field(s) {wrong} must be text")
        rows.append((i, row))
    if not rows:
        raise UserError(f"{name}: the file is empty; expected JSONL lines with fields {list(required)}")
    return rows


def read_jsonl(path: Path, required: tuple[str, ...] = ()) -> list[dict]:
    return [row for _, row in read_numbered(path, required)]


def read_numbered(path: Path, required: tuple[str, ...] = ()) -> list[tuple[int, dict]]:
    """`read_jsonl`'s objects with the line number of each."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    with path.open(encoding="utf-8") as f:
        return numbered_jsonl(f, str(path), required)


def texts(path: Path | None, default: str) -> list[str]:
    """The `text` fields of a JSONL file (default: data/<default>)."""
    return [r["text"] for r in read_jsonl(path or DATA / default, ("text",))]


def reference_answers(path: Path | None = None) -> list[tuple[str, str]]:
    """(prompt, answer) pairs of coherent human-written text (default data/reference_answers.jsonl)."""
    return [
        (r["prompt"], r["answer"]) for r in read_jsonl(path or DATA / "reference_answers.jsonl", ("prompt", "answer"))
    ]


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


def personas(extra: Path | None = None) -> dict[str, dict]:
    lib = _read_json(DATA / "personas.json")
    if extra is not None:
        lib.update(_read_json(extra))
    return lib


def _read_json(path: Path) -> dict:
    if not Path(path).is_file():
        raise UserError(f"{path}: no such file")
    try:
        obj = json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise UserError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from e
    if not isinstance(obj, dict) or not obj:
        raise UserError(f"{path}: expected a non-empty JSON object of persona pairs")
    return obj


def persona(name: str, pos: str | None = None, neg: str | None = None, extra: Path | None = None) -> Persona:
    """A persona pair by name from the library, optionally with its texts overridden."""
    lib = personas(extra)
    if name not in lib:
        raise UserError(f"unknown persona pair {name!r}; valid: {', '.join(sorted(lib))}")
    d = dict(lib[name])
    if (pos is None) != (neg is None):
        raise UserError("--persona-pos and --persona-neg must be given together")
    if pos is not None:
        d.update(pos=pos, neg=neg)
    for k in ("pos", "neg", "trait"):
        if not isinstance(d.get(k), str) or not d[k].strip():
            raise UserError(f"persona pair {name!r}: field {k!r} must be a non-empty string")
    if d["trait"] not in FOUNDATIONS:
        raise UserError(f"persona pair {name!r}: trait {d['trait']!r} is not one of {FOUNDATIONS}")
    if d["pos"].strip().lower() == d["neg"].strip().lower():
        raise UserError(f"persona pair {name!r}: pos and neg are identical ({d['pos']!r}); they must be opposites")
    sign = d.get("sign", -1)
    if sign not in (-1, 1) or isinstance(sign, bool):
        raise UserError(f"persona pair {name!r}: sign {sign!r} must be -1 (less blame on the trait) or 1 (more)")
    ladder = d.get("ladder", []) if pos is None else []  # a ladder written for other texts does not apply
    if not isinstance(ladder, list) or not all(isinstance(x, str) and x.strip() for x in ladder):
        raise UserError(f"persona pair {name!r}: ladder must be a list of system prompts (non-empty strings)")
    return Persona(name, d["pos"].strip(), d["neg"].strip(), d["trait"], int(sign), tuple(ladder))


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
    for i, r in read_numbered(path, ("id", "text")):
        if str(r["id"]) in seen:
            first = seen[str(r["id"])]
            raise UserError(f"{path}: records {first} and {i} share the id {r['id']!r}; ids must be unique")
        seen[str(r["id"])] = i
        label = r.get("foundation_coarse")
        if label is not None and label not in FOUNDATIONS:
            raise UserError(f"{path}: record {i} (id {r['id']!r}): unknown foundation {label!r}; valid: {FOUNDATIONS}")
        out.append(Vignette(str(r["id"]), str(r["text"]), label, human_ratings(r, f"{path}:{i}")))
    return (spec or "steer_heal/vignettes.jsonl"), out


HUMAN = {f: "human_" + f.replace(" ", "") for f in FOUNDATIONS}  # the tinymfv schema's rater columns


def _rating_error(x) -> str | None:
    """Why a rater share is unusable (None when it is a finite number >= 0)."""
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return f"{x!r} is not a number"
    return None if math.isfinite(x) and x >= 0 else f"{x} must be a finite number >= 0"


def human_ratings(r: dict, where: str) -> dict[str, float] | None:
    """The percent of human raters choosing each foundation, or None when the record has none of the seven
    columns. A vignette without ratings leaves them all out; a NaN or a partial set is refused rather than
    skipped, because one NaN turns human_agree (a mean over the rated vignettes) into null for the whole eval."""
    given = [k for k in HUMAN.values() if k in r]
    if not given:
        return None
    if len(given) < len(HUMAN):
        missing = [k for k in HUMAN.values() if k not in r]
        raise UserError(f"{where}: has {given[0]} but not {missing}; give all seven human_* ratings or none")
    for k in HUMAN.values():
        if err := _rating_error(r[k]):
            raise UserError(f"{where}: field {k}: {err} (a percent of raters; leave all seven out if unrated)")
    if not sum(r[k] for k in HUMAN.values()) > 0:
        raise UserError(f"{where}: the seven human_* ratings are all 0; leave them out if the vignette is unrated")
    return {f: float(r[k]) for f, k in HUMAN.items()}


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
