# steer_heal verbs. `uv run just <recipe>` works without a global `just` (it is a dev dependency).

default:
    @just --list

# Unit tests + end-to-end fast runs (the README's test command).
test *ARGS:
    uv run pytest {{ARGS}}

# Lint, then tests.
check:
    uv run ruff check src scripts tests
    uv run pytest

# Every stage on a tiny random model, seconds.
fast *ARGS:
    uv run python -m steer_heal.run --fast-dev-run {{ARGS}}

# The default research run on the embedded SmolLM2-135M-Instruct (CPU, offline).
run *ARGS:
    HF_HUB_OFFLINE=1 uv run python -m steer_heal.run {{ARGS}}

# Gate 1: does the vector move the trait while the model stays coherent?
csweep *ARGS:
    uv run python scripts/diag_csweep.py {{ARGS}}

# H: a KL barrier to the base model keeps more coherence per nat of trait than plain SFT (nll);
# kl_rev (mode-seeking) should suppress loops better than kl_fwd. 3 seeds per arm.
sweep-reg PRESET="smol" ROUNDS="3":
    for reg in nll kl_rev kl_fwd; do for s in 0 1 2; do \
      uv run python -m steer_heal.run --preset {{PRESET}} --reg $reg --seed $s --n-rounds {{ROUNDS}}; done; done
    uv run python scripts/results.py

# H: barrier_ref=base (cumulative) holds coherence flat over rounds; prev (trust region) lets drift compound.
sweep-ref PRESET="smol" ROUNDS="4":
    for ref in base prev; do for s in 0 1 2; do \
      uv run python -m steer_heal.run --preset {{PRESET}} --reg kl_rev --barrier-ref $ref --seed $s --n-rounds {{ROUNDS}}; done; done
    uv run python scripts/results.py

# Per-stage paired table of a finished run: base, steered at several c, each round's healed student.
stages RUN *ARGS:
    uv run python scripts/diag_stages.py {{RUN}} {{ARGS}}

# Q7: does baking beat prompting, and is the shift specific to the vector (random vector, same norm)?
baseline RUN *ARGS:
    uv run python scripts/diag_prompt_baseline.py {{RUN}} {{ARGS}}

# Collapse early warning: did PR / entropy / amplification move before coherence fell?
collapse RUN *ARGS:
    uv run python scripts/diag_collapse.py {{RUN}} {{ARGS}}

# The headline: healed students against steering at a lower dose and against a prompt ladder, at matched
# coherence, with 95% intervals and the random-vector null (writes RUN/frontier.json and frontier.png).
frontier RUN *ARGS:
    HF_HUB_OFFLINE=1 uv run python scripts/diag_frontier.py {{RUN}} {{ARGS}}

# Seeds: every headline figure per arm with n, mean +- sd and a 95% t-interval (flags arms with n < 3).
results *ARGS:
    uv run python scripts/results.py {{ARGS}}
