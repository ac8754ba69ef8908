"""The one context object: a loaded model (as a `Student`) and the run's data, built from a config.
The run and every diagnostic script use it.

    s = Session.from_argv(rest)          # rest = run flags (--preset, --model, --n-vignettes, ...)
    v = s.teacher()                      # teacher vector on the configured band
    ev = s.evaluate(vectors=v, c=2.0)    # ev.m: metrics, ev.rows: per-vignette rows, ev.arm: for stats
    comps = s.generate([Row(...), ...], seed=0, desc="probe", vectors=v)

Building one checks every input (every config value as the run does, persona, data files, model, layer band)
before anything is written.
"""

from __future__ import annotations

import dataclasses
import random
from contextlib import nullcontext
from dataclasses import dataclass
from functools import cached_property

import torch

from steer_heal import data, extract, filters, models, seeds, stats
from steer_heal.config import RunConfig, parse_args, validate
from steer_heal.errors import UserError
from steer_heal.evaluate import Scored, evaluate, ref_nll, reference_nll
from steer_heal.generate import Completion, Row, Sampling, generate
from steer_heal.hooks import steer
from steer_heal.student import Student, lora_targets
from steer_heal.tokens import answer_ids, chat_ids

N_SAMPLE_PROMPTS = 3  # greedy samples saved per round for a person to read


def fits_context(limit: int | None, longest_prompt: int, max_new_tokens: int) -> None:
    """A completion is sampled after its prompt: the longest generation prompt plus --max-new-tokens must fit
    the positions the model was built for (beyond them a learned position table has no entry, and a rotary
    model was never trained there), or the run could not sample its own data."""
    if limit is not None and longest_prompt + max_new_tokens > limit:
        raise UserError(
            f"--max-new-tokens {max_new_tokens}: the longest generation prompt ({longest_prompt} tokens) plus it is "
            f"more than the model's context length ({limit} positions); valid: --max-new-tokens <= "
            f"{max(0, limit - longest_prompt)} for these prompts"
        )


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
    references: list[tuple[str, str]]  # coherent human-written (prompt, answer) pairs, never trained on

    @classmethod
    def from_argv(cls, argv: list[str]) -> Session:
        return cls.from_config(parse_args(argv))

    @classmethod
    def from_config(cls, cfg: RunConfig) -> Session:
        validate(cfg)  # the one gate every config passes, the run's and every script's: no per-script copies
        e = cfg.extract
        persona = data.persona(e.persona, e.persona_pos, e.persona_neg, e.personas_file)
        ctx = data.texts(e.contexts_file, "contexts.jsonl")
        if len(ctx) < e.n_contexts:
            raise UserError(
                f"{e.contexts_file or 'data/contexts.jsonl'} has {len(ctx)} contexts; --n-contexts {e.n_contexts} "
                f"needs at least that many (pass --n-contexts {len(ctx)} or a longer file)"
            )
        random.Random(seeds.derive(cfg.seed, "contexts")).shuffle(ctx)
        prompts = data.texts(cfg.generate.prompts_file, "dilemmas.jsonl")
        random.Random(seeds.derive(cfg.seed, "prompts")).shuffle(prompts)
        src, vigs = data.vignettes(cfg.eval.eval_vignettes)
        model, tok = models.load(
            cfg.model, cfg.dtype, cfg.device, cfg.trust_remote_code, cfg.device_map, cfg.tokenizer, cfg.prompt_format,
            seeds.derive(cfg.seed, "global"),
        )  # fmt: skip
        layers = models.band(len(models.decoder_layers(model)), e.steer_layers, "--steer-layers")
        lora_targets(model, cfg.heal.lora_layers, cfg.heal.lora_targets)  # fails now, not at round 0's heal
        prompt_ids = [chat_ids(tok, p) for p in prompts]
        fits_context(models.context_length(model), max(map(len, prompt_ids)), cfg.generate.max_new_tokens)
        return cls(
            cfg=cfg,
            student=Student(model),
            tok=tok,
            persona=persona,
            contexts=ctx[: e.n_contexts],
            prompts=prompts,
            prompt_ids=prompt_ids,
            vig_source=src,
            vigs=data.balanced(vigs, cfg.eval.n_vignettes),
            layers=layers,
            references=data.reference_answers(cfg.filter.reference_file)[: cfg.eval.n_references],
        )

    @property
    def model(self):
        return self.student.model

    @property
    def sampling(self) -> Sampling:
        """The run's generation settings (length, temperature, top-p)."""
        g = self.cfg.generate
        return Sampling(g.max_new_tokens, g.temperature, g.top_p)

    @cached_property
    def neutral_ids(self) -> list[list[int]]:
        """The extraction contexts under the default (neutral) system prompt, tokenised once per session:
        the student vector, the collapse signals and the amplification gauge all read them."""
        return [chat_ids(self.tok, x) for x in self.contexts]

    @property
    def bootstrap_seed(self) -> int:
        """The seed of every vignette resample of the run (its intervals, the null's range, the frontier's)."""
        return seeds.derive(self.cfg.seed, "bootstrap")

    def resamples(self):
        """The bootstrap resamples of the session's vignettes [n_boot, n] that every interval of a run shares
        (the same draws for every arm, so the arms are paired)."""
        return stats.resamples(len(self.vigs), self.cfg.eval.n_boot, self.bootstrap_seed)

    def as_model(self, which: str):
        """Context: the original weights for `base`, the current student for anything else."""
        return self.student.base() if which == "base" else nullcontext()

    # ---------------------------------------------------------------- what stages ask of the model

    def teacher(self, persona: data.Persona | None = None) -> dict[int, torch.Tensor]:
        e = self.cfg.extract
        return extract.teacher_vector(
            self.model, self.tok, persona or self.persona, self.contexts, self.layers, e.extract_batch_size, e.normalize
        )

    def evaluate(
        self, vectors=None, c: float = 0.0, system: str | None = None, desc: str = "eval",
        vigs: list[data.Vignette] | None = None, references: bool = True, prior: bool = True,
    ) -> Scored:  # fmt: skip
        """Vignette metrics and per-vignette rows (on `vigs`, default the run's), and the reference answers' NLL
        per token (ref_nll; skipped without `references`), steered by c * vectors when both are given and under
        `system` as the system prompt when given; calibrated too unless `prior` is False."""
        e = self.cfg.eval
        with steer(self.model, vectors, c) if vectors is not None and c != 0 else nullcontext():
            m, rows = evaluate(
                self.model,
                self.tok,
                vigs or self.vigs,
                e.eval_batch_size,
                e.eval_think_tokens,
                desc,
                system=system,
                prior=prior,
            )
            if not references:
                return Scored(m, rows)
            items = reference_nll(self.model, self.reference_pairs(system), self.tok.pad_token_id, e.eval_batch_size)
        return Scored(m | {"ref_nll": ref_nll(items), "ref_items": items}, rows)

    def generate(
        self, rows: list[Row], seed: int, desc: str, vectors=None, sampling: Sampling | None = None,
        batch_size: int | None = None,
    ) -> list[Completion]:  # fmt: skip
        """Completions of `rows`, by default at the run's sampling settings and --gen-batch-size."""
        return generate(
            self.model, self.tok, rows, vectors, sampling=sampling or self.sampling,
            batch_size=batch_size or self.cfg.generate.gen_batch_size, seed=seed, desc=desc,
            decode=self.cfg.generate.decode,
        )  # fmt: skip

    def prompt_rows(self, indices, alphas=(0.0,), kappa: float = 1.0, c_star: float = 1.0) -> list[Row]:
        """Generation prompt i at each strength alpha, prompt-major; applied coefficient alpha x kappa x c*."""
        return [Row(i, self.prompts[i], self.prompt_ids[i], a, a * kappa * c_star) for i in indices for a in alphas]

    def samples(self, vectors, c: float) -> list[dict]:
        """Greedy completions of the first few generation prompts (steered at c when vectors are given)."""
        rows = self.prompt_rows(range(min(N_SAMPLE_PROMPTS, len(self.prompts))), (c,))
        comps = self.generate(rows, seeds.derive(self.cfg.seed, "samples"), "samples", vectors, self.sampling.greedy())
        return [{"prompt": x.prompt, "text": x.text} for x in comps]

    def complete(self, vectors, cs: list[float], prompt: str, greedy: bool = True, max_new_tokens: int | None = None):
        """One completion of `prompt` per strength in `cs`, all in one mixed-strength batch."""
        ids = chat_ids(self.tok, prompt)
        rows = [Row(0, prompt, ids, c, c) for c in cs]
        n = max_new_tokens or self.sampling.max_new_tokens
        sampling = dataclasses.replace(self.sampling, max_new_tokens=n, do_sample=not greedy)
        return self.generate(
            rows, seeds.derive(self.cfg.seed, "complete"), "complete", vectors, sampling, batch_size=len(rows)
        )

    def base_tail_ppl(self, pairs: list[tuple[list[int], list[int]]]) -> list[float | None]:
        """Tail perplexity of (prompt ids, completion ids) under the ORIGINAL model; None for empty completions."""
        nonempty = [p for p in pairs if p[1]]
        f = self.cfg.filter
        with self.student.base():
            vals = iter(
                filters.tail_ppl(
                    self.model, nonempty, f.tail_frac, self.tok.pad_token_id, self.cfg.generate.gen_batch_size
                )
            )
        return [next(vals) if p[1] else None for p in pairs]

    def threshold_ppls(self) -> list[float]:
        """Tail-ppl of the base model's own unsteered samples on the first generation prompts (>= 8)."""
        k = min(len(self.prompts), max(self.cfg.generate.n_prompts, 8))
        with self.student.base():
            comps = self.generate(self.prompt_rows(range(k)), seeds.derive(self.cfg.seed, "calibrate"), "calibrate")
        return [p for p in self.base_tail_ppl([(c.prompt_ids, c.ids) for c in comps]) if p is not None]

    def reference_pairs(self, system: str | None = None) -> list[tuple[list[int], list[int]]]:
        """The reference answers as (prompt ids, answer ids): coherent human text, never trained on."""
        return [(chat_ids(self.tok, p, system), answer_ids(self.tok, a)) for p, a in self.references]
