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
