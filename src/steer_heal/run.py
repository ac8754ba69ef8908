"""steer_heal orchestrator: config -> run directory -> base stage -> rounds of stages -> report.

    uv run python -m steer_heal.run                       # default preset: embedded SmolLM2 on CPU
    uv run python -m steer_heal.run --fast-dev-run        # tiny random model, seconds
    uv run python -m steer_heal.run --reg kl_fwd --n-rounds 4 --seed 1
    uv run python -m steer_heal.run --resume out/<run>    # continue after the last completed round

Each round: extract -> generate + filter (walk-C) -> steered eval -> heal -> bake -> healed eval ->
collapse signals. Stages compute (stages.py, session.py); the Recorder writes each stage's artifacts
and event (recorder.py, events.jsonl). Exit codes: 0 done, 2 bad input (or out of memory after one
halving), 3 starved (too few coherent completions), 4 non-finite heal loss.
"""

from __future__ import annotations

import dataclasses
import re
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import torch
from loguru import logger

from steer_heal import extract, ledger, models, null, plan, report, seeds, stages
from steer_heal.cli import command, setup_logging
from steer_heal.clock import Clock
from steer_heal.config import RunConfig, parse_args, resume_config, to_dict, validate
from steer_heal.data import read_jsonl
from steer_heal.errors import NonFiniteLoss, OutOfMemory, Starved, UserError, exit_code
from steer_heal.evaluate import Scored
from steer_heal.flags import canonical
from steer_heal.recorder import Recorder
from steer_heal.records import COLLAPSE_KEYS, RoundRecord, base_instrument, eval_part, record_part, round_stats
from steer_heal.rundir import (
    RunDir,
    RunState,
    create_run_dir,
    discard_run_dir,
    git_commit,
    read_state,
    safe_name,
    usable_path,
    versions,
    writable_dir,
)
from steer_heal.session import Session
from steer_heal.stats import cal_key
from steer_heal.student import adapter_name

STOPS = (Starved, NonFiniteLoss, OutOfMemory)  # a round that raises one of these ends the run cleanly


# ---------------------------------------------------------------- the run directory


def planned_root(cfg: RunConfig) -> Path:
    """Where a new run will live: --out-dir resolved once (a symlink loop or an undecodable name is refused),
    writable, and the run name free. Checked before the model loads, so a bad --out-dir or --run-name costs
    nothing; and nothing is created yet (the run directory is made once every input has been read)."""
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    model_tag = re.sub(r"[^A-Za-z0-9._+-]", "_", Path(cfg.model).name.replace(".gguf", "")) or "model"
    name = safe_name(cfg.where.run_name or f"{stamp}_{model_tag}_{cfg.heal.reg}_s{cfg.seed}")
    writable_dir(Path(cfg.where.out_dir), "--out-dir")
    root = usable_path(Path(cfg.where.out_dir), "--out-dir") / name
    if root.exists():
        raise UserError(f"run directory {root} already exists; pass another --run-name or --resume {root}")
    return root


def resumed_out_dir(argv: list[str], given: Path, root: Path) -> Path:
    """A resumed run's --out-dir is the directory it actually lies in (its ledger goes there), whatever its
    config.json says and whatever the current directory; an --out-dir given that names another place is refused."""
    out = root.resolve().parent
    named = any(a == "--out-dir" or a.startswith("--out-dir=") for a in argv)
    if named and usable_path(Path(given), "--out-dir") != out:
        raise UserError(
            f"--out-dir {given}: the run being resumed lies in {out} (its ledger is {out / 'results.jsonl'}); "
            f"drop --out-dir or pass {out}"
        )
    return out


def open_records(s: Session, argv: list[str], root: Path, resumed: bool, state: RunState) -> Recorder:
    """A new run directory described by its config, or a resumed one with its adapters re-attached."""
    rd = RunDir(root)
    rec = Recorder(rd, s.persona.trait_key)
    if not resumed:
        meta = dict(config=to_dict(s.cfg), argv=argv, git_commit=git_commit(), versions=versions(),
                    seed_scheme=seeds.SCHEME, trait_key=s.persona.trait_key, trait_sign=s.persona.sign,
                    coh_floor=s.cfg.coh_floor)  # fmt: skip
        rec.config(meta)
    else:
        if n := rd.remove_temps():
            logger.info(f"removed {n} half-written file(s) a killed run left behind")
        for r in state.done:
            s.student.load_adapter(r, rd.adapter(r))
        last = state.last_round or {}
        if state.done and not (last.get("healed_coh") or 0) >= s.cfg.coh_floor:
            logger.warning(
                f"round {state.done[-1]} ended below the coherence floor ({last.get('healed_coh')} < "
                f"{s.cfg.coh_floor}); continuing from that student, as asked"
            )
        rec.emit("resume", state.start, completed=state.done)
        logger.info(f"resuming after round {state.start - 1}; {len(state.done)} adapters re-attached")
    return rec


# ---------------------------------------------------------------- stages


@dataclass
class Base:
    eval: Scored  # the base model's eval: metrics and per-vignette rows (every delta is paired against it)
    ppl_max: float  # the filter's calibrated perplexity threshold
    acts: dict[int, torch.Tensor]  # its neutral-prompt activations (student vector, collapse signals)
    null: dict | None  # the random-direction null, measured once in round 0


def base_stage(s: Session, rec: Recorder, state: RunState) -> Base:
    """Base eval, filter calibration and base collapse signals, each only once per run (kept on resume)."""
    clock = Clock()
    if state.base_eval is None:
        with clock("eval"), s.as_model("base"):
            base = s.evaluate(desc="eval base")
        rec.eval(-1, "base", base, 0.0, s.vig_source, clock["eval"])
    else:
        base = Scored(state.base_eval, read_jsonl(rec.rd.eval_rows(-1, "base")))
        if cal_key(s.persona.trait_key) not in base.m:
            logger.warning(
                "this run's base eval predates the calibrated eval (events schema < 1.3): its rounds get raw "
                "shifts only, and without a discriminative shift its verdict cannot be PASS"
            )
    announce_instrument(s, base)
    cal = state.calibration
    if cal is None:
        with clock("calibrate"):
            cal = stages.filter_threshold(s)
        rec.filter_threshold(cal, clock["calibrate"])
    acts = stages.neutral_acts(s, "base")
    if state.base_collapse is None:
        with clock("collapse"):
            sig = stages.collapse_signals(s, "base", acts)
        rec.collapse(-1, "base", sig, clock["collapse"])
    return Base(eval=base, ppl_max=cal["ppl_max"], acts=acts, null=state.null)


def announce_instrument(s: Session, base: Scored) -> None:
    """Say before round 0 whether the eval can see a judgement of the target on this model at all."""
    idx = s.resamples()
    inst = base_instrument(base.arm, s.persona.trait, idx)
    if inst is None:
        logger.info("instrument: no calibrated, labelled base eval; no discriminative verdict is possible")
        return
    line, possible = inst
    logger.info(f"instrument: {line}")
    if not possible:
        logger.warning(
            f"no discriminative verdict is possible on this model: its base separation's interval includes 0, so it "
            f"holds no judgement of {s.persona.trait} for the loop to move (the verdict rule is unchanged)"
        )


def evaluated(s: Session, rec: Recorder, clock: Clock, r: int, which: str, v=None, c: float = 0.0):
    """The eval of the current student (steered by c * v when given) and its greedy samples."""
    scoring = Clock()
    with clock(f"eval_{which}"):
        with scoring("eval"):
            ev = s.evaluate(v, c, desc=f"eval {which}")
        samples = s.samples(v, c)
    rec.eval(r, which, ev, c, s.vig_source, scoring["eval"])
    return ev, samples


def run_round(s: Session, rec: Recorder, r: int, base: Base) -> RoundRecord:
    """extract -> [iso-KL] -> generate + filter -> steered eval -> heal -> bake -> healed eval -> collapse."""
    clock, cfg = Clock(), s.cfg
    with clock("extract"):
        v = s.teacher()
    v0 = v if r == 0 else rec.rd.vectors(0)
    cos_v0 = extract.cosine(v, v0)
    rec.extract(r, v, stages.vector_meta(s, r), cos_v0, clock["extract"])
    c_star = 1.0
    if cfg.generate.iso_kl is not None:  # alphas (and the eval strength) become multiples of c*
        with clock("iso_kl"):
            iso = stages.iso_kl(s, v)
        rec.isokl(r, iso, clock["iso_kl"])
        c_star = iso["c_star"]
    try:
        col = stages.collect(s, r, v, base.ppl_max, c_star, clock)
    except Starved as e:
        rec.starved(r, e, base.ppl_max)
        raise
    rec.collected(r, col, base.ppl_max, cfg.generate.alphas, clock)
    c_eval = stages.eval_strength(cfg, col.kappa, c_star)
    steered, steered_samples = evaluated(s, rec, clock, r, "steered", v, c_eval)
    if base.null is None and cfg.eval.null_vectors > 0:  # once per run, on the base model
        with clock("null"):
            base.null, evs = null.random_null(s, v, c_eval, base.eval)
        rec.null(r, base.null, evs, clock["null"])
    data = stages.heal_data(s, r, col, base.ppl_max, clock)
    with clock("heal"):
        res = stages.heal(s, data, r, rec.heal_step(r), v)
    if (kept := stages.kept_heal_settings(s.cfg.heal, res)) is not None:
        s.cfg = dataclasses.replace(s.cfg, heal=kept)  # the rest of the run heals at the size that fit
    rec.heal(r, res, data, s.cfg.heal)
    with clock("bake"):
        rec.bake(r, s.student, s.student.bake())
    healed, healed_samples = evaluated(s, rec, clock, r, "healed")
    with clock("collapse"):
        acts = stages.neutral_acts(s, "healed")
        vs = stages.student_vector(acts, base.acts, s.layers)
        sig = stages.collapse_signals(s, "healed", acts)
    rec.collapse(r, "healed", sig, clock["collapse"])
    rec.samples(r, steered_samples, healed_samples)
    vectors = stages.RoundVectors(c_eval, c_star, cos_v0, extract.cosine(vs, v), extract.norm(v), extract.norm(vs))
    record = RoundRecord.compose(
        r,
        eval_part(base.eval.m, steered.m, healed.m, s.persona.trait_key),
        round_stats(base.eval.arm, steered.arm, healed.arm, s.persona.trait, s.persona.sign, s.resamples(), base.null),
        *map(record_part, (vectors, col, res)),
        {k: sig.get(k) for k in COLLAPSE_KEYS},
        {"seconds": clock.seconds, "peak_mib": clock.peak_mib},
    )
    rec.round(record)
    return record


# ---------------------------------------------------------------- the loop


@dataclass
class Stop:
    round: int
    reason: str
    code: int
    interrupted: bool = False  # Ctrl-C or an I/O failure: end at once, no export (a resume finishes it)


def stopped(e: Exception, r: int, rd: RunDir) -> Stop:
    """A round that raised: log it whole, record its first line."""
    logger.error(f"{e}\nrounds before {r} are intact in {rd.root}")
    prefix = "starved at " if isinstance(e, Starved) else ""
    return Stop(r, f"{prefix}round {r}: {str(e).splitlines()[0]}", exit_code(e))


def rounds(s: Session, rec: Recorder, state: RunState) -> Stop | None:
    """The base stage, then round after round until --n-rounds, a stop, or coherence below the floor."""
    r = state.start
    try:
        base = base_stage(s, rec, state)
        for r in range(state.start, s.cfg.n_rounds):
            try:
                record = run_round(s, rec, r, base)
            except STOPS as e:
                return stopped(e, r, rec.rd)
            if not record["healed_coh"] >= s.cfg.coh_floor:
                stop = Stop(r, f"healed coherence {record['healed_coh']:.3f} < floor {s.cfg.coh_floor} at round {r}", 0)
                logger.warning(stop.reason)
                return stop
    except KeyboardInterrupt:
        return Stop(r, f"interrupted (Ctrl-C) during round {r}", 130, interrupted=True)
    except OSError as e:  # a full disk, a vanished mount: what is on disk stays complete and resumable
        where = f" ({e.filename})" if e.filename else ""
        return Stop(r, f"I/O error during round {r}: {e.strerror or e}{where}", 2, interrupted=True)
    return None


def finish(s: Session, rec: Recorder, stop: Stop | None, t0: float) -> int:
    """Stop record, export of the finished student, summary + figure, ledger row, the closing lines."""
    rd = rec.rd
    if stop and stop.interrupted:
        return interrupted(rec, stop)
    if stop:
        rec.emit("stop", stop.round, reason=stop.reason, code=stop.code)
    done = rd.completed_rounds()
    if done:
        rd.remove_temps()  # an earlier attempt's half-written export, say
        s.student.export(s.tok, rd.export, {adapter_name(r): rd.adapter(r) / adapter_name(r) for r in done})
    rep = report.build(rd.root)
    rec.emit("summary", -1, verdict=rep.verdict, seconds=time.time() - t0, rounds_done=len(done))
    ledger.append(rd.root.parent / "results.jsonl", ledger.row(rep.info, rep.verdict))  # beside the run, always
    print("\n" + rep.text())
    expect = (
        f"trait moves in the persona's direction (sign {s.persona.sign:+d}) beyond the random null, more on the "
        f"{s.persona.trait}-labelled vignettes than on the rest (discriminative shift beyond 0 and its null), with "
        f"coherence >= {s.cfg.coh_floor:.2f}"
    )
    logger.info(f"expected: PASS: {expect}")
    if rep.instrument:
        logger.info(f"instrument: {rep.instrument}")
    print(f"{rep.verdict}\nrun directory: {rd.root}  ({time.time() - t0:.0f} s)")
    return stop.code if stop else 0


def interrupted(rec: Recorder, stop: Stop) -> int:
    """Record why the run ended (best effort: the disk may be full) and say how to continue, in one line."""
    try:
        rec.emit("stop", stop.round, reason=stop.reason, code=stop.code)
    except OSError:
        pass
    done = rec.rd.completed_rounds()
    print(
        f"error: {stop.reason}; rounds {done or 'none'} are complete in {rec.rd.root}; continue with "
        f"python -m steer_heal.run --resume {rec.rd.root}",
        file=sys.stderr,
    )
    return stop.code


def run(cfg: RunConfig, argv: list[str] | None = None) -> int:
    """Run (or resume) the loop; returns the exit code. Every input is checked before a directory is made, and a
    refusal found later, before any round is complete, removes the directory again."""
    argv = [canonical(a) for a in (sys.argv[1:] if argv is None else argv)]
    validate(cfg)
    if cfg.where.plan:
        text, fits = plan.report(cfg, cfg.where.plan_memory_gb)
        print(text)
        return 0 if fits else 1
    resumed = cfg.where.resume is not None
    if resumed:
        rd = RunDir(usable_path(Path(cfg.where.resume), "--resume"))
        given = cfg.where.out_dir
        stored = rd.read_config()
        seeds.check_scheme(stored.get("seed_scheme"), f"--resume {rd.root}")
        cfg = resume_config(cfg, stored["config"], argv, rd.root)
        cfg = dataclasses.replace(
            cfg, where=dataclasses.replace(cfg.where, out_dir=resumed_out_dir(argv, given, rd.root))
        )
        state, root = read_state(rd), rd.root
    else:
        state, root = RunState([], None, None, None, None, None), planned_root(cfg)
    seeds.seed_globals(cfg.seed)  # once, here: every stage after seeds its own draws from seeds.derive
    s = Session.from_config(cfg)
    created = [] if resumed else create_run_dir(root)
    try:
        return logged(s, open_records(s, argv, root, resumed, state), state)
    except UserError:
        if not RunDir(root).completed_rounds():  # e.g. an --iso-kl target round 0 cannot reach
            discard_run_dir(created)
        raise


def logged(s: Session, rec: Recorder, state: RunState) -> int:
    """The rounds and the closing report, with the log copied to <run>/run.log."""
    sink = logger.add(rec.rd.root / "run.log", level="INFO", enqueue=False)
    try:
        logger.info(f"run directory {rec.rd.root}; model {s.cfg.model} ({models.describe(s.model)})")
        t0 = time.time()
        return finish(s, rec, rounds(s, rec, state), t0)
    finally:
        logger.remove(sink)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    setup_logging()
    return command(lambda a: run(parse_args(a), a), argv)


if __name__ == "__main__":
    sys.exit(main())
