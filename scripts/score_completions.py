"""Score completions with the pipeline's own filter: same scorers, same thresholds, same model.

    uv run python scripts/score_completions.py in.jsonl > scored.jsonl
    cat in.jsonl | uv run python scripts/score_completions.py - [--ppl-max 30] [run flags: --preset, --model, ...]

Input lines: {"prompt": <user message>, "completion": <text>} (data.Completion: optionally a `label`,
coherent or degenerate, and a `kind`; other fields are passed through). Output: each line with its scores
(tail_ppl under the original model, rep, compress, distinct2, top_word, english, narration, refusal),
`keep` and `reason` ('' when kept). As in a run, the perplexity threshold is calibrated against what
coherent text scores under the model (its own unsteered samples on the generation prompts and the
shipped reference answers) unless --ppl-max is given. Completions are re-tokenised from text here (a
run keeps the sampled ids instead). data/filter_labelled.jsonl is a labelled set to try it on.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from steer_heal import filters, stages
from steer_heal.cli import ArgumentParser, cli
from steer_heal.data import Completion, parse_jsonl, read_jsonl
from steer_heal.session import Session
from steer_heal.tokens import chat_ids


def main(argv: list[str]) -> int:
    ap = ArgumentParser(description=__doc__)
    ap.add_argument("input", help="JSONL file, or - for stdin")
    args, rest = ap.parse_known_args(argv)
    if args.input == "-":  # bytes, so that a non-UTF-8 line is named like one in a file
        rows = parse_jsonl(sys.stdin.buffer.read(), "stdin", Completion)
    else:
        rows = read_jsonl(Path(args.input), Completion)
    s = Session.from_argv(rest)
    ppl_max = s.cfg.filter.ppl_max
    if ppl_max is None:
        cal = stages.filter_threshold(s)
        ppl_max = cal["ppl_max"]
        q, mult = cal["ppl_quantile"], cal["ppl_mult"]
        print(f"calibrated ppl_max = {ppl_max:.2f} ({mult:g} x q{q:g} of coherent text's tail-ppl)", file=sys.stderr)
    th = filters.Thresholds.of(s.cfg.filter, ppl_max)
    pairs = [(chat_ids(s.tok, r.prompt), s.tok(r.completion, add_special_tokens=False).input_ids) for r in rows]
    persona = (s.persona.pos, s.persona.neg)
    for r, (_, ids), p in zip(rows, pairs, s.base_tail_ppl(pairs)):
        scores = filters.judge(r.completion, len(ids), p, persona, th)
        print(json.dumps({**r.model_dump(exclude_unset=True), **scores}, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    cli(main)
