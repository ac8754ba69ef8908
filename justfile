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

# A sweep: a grid of runs (axes x seeds) through submitit, resumable, aggregated with intervals.
# Each sweep file states its hypothesis in a '# H:' comment. Laptop: `just sweep sweeps/reg.toml`;
# SLURM: `just sweep sweeps/reg.toml --launcher slurm --partition gpu` (one GPU per cell).
sweep SPEC *ARGS:
    HF_HUB_OFFLINE=1 uv run python -m steer_heal.sweep {{SPEC}} {{ARGS}}

# H: a KL barrier keeps more coherence per nat of trait than nll; kl_rev suppresses loops better than kl_fwd.
sweep-reg *ARGS:
    HF_HUB_OFFLINE=1 uv run python -m steer_heal.sweep sweeps/reg.toml {{ARGS}}

# H: barrier_ref=base (cumulative) holds coherence flat over rounds; prev (trust region) lets drift compound.
sweep-ref *ARGS:
    HF_HUB_OFFLINE=1 uv run python -m steer_heal.sweep sweeps/ref.toml {{ARGS}}

# H: distilling the steered teacher's distribution (kl_teacher) keeps more trait than SFT on its samples.
sweep-target *ARGS:
    HF_HUB_OFFLINE=1 uv run python -m steer_heal.sweep sweeps/target.toml {{ARGS}}

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
    HF_HUB_OFFLINE=1 uv run python -m steer_heal.frontier_run {{RUN}} {{ARGS}}

# `just seeds out/r_s0 out/r_s1 out/r_s2`: raw / calibrated / discriminative shift per arm, advantages per round.
# Several seeds' frontiers side by side, as mean and 95% t-interval across the runs.
seeds *RUNS:
    uv run python scripts/frontier_seeds.py {{RUNS}}

# Is the null's vignette subset enough? The run's random directions scored again on every vignette.
null RUN *ARGS:
    HF_HUB_OFFLINE=1 uv run python scripts/diag_null.py {{RUN}} {{ARGS}}

# Seeds: every headline figure per arm with n, mean +- sd and a 95% t-interval (flags arms with n < 3).
results *ARGS:
    uv run python scripts/results.py {{ARGS}}

# Build .gpu/ (git-ignored): wheels of the pure-Python packages a bare GPU machine lacks (Python 3.12; peft at
# our locked version, ahead of the machine's own whenever the check installs the wheels, i.e. tyro is missing) and
# SmolLM2's tokenizer files, which the random-weight models use. The device call carries .gpu.
gpu-wheels:
    rm -rf .gpu && mkdir -p .gpu/wheels
    uvx pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux2014_x86_64 -d .gpu/wheels tyro==1.0.17 loguru==0.7.3 docstring-parser==0.18.0 typeguard==4.6.0 peft==0.21.2 submitit==1.5.4 cloudpickle==3.1.3
    HF_HUB_OFFLINE=1 uv run python -c "from steer_heal import models; models.load('tiny-random')[1].save_pretrained('.gpu/tokenizer')"
    du -sh .gpu

# The GPU check: on a GPU machine `bash scripts/gpu_check.sh`; here the dry run `just gpu-check --device cpu --shrink`.
gpu-check *ARGS:
    uv run bash scripts/gpu_check.sh {{ARGS}}
