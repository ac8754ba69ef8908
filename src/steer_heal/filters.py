"""Score steered completions, keep the coherent ones, and find a dose that leaves enough (walk-C).

Scores (each a pure function below, except `tail_ppl`, which runs the ORIGINAL model):
  tail_ppl     exp(mean NLL) of the last `tail_frac` of the completion under the original model
  rep          max share of the most frequent word or character n-gram, n = 2..4
  compress     zlib-compressed bytes / raw bytes of the text: loops and stutter compress well
  distinct2    distinct word bigrams / word bigrams
  top_word     share of the text's words built on its most frequent stem (first 5 letters of a 4+ letter
               word): catches "GLUTE GLUTEutive" / "snorvel snorvelism" soup whose made-up variants defeat
               exact n-gram, compression and whole-word checks
  english      share of common English words in the second half: a completion that drifts into broken
               French (seen on SmolLM2, at perplexity < 30) has almost none
  narration    the completion recites the persona in the first person
  refusal      the completion refuses (optional; off when the trait is about refusing)

Thresholds do not transfer across models, so the perplexity threshold is calibrated per run against
what coherent text scores under the base model: its own unsteered completions on the generation
prompts and the shipped human-written reference answers (data/reference_answers.jsonl). ppl_max is a
high quantile of that pool times a margin. Completions under MIN_PPL_TOKENS tokens carry too little
evidence for a perplexity verdict ("Sure." can score 300) and are judged by the other checks alone.
"""

from __future__ import annotations

import re
import statistics
import zlib
from collections import Counter
from dataclasses import dataclass

import torch
from tabulate import tabulate

from steer_heal.errors import Starved
from steer_heal.losses import token_nlls

_WORD = re.compile(r"[\w']+")


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def top_ngram_share(seq, n: int) -> float:
    """Count of the most frequent n-gram / number of n-grams, counted only when that n-gram repeats:
    0 when no n-gram occurs twice (a short reply like "Yes, I would." has nothing repeated in it)."""
    grams = [tuple(seq[i : i + n]) for i in range(len(seq) - n + 1)]
    top = Counter(grams).most_common(1)[0][1] if grams else 0
    return top / len(grams) if top >= 2 else 0.0


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
    """Words sharing the most frequent stem / number of words (0.0 for < 8 words); the stem of a word of
    4+ letters is its first 5 letters, so "glute", "GLUTEutive" and "glutes" count as one.

    Prose spreads over many content words (top share 0.02-0.06 on the shipped references); soup repeats
    a few made-up stems in variants (0.30-0.41 on the labelled set)."""
    w = words(text)
    stems = [x[:5] for x in w if len(x) >= 4]
    return 0.0 if len(w) < 8 or not stems else Counter(stems).most_common(1)[0][1] / len(w)


# The most frequent English words (function words and common verbs): 30-65 % of the words of English
# prose, ~5 % of broken French.
COMMON_ENGLISH = frozenset(
    """the be to of and a in that have i it for not on with he as you do at this but his by from they we
    say her she or an will my one all would there their what so up out if about who get which go me when
    make can like time no just him know take people into year your good some could them see other than then
    now look only come its over think also back after use two how our work first well way even new want
    because any these give day most us is are was were been has had did does said am very much more many
    should may might must here where why each such both few those own same too off down again once while
    through during before above below between under until against among within without it's don't i'm
    you're that's""".split()
)


def english_share(text: str) -> float:
    """Share of the words in the second half of the text that are common English words (1.0 for fewer
    than 6 such words: no evidence). Drift into another language, or into made-up words, drives it to 0."""
    w = words(text)
    tail = w[len(w) // 2 :]
    return 1.0 if len(tail) < 6 else sum(x in COMMON_ENGLISH for x in tail) / len(tail)


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


def tail_ppl(
    model, pairs: list[tuple[list[int], list[int]]], tail_frac: float, pad_id: int, batch_size: int
) -> list[float]:
    """exp(mean NLL over the last ceil(tail_frac * n) completion tokens), one per (prompt, completion).

    Call it on the ORIGINAL model (adapters disabled): the student that made the text would grade itself."""
    out: list[float] = []
    for x in token_nlls(model, pairs, pad_id, batch_size, desc="score ppl"):
        k = max(1, int(-(-len(x) * tail_frac // 1)))
        out.append(float(torch.exp(x[-k:].mean())))
    return out


MIN_PPL_TOKENS = 8  # fewer completion tokens than this: perplexity is not evidence either way


@dataclass
class Thresholds:
    ppl_max: float
    rep_max: float
    compress_min: float
    distinct_min: float
    top_word_max: float
    narration: bool
    refusal: bool
    english_min: float = 0.0

    @classmethod
    def of(cls, f, ppl_max: float) -> Thresholds:
        """The filter's thresholds from its config (config.FilterConfig) and the run's ppl threshold."""
        return cls(ppl_max, f.rep_max, f.compress_min, f.distinct_min, f.top_word_max, f.narration, f.refusal,
                   f.english_min)  # fmt: skip


def text_scores(text: str, persona_texts: tuple[str, ...]) -> dict:
    return {
        "rep": repetition(text),
        "compress": compression_ratio(text),
        "distinct2": distinct2(text),
        "top_word": top_word_share(text),
        "english": english_share(text),
        "narration": narration(text, persona_texts),
        "refusal": refusal(text),
    }


def decide(s: dict, th: Thresholds) -> tuple[bool, str]:
    """(keep, reason). The first failed check names the reason; '' when kept."""
    if not s["n_tokens"]:
        return False, "empty"
    if s["n_tokens"] >= MIN_PPL_TOKENS and (s["tail_ppl"] is None or not s["tail_ppl"] <= th.ppl_max):
        return False, "ppl"
    if s["rep"] > th.rep_max:
        return False, "repetition"
    if s["compress"] < th.compress_min or s["distinct2"] < th.distinct_min or s["top_word"] > th.top_word_max:
        return False, "loop"
    if s.get("english", 1.0) < th.english_min:
        return False, "drift"
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


def quantile(xs: list[float], q: float) -> float:
    """The q-quantile of xs by linear interpolation between order statistics (numpy's default)."""
    xs = sorted(xs)
    pos = q * (len(xs) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (pos - lo) * (xs[hi] - xs[lo])


def ppl_threshold(coherent_ppls: list[float], q: float, mult: float, override: float | None) -> float:
    """ppl threshold = override, else mult x the q-quantile of the tail-ppl of coherent text (the base
    model's own completions and the shipped reference answers, scored under the base model)."""
    return float(override) if override is not None else mult * quantile(coherent_ppls, q)


def q0_table(scored: list[dict]) -> list[dict]:
    """Per strength actually applied (alpha x kappa [x c*]): n, mean/median tail-ppl, kept fraction, drop
    counts by reason (the Q0 table). Probes at different kappa are separate rows, never pooled."""
    rows = []
    for alpha, kappa in sorted({(s["alpha"], s.get("kappa", 1.0)) for s in scored}):
        g = [s for s in scored if s["alpha"] == alpha and s.get("kappa", 1.0) == kappa]
        # c = the strength actually applied (alpha x kappa x c* under --iso-kl), as each row records it
        c = g[0]["coeff"] if "coeff" in g[0] else alpha * kappa
        ppl = [s["tail_ppl"] for s in g if s["tail_ppl"] is not None]
        drops = Counter(s["reason"] for s in g if not s["keep"])
        rows.append(
            {
                "alpha": alpha,
                "kappa": kappa,
                "c": c,
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
