"""The research setting, checked in one command: bf16, CUDA, and gemma-3-4b-it's architecture.

    bash scripts/gpu_check.sh                                # on a GPU machine (see the .sh for the set-up)
    uv run bash scripts/gpu_check.sh --device cpu --shrink   # the dry run on a CPU: same steps, tiny sizes

Steps, each with its own time limit, everything measured written to <--out>/gpu_check.json (whatever
fails, the file is written and says what failed):
  env     python, torch / CUDA / GPU, transformers, peft, ... versions; which steer_heal modules import
  tests   tests/test_devices.py on every device there (placement, hooks, losses, eval, bake, a heal step;
          fp32 and bf16)
  plan    --plan's per-stage estimate for the round below
  round   one full round of the pipeline on random:data/gemma-3-4b-it.text_config.json (3.88 B params,
          vocab 262k) in bf16, at the gemma preset's sizes (32 prompts x 3 strengths, 256 new tokens,
          batch 64, LoRA band, gradient checkpointing), the filter's thresholds opened so random text
          passes, fewer contexts / vignettes / null directions for time; per-stage seconds and
          torch.cuda.max_memory_allocated per stage come from the round record
          (generation runs decode.py's compiled loop: --decode auto is compiled on CUDA)
  bench   scripts/bench.py: steered / unsteered tokens/s at batch 64, heal-step peak memory lean vs naive at
          L = 1024 with the 262k vocabulary
  decode  scripts/bench.py --only decode: decode tokens/s of the eager and the compiled loop side by side (batch
          64, 256 new tokens) against the bound of weights + K/V bytes per step, graphs, recompiles, compile
          seconds, and one top-p step over 64 x 262k logits
"""

from __future__ import annotations

import argparse
import importlib
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GEMMA = ROOT / "data" / "gemma-3-4b-it.text_config.json"
PACKAGES = ("torch", "transformers", "peft", "accelerate", "safetensors", "tokenizers", "tyro", "loguru", "tabulate",
            "tqdm", "matplotlib", "numpy", "pytest")  # fmt: skip
OPEN_FILTER = ["--ppl-max", "1e12", "--rep-max", "1", "--compress-min", "0", "--distinct-min", "0",
               "--top-word-max", "1", "--english-min", "0", "--no-narration"]  # fmt: skip


def env() -> dict:
    """Versions of what the check runs on, and which of our modules import (and why not)."""
    out = {"python": platform.python_version(), "packages": {}, "missing": [], "imports": {}}
    for p in PACKAGES:
        try:
            out["packages"][p] = importlib.import_module(p).__version__
        except ImportError as e:
            out["missing"].append(f"{p}: {e}")
        except AttributeError:
            out["packages"][p] = "?"
    for m in ("run", "sweep", "plan", "heal", "evaluate", "frontier"):
        try:
            importlib.import_module(f"steer_heal.{m}")
            out["imports"][m] = "ok"
        except ImportError as e:
            out["imports"][m] = f"{type(e).__name__}: {e}"
    import torch

    out["cuda"] = torch.version.cuda
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        out["gpu"] = {"name": p.name, "memory_gib": round(p.total_memory / 2**30, 1), "sm": f"{p.major}.{p.minor}"}
    return out


def sub(cmd: list[str], timeout: int, log: Path) -> dict:
    """Run a step in its own process (its failure cannot end the check): exit code, seconds, the output tail."""
    t0 = time.time()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
        code, out, err = p.returncode, p.stdout, p.stderr
    except subprocess.TimeoutExpired as e:
        dec = lambda b: b.decode() if isinstance(b, bytes) else (b or "")  # noqa: E731
        code, out, err = "timeout", dec(e.stdout), dec(e.stderr)
    log.write_text(out + err, encoding="utf-8")
    last = out.strip().splitlines()[-1] if out.strip() else ""
    return {"code": code, "seconds": round(time.time() - t0, 1), "tail": (out + err)[-1500:], "last_line": last}


def last_json(step: dict) -> dict | None:
    """The JSON object bench.py prints as its last line, or None when the step did not get that far."""
    try:
        return json.loads(step["last_line"])
    except json.JSONDecodeError:
        return None


def model_flags(a) -> list[str]:
    """gemma-3-4b-it's text architecture with random weights; --shrink: 2 thin layers, the real vocabulary."""
    cfg = GEMMA
    if a.shrink:
        d = json.loads(GEMMA.read_text())
        d.update(hidden_size=64, intermediate_size=128, num_hidden_layers=2, head_dim=32, num_attention_heads=2,
                 num_key_value_heads=1, sliding_window=16)  # fmt: skip
        cfg = a.out / "gemma_shrunk.json"
        cfg.write_text(json.dumps(d))
    return ["--preset", "gemma", "--model", f"random:{cfg}", "--device", a.device, "--dtype", "bfloat16"]


def round_flags(a, runs: Path) -> list[str]:
    """The gemma preset's sizes for generation and heal; fewer contexts, vignettes, null directions and
    reference answers than a research run, for time."""
    sizes = {"n_contexts": 64, "pr_contexts": 64, "n_vignettes": 28, "null_vectors": 2, "entropy_prompts": 8,
             "n_references": 16}  # fmt: skip
    if a.shrink:
        sizes |= {"n_prompts": 4, "max_new_tokens": 16, "gen_batch_size": 16, "n_keep": 8, "min_train": 2,
                  "epochs": 1, "n_contexts": 16, "pr_contexts": 16, "n_vignettes": 7, "entropy_prompts": 2,
                  "n_references": 4}  # fmt: skip
    flags = [x for k, v in sizes.items() for x in ("--" + k.replace("_", "-"), str(v))]
    return [*model_flags(a), "--n-rounds", "1", "--coh-floor", "0", *OPEN_FILTER, *flags, "--out-dir", str(runs),
            "--run-name", "gemma"]  # fmt: skip


def round_record(runs: Path) -> dict:
    """What the round measured: per-stage seconds and peak memory, the heal, and the evals."""
    sys.path.insert(0, str(ROOT / "src"))
    from steer_heal import events

    recs = events.read(runs / "gemma")
    rnd = events.first(recs, "round") or {}
    heal = events.first(recs, "heal") or {}
    gen = events.first(recs, "generate") or {}
    evals = [{k: e.get(k) for k in ("model", "coherence", "ref_nll", "seconds")} for e in events.find(recs, "eval")]
    return {
        "seconds": rnd.get("seconds"),
        "peak_mib": rnd.get("peak_mib"),
        "tokens_per_s": gen.get("tokens_per_s"),
        "heal": {k: heal.get(k) for k in ("steps", "nll_first", "nll_last", "seconds", "batch_size", "grad_accum")},
        "evals": evals,
        "stop": (events.last(recs, "stop") or {}).get("reason"),
    }


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="where gpu_check.json (and the step logs) go")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--shrink", action="store_true", help="tiny sizes (a CPU dry run)")
    ap.add_argument("--runs", type=Path, default=Path("/tmp/steer_heal_gpu_check"), help="run dirs (not $OUT)")
    ap.add_argument("--skip", nargs="*", default=[], choices=["tests", "round", "bench", "decode"])
    a = ap.parse_args(argv)
    a.out.mkdir(parents=True, exist_ok=True)
    t0, py, res = time.time(), sys.executable, {"started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    res["env"] = env()

    def save():
        res["seconds"] = round(time.time() - t0, 1)
        (a.out / "gpu_check.json").write_text(json.dumps(res, indent=2, default=str), encoding="utf-8")

    save()
    if "tests" not in a.skip:
        res["tests"] = sub([py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_devices.py"], 240,
                           a.out / "tests.log")  # fmt: skip
        save()
    plan_cmd = [py, "-m", "steer_heal.run", *round_flags(a, a.runs), "--plan", "--plan-memory-gb", "80"]
    res["plan"] = sub(plan_cmd, 120, a.out / "plan.log")
    save()
    if "round" not in a.skip:
        import shutil

        shutil.rmtree(a.runs, ignore_errors=True)
        # 480 s: the round's generation compiles its decode step (per batch shape and adapter state) before it runs
        res["round"] = sub([py, "-m", "steer_heal.run", *round_flags(a, a.runs)], 480, a.out / "round.log")
        try:
            res["round"]["record"] = round_record(a.runs)
        except Exception as e:  # noqa: BLE001 -- whatever went wrong, the check writes its JSON and goes on
            res["round"]["record"] = f"unreadable: {type(e).__name__}: {e}"
        save()
    if "bench" not in a.skip:
        sizes = ["--batch", "64", "--single-rows", "4", "--heal-len", "1024", "--heal-batch", "2"]
        if a.shrink:
            sizes = ["--batch", "8", "--single-rows", "2", "--new-tokens", "8", "--heal-len", "64", "--heal-batch", "2"]
        res["bench"] = sub([py, "scripts/bench.py", "--only", "generate", "heal", *sizes, *model_flags(a)], 240,
                           a.out / "bench.log")  # fmt: skip
        res["bench"]["figures"] = last_json(res["bench"])
        save()
    if "decode" not in a.skip:
        sizes = ["--batch", "64", "--new-tokens", "256"] if not a.shrink else ["--batch", "8", "--new-tokens", "8"]
        res["decode"] = sub([py, "scripts/bench.py", "--only", "decode", *sizes, *model_flags(a)], 300,
                            a.out / "decode.log")  # fmt: skip
        res["decode"]["figures"] = last_json(res["decode"])
        save()
    ok = all(res.get(k, {}).get("code") == 0 for k in ("tests", "round", "bench", "decode") if k not in a.skip)
    print(
        json.dumps(
            {k: (v.get("code"), v.get("seconds")) for k, v in res.items() if isinstance(v, dict) and "code" in v}
        )
    )
    print(f"{'OK' if ok else 'FAILED'}: wrote {a.out / 'gpu_check.json'} ({time.time() - t0:.0f} s)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
