"""Score completions with the pipeline's own filter: same scorers, same thresholds, same model.

    uv run python scripts/score_completions.py in.jsonl > scored.jsonl
    cat in.jsonl | uv run python scripts/score_completions.py - [--ppl-max 30] [run flags: --preset, --model, ...]

Input lines: {"prompt": <user message>, "completion": <text>}. Output: each line with its scores
(tail_ppl under the original model, rep, compress, distinct2, top_word, narration, refusal), `keep`
and `reason` ('' when kept). As in a run, the perplexity threshold is calibrated against the model's
own unsteered samples on the generation prompts unless --ppl-max is given. Completions are
re-tokenised from text here (a run keeps the sampled ids instead).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from steer_heal import filters, stages
from steer_heal.cli import cli
from steer_heal.data import read_jsonl
from steer_heal.errors import UserError
from steer_heal.session import Session
from steer_heal.tokens import chat_ids


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("input", help="JSONL file, or - for stdin")
    args, rest = ap.parse_known_args(argv)
    if args.input == "-":
        rows = [json.loads(x) for x in sys.stdin if x.strip()]
        for i, r in enumerate(rows, 1):
            if not isinstance(r, dict) or "prompt" not in r or "completion" not in r:
                raise UserError(f"stdin:{i}: each line needs 'prompt' and 'completion'")
    else:
        rows = read_jsonl(Path(args.input), ("prompt", "completion"))
    s = Session.from_argv(rest)
    ppl_max = s.cfg.filter.ppl_max
    if ppl_max is None:
        cal = stages.calibrate(s)
        ppl_max = cal["ppl_max"]
        print(f"calibrated ppl_max = {ppl_max:.2f} ({cal['ppl_mult']} x base median)", file=sys.stderr)
    th = s.thresholds(ppl_max)
    pairs = [(chat_ids(s.tok, r["prompt"]), s.tok(r["completion"], add_special_tokens=False).input_ids) for r in rows]
    persona = (s.persona.pos, s.persona.neg)
    for r, (_, ids), p in zip(rows, pairs, s.base_tail_ppl(pairs)):
        print(json.dumps({**r, **filters.judge(r["completion"], len(ids), p, persona, th)}, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    cli(main)
