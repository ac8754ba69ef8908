"""What the diagnostic scripts share with the run: a loaded model + data, built from the same config.

s = Session.from_argv(rest)          # rest = run flags (--preset, --model, --n-vignettes, ...)
v = s.teacher()                      # teacher vector on the configured band
m, rows = s.evaluate(vectors=v, c=2.0)
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from steer_heal import data, extract, models
from steer_heal import filter as filt
from steer_heal.bake import Student
from steer_heal.config import RunConfig, parse_args
from steer_heal.evaluate import evaluate
from steer_heal.generate import generate
from steer_heal.hooks import steer
from steer_heal.tokens import chat_ids


@dataclass
class Session:
    cfg: RunConfig
    student: Student
    tok: object
    persona: data.Persona
    contexts: list[str]
    prompts: list[str]
    prompt_ids: list[list[int]]  # the generation prompts, tokenised once
    vig_source: str
    vigs: list[data.Vignette]
    layers: list[int]

    @classmethod
    def from_argv(cls, argv: list[str]) -> Session:
        return cls.from_config(parse_args(argv))

    @classmethod
    def from_config(cls, cfg: RunConfig) -> Session:
        e = cfg.extract
        persona = data.persona(e.persona, e.persona_pos, e.persona_neg, e.personas_file)
        ctx = data.texts(e.contexts_file, "contexts.jsonl")
        random.Random(cfg.seed).shuffle(ctx)
        prompts = data.texts(cfg.generate.prompts_file, "dilemmas.jsonl")
        random.Random(cfg.seed + 1).shuffle(prompts)
        src, vigs = data.vignettes(cfg.eval.eval_vignettes)
        random.seed(cfg.seed)
        torch.manual_seed(cfg.seed)
        model, tok = models.load(cfg.model, cfg.dtype, cfg.device, cfg.trust_remote_code)
        layers = models.band(len(models.decoder_layers(model)), e.steer_layers, "--steer-layers")
        return cls(
            cfg,
            Student(model),
            tok,
            persona,
            ctx[: e.n_contexts],
            prompts,
            [chat_ids(tok, p) for p in prompts],
            src,
            data.balanced(vigs, cfg.eval.n_vignettes),
            layers,
        )

    @property
    def model(self):
        return self.student.model

    def teacher(self, persona: data.Persona | None = None) -> dict[int, torch.Tensor]:
        e = self.cfg.extract
        return extract.teacher_vector(
            self.model, self.tok, persona or self.persona, self.contexts, self.layers, e.extract_batch_size, e.normalize
        )

    def evaluate(self, vectors=None, c: float = 0.0, system: str | None = None, desc: str = "eval"):
        e = self.cfg.eval
        if vectors is None or c == 0:
            return evaluate(
                self.model, self.tok, self.vigs, e.eval_batch_size, e.eval_think_tokens, desc, system=system
            )
        with steer(self.model, vectors, c):
            return evaluate(
                self.model, self.tok, self.vigs, e.eval_batch_size, e.eval_think_tokens, desc, system=system
            )

    def base_tail_ppl(self, pairs: list[tuple[list[int], list[int]]]) -> list[float | None]:
        """Tail perplexity of (prompt ids, completion ids) under the ORIGINAL model; None for empty completions."""
        nonempty = [p for p in pairs if p[1]]
        with self.student.base():
            vals = iter(
                filt.tail_ppl(
                    self.model,
                    nonempty,
                    self.cfg.filter.tail_frac,
                    self.tok.pad_token_id,
                    self.cfg.generate.gen_batch_size,
                )
            )
        return [next(vals) if p[1] else None for p in pairs]

    def calibration_ppls(self) -> list[float]:
        """Tail-ppl of the base model's own unsteered samples on the first generation prompts (>= 8)."""
        g = self.cfg.generate
        k = min(len(self.prompts), max(g.n_prompts, 8))
        rows = [(i, self.prompts[i], self.prompt_ids[i], 0.0, 0.0) for i in range(k)]
        with self.student.base():
            comps = self.sample(rows, self.cfg.seed, "calibrate")
        return [p for p in self.base_tail_ppl([(c.prompt_ids, c.ids) for c in comps]) if p is not None]

    def sample(self, rows, seed: int, desc: str, vectors=None):
        """Sampled completions of `rows` at the run's generation settings (length, temperature, top-p, batch)."""
        g = self.cfg.generate
        return generate(
            self.model, self.tok, rows, vectors, g.max_new_tokens, g.temperature, g.top_p, g.gen_batch_size, seed,
            desc=desc,
        )  # fmt: skip

    def thresholds(self, ppl_max: float) -> filt.Thresholds:
        f = self.cfg.filter
        return filt.Thresholds(
            ppl_max, f.rep_max, f.compress_min, f.distinct_min, f.top_word_max, f.narration, f.refusal
        )

    def complete(self, vectors, cs: list[float], prompt: str, greedy: bool = True, max_new_tokens: int | None = None):
        """One completion of `prompt` per strength in `cs`, all in one mixed-strength batch."""
        g = self.cfg.generate
        ids = chat_ids(self.tok, prompt)
        rows = [(0, prompt, ids, c, c) for c in cs]
        return generate(
            self.model,
            self.tok,
            rows,
            vectors,
            max_new_tokens or g.max_new_tokens,
            g.temperature,
            g.top_p,
            len(rows),
            self.cfg.seed,
            do_sample=not greedy,
            desc="complete",
        )
