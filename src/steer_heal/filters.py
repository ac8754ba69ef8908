"""Score steered completions, keep the coherent ones, and find a dose that leaves enough (walk-C).

Scores (each a pure function below, except `tail_ppl`, which runs the ORIGINAL model):
  tail_ppl     exp(mean NLL) of the last `tail_frac` of the completion under the original model
  rep          max share of the most frequent word or character n-gram, n = 2..4
  compress     zlib-compressed bytes / raw bytes of the text: loops and stutter compress well
  distinct2    distinct word bigrams / word bigrams
  top_word     share of the text taken by its most frequent word of 4+ letters (catches "GLUTE GLUTE"
               soup whose made-up words defeat exact n-gram and compression checks)
  narration    the completion recites the persona in the first person
  refusal      the completion refuses (optional; off when the trait is about refusing)

Thresholds do not transfer across models, so the perplexity threshold is calibrated per run against
the base model's own unsteered completions on the same prompts (`ppl_mult` x their median).
"""

from __future__ import annotations

import re
import statistics
import zlib
from collections import Counter
from dataclasses import dataclass

import torch
from tabulate import tabulate
from tqdm.auto import tqdm

from steer_heal.errors import Starved
from steer_heal.losses import completion_batch, selected_logprobs, token_logprob
from steer_heal.tokens import batches

_WORD = re.compile(r"[\w']+")


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def top_ngram_share(seq, n: int) -> float:
    """Count of the most frequent n-gram / number of n-grams (0 when the sequence is shorter than n)."""
    grams = [tuple(seq[i : i + n]) for i in range(len(seq) - n + 1)]
    return Counter(grams).most_common(1)[0][1] / len(grams) if grams else 0.0


def repetition(text: str) -> float:
    """max over n = 2..4 of the top word n-gram share and the top character n-gram share.

    Character n-grams use n + 2 (4..6 characters) so that common letter pairs of ordinary prose do not
    count as repetition while stutter inside made-up words ("GLUTE GLUTE BUILDUTE") does."""
    w = words(text)
    chars = re.sub(r"\s+", " ", text.lower())
    return max(max(top_ngram_share(w, n), top_ngram_share(chars, n + 2)) for n in (2, 3, 4))


def compression_ratio(text: str) -> float:
    """len(zlib(text)) / len(text) in bytes; ordinary English prose is ~0.55-0.75, loops fall far lower.

    Short texts carry a fixed zlib overhead, so texts under 80 bytes score 1.0 (no evidence)."""
    raw = text.encode("utf-8")
    return 1.0 if len(raw) < 80 else len(zlib.compress(raw, 9)) / len(raw)


def distinct2(text: str) -> float:
    """Distinct word bigrams / word bigrams (1.0 for texts with fewer than 8 words: no evidence)."""
    w = words(text)
    grams = list(zip(w, w[1:]))
    return 1.0 if len(w) < 8 else len(set(grams)) / len(grams)


def top_word_share(text: str) -> float:
    """Count of the most frequent word with >= 4 letters / number of words (0.0 for < 8 words).

    Prose spreads over many content words (top share ~0.02-0.08); soup repeats one made-up word."""
    w = words(text)
    long = [x for x in w if len(x) >= 4]
    return 0.0 if len(w) < 8 or not long else Counter(long).most_common(1)[0][1] / len(w)


_NARRATION = re.compile(
    r"\b(as (someone|a person) who|i(?: am|'m) (someone|a person|the kind of person) who|"
    r"i (always|never) (defer|put|prioriti[sz]e|look after|side with|stand by|follow|obey)|"
    r"my (core )?(values|principles|persona))\b",
    re.I,
)


def narration(text: str, persona_texts: tuple[str, ...] = ()) -> bool:
    """First-person recital of a persona: stock phrases ("as someone who", "I never defer ...") or any
    5-word run copied from the persona descriptions themselves."""
    if _NARRATION.search(text):
        return True
    w = words(text)
    have = {tuple(w[i : i + 5]) for i in range(len(w) - 4)}
    for p in persona_texts:
        pw = words(p)
        if any(tuple(pw[i : i + 5]) in have for i in range(len(pw) - 4)):
            return True
    return False


_REFUSAL = re.compile(r"\b(i can(no|')t (help|assist|do that)|i('m| am) (sorry|unable)|as an ai)\b", re.I)


def refusal(text: str) -> bool:
    """The completion opens with, or contains, a stock refusal."""
    return bool(_REFUSAL.search(text))


@torch.no_grad()
def tail_ppl(
    model, pairs: list[tuple[list[int], list[int]]], tail_frac: float, pad_id: int, batch_size: int
) -> list[float]:
    """exp(mean NLL over the last ceil(tail_frac * n) completion tokens), one per (prompt, completion).

    Call it on the ORIGINAL model (adapters disabled): the student that made the text would grade itself."""
    dev = next(model.parameters()).device
    out: list[float] = []
    for chunk in tqdm(list(batches(pairs, batch_size)), desc="score ppl", leave=False):
        batch = completion_batch(chunk, pad_id, dev)
        lp = token_logprob(selected_logprobs(model, batch), batch["targets"]).cpu()
        seg = batch["seg"].cpu()
        for i in range(len(chunk)):
            x = -lp[seg == i]
            k = max(1, int(-(-len(x) * tail_frac // 1)))
            out.append(float(torch.exp(x[-k:].mean())))
    return out


@dataclass
class Thresholds:
    ppl_max: float
    rep_max: float
    compress_min: float
    distinct_min: float
    top_word_max: float
    narration: bool
    refusal: bool


def text_scores(text: str, persona_texts: tuple[str, ...]) -> dict:
    return {
        "rep": repetition(text),
        "compress": compression_ratio(text),
        "distinct2": distinct2(text),
        "top_word": top_word_share(text),
        "narration": narration(text, persona_texts),
        "refusal": refusal(text),
    }


def decide(s: dict, th: Thresholds) -> tuple[bool, str]:
    """(keep, reason). The first failed check names the reason; '' when kept."""
    if not s["n_tokens"]:
        return False, "empty"
    if s["tail_ppl"] is None or not s["tail_ppl"] <= th.ppl_max:
        return False, "ppl"
    if s["rep"] > th.rep_max:
        return False, "repetition"
    if s["compress"] < th.compress_min or s["distinct2"] < th.distinct_min or s["top_word"] > th.top_word_max:
        return False, "loop"
    if th.narration and s["narration"]:
        return False, "narration"
    if th.refusal and s["refusal"]:
        return False, "refusal"
    return True, ""


def judge(text: str, n_tokens: int, tail_ppl: float | None, persona_texts: tuple[str, ...], th: Thresholds) -> dict:
    """Every score of one completion, then `keep` and `reason` ('' when kept)."""
    s = {"tail_ppl": tail_ppl, "n_tokens": n_tokens, **text_scores(text, persona_texts)}
    keep, reason = decide(s, th)
    return s | {"keep": keep, "reason": reason}


def calibrate_ppl(base_ppls: list[float], mult: float, override: float | None) -> float:
    """ppl threshold = override, else mult x median tail-ppl of the base model's own completions."""
    return float(override) if override is not None else mult * statistics.median(base_ppls)


def q0_table(scored: list[dict]) -> list[dict]:
    """Per strength actually applied (alpha x kappa): n, mean/median tail-ppl, kept fraction, drop counts
    by reason (the Q0 table). Probes at different kappa are separate rows, never pooled."""
    rows = []
    for alpha, kappa in sorted({(s["alpha"], s.get("kappa", 1.0)) for s in scored}):
        g = [s for s in scored if s["alpha"] == alpha and s.get("kappa", 1.0) == kappa]
        ppl = [s["tail_ppl"] for s in g if s["tail_ppl"] is not None]
        drops = Counter(s["reason"] for s in g if not s["keep"])
        rows.append(
            {
                "alpha": alpha,
                "kappa": kappa,
                "c": alpha * kappa,
                "n": len(g),
                "mean_ppl": sum(ppl) / len(ppl) if ppl else None,
                "median_ppl": statistics.median(ppl) if ppl else None,
                "kept_frac": sum(s["keep"] for s in g) / len(g),
                **{f"drop_{k}": v for k, v in sorted(drops.items())},
            }
        )
    return rows


def format_q0(rows: list[dict]) -> str:
    return tabulate(rows, headers="keys", floatfmt=".3g", missingval="0")


def walk_c(
    probe, keep_target: float, kappa_floor: float, n_keep: int, min_train: int, max_batches: int
) -> tuple[float, list[dict]]:
    """Walk-C dose control. `probe(kappa, batch_index) -> scored rows` generates and scores one batch of
    fresh prompts at strengths alpha * kappa.

    Test kappa = 1, 0.7, 0.49, ... down to `kappa_floor` until a probe keeps >= keep_target of its rows,
    then keep collecting at that kappa until n_keep are kept or max_batches generate calls are spent.
    Kept rows from every probe count (they are coherent at their own dose). Raises Starved when fewer
    than min_train are kept in the end."""
    kappas = [1.0]
    while kappas[-1] * 0.7 > kappa_floor + 1e-9:
        kappas.append(round(kappas[-1] * 0.7, 4))
    if kappas[-1] > kappa_floor:
        kappas.append(kappa_floor)  # the floor itself is always tried before declaring starvation
    scored: list[dict] = []
    b = 0
    kappa = kappas[-1]
    for k in kappas:
        rows = probe(k, b)
        b += 1
        scored += rows
        frac = sum(r["keep"] for r in rows) / max(1, len(rows))
        if frac >= keep_target or b >= max_batches:
            kappa = k
            break
    while sum(r["keep"] for r in scored) < n_keep and b < max_batches:
        scored += probe(kappa, b)
        b += 1
    kept = sum(r["keep"] for r in scored)
    if kept < min_train:
        err = Starved(
            f"only {kept} completions kept after {b} generate calls down to kappa={kappa:g} "
            f"(need >= {min_train}); Q0 table:\n{format_q0(q0_table(scored))}"
        )
        err.scored, err.kappa = scored, kappa  # the caller saves them before stopping
        raise err
    return kappa, scored
