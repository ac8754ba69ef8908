"""Moral-foundation vignette eval: which foundation does each scenario violate? Scored in nats.

Protocol: a forced-choice prompt lists the seven foundations; the assistant turn is prefilled up to the
answer slot, and one forward pass per (vignette, option order) reads the log-probabilities of the seven
answer tokens there. Options are listed in forward and reversed order and the two are averaged, which
cancels position bias. If two labels share their first token, each label's full token sequence is
scored instead (7 extra rows per vignette).

Metrics (direction in brackets):
  <f>_nats         log(profile[f]), profile = mean over vignettes of softmax over the 7 answers  [trait]
  p_ans_any        total probability on the 7 answer tokens, mean over vignettes   [higher = coherent]
  frac_unscorable  share of vignettes with p_ans_any < 0.5                         [lower = better]
  prefill_nll      mean NLL per token of the forced prefill text                   [lower = better]
  acc              top-1 agreement with the labels                                  [higher = better]
  human_agree      1 - total variation to the human rater distribution, if given   [higher = better]
  ref_nll          mean NLL per token (nats) of held-out human-written reference answers given their
                   questions (data/reference_answers.jsonl): the capability tax, a coherence axis that
                   does not saturate the way answer mass does on strong models     [lower = better]

Contextual calibration (Zhao et al. 2021, "Calibrate Before Use", ICML): the same question is also asked
about content-free scenarios (CONTENT_FREE: "N/A", an empty one, "[MASK]"), under the same model, system
prompt and steering. Their normalised geometric-mean choice distribution q_o (per option order o) is the
model's prior over the seven answer words; each vignette's choice is divided by it and renormalised,

    p_cal[i, o, f] = p[i, o, f] / q_o[f]  /  sum_g p[i, o, g] / q_o[g],     p_cal[i] = mean_o p_cal[i, o]

so a shift that only moves the answer word's prior (a logit bias the same on every input, content-free ones
included) leaves p_cal exactly unchanged.
Reported beside the raw metrics:
  <f>_nats_cal     log(mean over vignettes of p_cal[:, f])                          [calibrated trait]
  <f>_prior_nats   log(mean over orders of q_o[f]): the content-free prior itself
  acc_cal          top-1 agreement of p_cal with the labels                         [higher = better]
and per vignette, besides p_cal (pc_<f>), the calibrated log-odds of each answer (lodds_<f>):

    l[i, f] = mean_o log(p_cal[i, o, f] / (1 - p_cal[i, o, f]))

(computed in log space, never clipped). A bias b on answer f's logit that calibration does not remove (one
the content-free inputs do not see) shifts l by exactly b on every vignette, however confident the model
is, and cancels in the discriminative trait (stats.shift).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from steer_heal.data import FOUNDATIONS, SHORT, Vignette
from steer_heal.models import input_device, unwrap
from steer_heal.stats import cal_key
from steer_heal.tokens import batches, chat_ids, pad, with_prefill

# Wording chosen on SmolLM2-135M among four candidates for answer mass (0.71 vs 0.01-0.78) without
# collapsing onto one option; see docs/journal.md.
QUESTION = (
    "Which moral foundation does this scenario violate?\n\n"
    "Scenario: {text}\n\nOptions: {options}.\nAnswer with one option only."
)
PREFILL = "Answer:"
UNSCORABLE = 0.5
# Zhao et al.'s three content-free inputs, put where the scenario goes.
CONTENT_FREE = ("N/A", "", "[MASK]")


def options(reverse: bool) -> tuple[str, ...]:
    return tuple(reversed(FOUNDATIONS)) if reverse else FOUNDATIONS


def prompt_text(text: str, reverse: bool) -> str:
    return QUESTION.format(text=text, options=", ".join(options(reverse)))


def label_ids(tok) -> list[list[int]]:
    """Token ids of " <label>" as it continues the prefill (tokenised in context, so BPE merges match)."""
    base = tok(PREFILL, add_special_tokens=False).input_ids
    out = []
    for f in FOUNDATIONS:
        ids = tok(PREFILL + " " + f, add_special_tokens=False).input_ids
        if ids[: len(base)] != base:
            raise ValueError(f"tokenizer merges the prefill with the label {f!r}; choose another prefill")
        out.append(ids[len(base) :])
    return out


def _think(model, tok, prompts: list[list[int]], n: int, batch_size: int) -> list[list[int]]:
    """Greedy `n`-token think budget appended before the prefill (costs n decode steps per vignette)."""
    from steer_heal.generate import Row, Sampling, generate, stop_ids  # local: kept out of the pure path

    rows = [Row(i, "", p) for i, p in enumerate(prompts)]
    comps = generate(model, tok, rows, sampling=Sampling(n, do_sample=False), batch_size=batch_size, desc="think")
    sep = tok("\n\n", add_special_tokens=False).input_ids + tok(PREFILL, add_special_tokens=False).input_ids
    # The end-of-turn token (if the model stopped) is dropped so the answer stays inside the same turn.
    stops = set(stop_ids(model, tok))  # e.g. Gemma's <end_of_turn> as well as <eos>
    return [p + [t for t in c.ids if t not in stops] + sep for p, c in zip(prompts, comps)]


def _lcp(a: list[int], b: list[int]) -> int:
    """Length of the longest common prefix of two id lists."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _logits_plain(model, items: list[list[int]], keep: int, batch_size: int, pad_id: int, dev, desc: str):
    """Yield (row indices, fp32 logits of their last `keep` positions) for left-padded batches of whole rows."""
    for b, chunk in enumerate(tqdm(list(batches(items, batch_size)), desc=desc, leave=False)):
        enc = pad(chunk, pad_id, "left", dev)
        yield list(range(b * batch_size, b * batch_size + len(chunk))), model(**enc, logits_to_keep=keep).logits.float()


def _segment(model, cache, mask: torch.Tensor, seqs: list[list[int]], pad_id: int, keep: int):
    """Run the left-padded `seqs` after what `cache` holds (its 2D mask `mask`); positions count real tokens
    only, so every real token sees exactly the context a plain forward pass gives it. Returns
    (logits of the last `keep` positions, the mask now covering cache + seqs)."""
    enc = pad(seqs, pad_id, "left", mask.device)
    mask = torch.cat([mask, enc["attention_mask"]], dim=1)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)[:, -enc["input_ids"].shape[1] :]
    out = model(input_ids=enc["input_ids"], attention_mask=mask, position_ids=pos, past_key_values=cache,
                use_cache=True, logits_to_keep=keep)  # fmt: skip
    return out.logits, mask


def _logits_shared_prefix(model, items: list[list[int]], keep: int, batch_size: int, pad_id: int, dev, desc: str):
    """The same logits as `_logits_plain`, computed as a tree. Rows come in pairs (a vignette's two option
    orders); every row starts with the same instruction prefix, and both orders of a vignette share the
    scenario. Per batch of vignettes: (1) the common prefix once, its KV cache repeated over the batch;
    (2) each vignette's shared part, once; (3) the cache repeated twice and each order's remainder.
    About half the tokens of the plain pass on the shipped eval."""
    common = min(_lcp(items[0], x) for x in items)
    # each row's last `keep` positions must fall in its own remainder (step 3)
    shared = [min(_lcp(items[i], items[i + 1]), len(items[i]) - keep, len(items[i + 1]) - keep)
              for i in range(0, len(items), 2)]  # fmt: skip
    common = min(common, *shared)
    # Padding inside the cached rows takes cache slots: a sliding-window layer (Gemma) must still see every
    # real token of its window, so the tree is only used when the longest padded row fits in the window.
    cfg = unwrap(model).config
    window = getattr(cfg, "sliding_window", None) or getattr(getattr(cfg, "text_config", None), "sliding_window", None)
    longest = max(shared) + max(len(x) - shared[i // 2] for i, x in enumerate(items))
    if common < 1 or (window and longest > window):
        yield from _logits_plain(model, items, keep, batch_size, pad_id, dev, desc)
        return
    # Vignettes per batch: step 3 then runs 2 x batch_size rows, but of ~1/3 the plain rows' length, so it
    # holds less than a plain batch; fewer, larger calls are what make the tree ~1.8x faster on a CPU.
    per = batch_size
    order = sorted(range(len(shared)), key=lambda v: (shared[v], len(items[2 * v])))  # similar lengths: less padding
    for start in tqdm(range(0, len(order), per), desc=desc, leave=False):
        vs = order[start : start + per]
        cache = model(input_ids=torch.tensor([items[0][:common]], device=dev), use_cache=True).past_key_values
        cache.batch_repeat_interleave(len(vs))
        mask = torch.ones((len(vs), common), dtype=torch.long, device=dev)
        seg = [items[2 * v][common : shared[v]] for v in vs]
        if any(seg):
            _, mask = _segment(model, cache, mask, seg, pad_id, 1)
        cache.batch_repeat_interleave(2)
        rest = [items[2 * v + o][shared[v] :] for v in vs for o in (0, 1)]
        logits, _ = _segment(model, cache, mask.repeat_interleave(2, dim=0), rest, pad_id, keep)
        yield [2 * v + o for v in vs for o in (0, 1)], logits.float()


@torch.no_grad()
def answer_logprobs(
    model,
    tok,
    vigs: list[Vignette],
    batch_size: int,
    think_tokens: int = 0,
    desc: str = "eval",
    force_full: bool = False,
    system: str | None = None,
    shared_prefix: bool = True,
    prior: bool = True,
) -> dict:
    """Per vignette and order: log p of each of the 7 labels [N, 2, 7] and the prefill NLL [N, 2]; with
    `prior`, also the same log-probs for the CONTENT_FREE scenarios [K, 2, 7], returned as out["prior"]
    (scored in batches of their own, so the vignettes' numbers do not depend on them). `shared_prefix`
    computes the common prompt parts once (same numbers, about twice as fast)."""
    kw = dict(think_tokens=think_tokens, force_full=force_full, system=system, shared_prefix=shared_prefix)
    out = _scenario_logprobs(model, tok, [v.text for v in vigs], batch_size, desc=desc, **kw)
    if prior:
        cf = _scenario_logprobs(model, tok, list(CONTENT_FREE), batch_size, desc=f"{desc} prior", **kw)
        out["prior"] = cf["logp"]
    return out


def _scenario_logprobs(
    model, tok, texts: list[str], batch_size: int, think_tokens: int, desc: str, force_full: bool,
    system: str | None, shared_prefix: bool,
) -> dict:  # fmt: skip
    """{"logp": [N, 2, 7], "prefill_nll": [N, 2]} for the question asked about each scenario text."""
    dev = input_device(model)
    labels = label_ids(tok)
    first = [ids[0] for ids in labels]
    distinct = len(set(first)) == len(first) and not force_full
    prefill_ids = tok(PREFILL, add_special_tokens=False).input_ids
    n_pre = len(prefill_ids)
    # The prefill is appended as its own ids so its positions are known exactly (the last n_pre tokens).
    heads = [chat_ids(tok, prompt_text(text, rev), system) for text in texts for rev in (False, True)]
    if think_tokens > 0:
        items = _think(model, tok, heads, think_tokens, batch_size)
    else:
        items = [with_prefill(h, prefill_ids) for h in heads]
    # Logits for the prefill tokens and the answer slot: the last n_pre + 1 positions of every row.
    run = _logits_shared_prefix if shared_prefix and think_tokens == 0 else _logits_plain
    lp = torch.empty(len(items), len(FOUNDATIONS))
    pre = torch.empty(len(items))
    tgt = torch.tensor(prefill_ids, device=dev)
    for idx, logits in run(model, items, n_pre + 1, batch_size, tok.pad_token_id, dev, desc):
        logp = F.log_softmax(logits, -1)
        pre[idx] = -logp[:, :-1].gather(-1, tgt.expand(len(idx), -1)[..., None]).squeeze(-1).mean(-1).cpu()
        if distinct:
            lp[idx] = logp[:, -1][:, first].cpu()
        else:
            lp[idx] = torch.stack([_full_label(model, tok, items[i], labels, dev) for i in idx]).cpu()
    # Labels are always scored in FOUNDATIONS order, whatever order the prompt listed them in.
    return {"logp": lp.view(len(texts), 2, len(FOUNDATIONS)), "prefill_nll": pre.view(len(texts), 2)}


def _full_label(model, tok, prompt: list[int], labels: list[list[int]], dev) -> torch.Tensor:
    """log p(label tokens | prompt) summed over each label's tokens, for labels that share a first token."""
    seqs = [prompt + ids for ids in labels]
    enc = pad(seqs, tok.pad_token_id, "right", dev)
    logp = F.log_softmax(model(**enc).logits.float(), -1)
    out = []
    for i, ids in enumerate(labels):
        pos = torch.arange(len(prompt) - 1, len(prompt) - 1 + len(ids), device=dev)
        out.append(logp[i, pos].gather(-1, torch.tensor(ids, device=dev)[:, None]).sum())
    return torch.stack(out)


def content_free_prior(prior: torch.Tensor) -> torch.Tensor:
    """The prior per option order [2, 7] from the content-free log-probs [K, 2, 7]: q_o = softmax(mean_k
    log_softmax(prior[k, o])), the normalised geometric mean over the K inputs. (Zhao et al. average the
    probabilities; the geometric mean makes the identity in `contextual_calibration` exact rather than approximate.)"""
    return F.softmax(F.log_softmax(prior.double(), -1).mean(0), -1)


def contextual_calibration(logp: torch.Tensor, prior: torch.Tensor) -> torch.Tensor:
    """Contextual calibration of [N, 2, 7] answer log-probs by the content-free ones [K, 2, 7], per order,
    -> log p_cal [N, 2, 7] (float64, kept in log space for `log_odds`): p_cal[i, o] =
    softmax(log_softmax(logp[i, o]) - log q_o), q_o = content_free_prior(prior). Identity: adding the same
    bias b to one label's logit in every row (vignettes and content-free alike) leaves p_cal exactly
    unchanged."""
    q = content_free_prior(prior)
    return F.log_softmax(F.log_softmax(logp.double(), -1) - q.clamp_min(1e-300).log(), -1)


def log_odds(logp: torch.Tensor) -> torch.Tensor:
    """log(p_f / (1 - p_f)) of each answer f from normalised log-probs [..., 7]: logp_f - logsumexp_{g != f}
    logp_g. In log space, so a confident model's odds stay exact (no clipping of p near 0 or 1, which would
    cap l and turn a bias that shifts every vignette alike into an uneven one)."""
    others = logp.unsqueeze(-2).expand(*logp.shape, logp.shape[-1]).clone()  # [..., f, g]
    others.diagonal(dim1=-2, dim2=-1).fill_(-math.inf)
    return logp - others.logsumexp(-1)


def metrics(
    logp: torch.Tensor, prefill_nll: torch.Tensor, vigs: list[Vignette], prior: torch.Tensor | None = None
) -> tuple[dict, list[dict]]:
    """Aggregate [N, 2, 7] answer log-probs into the metrics above (the calibrated ones when the content-free
    log-probs `prior` [K, 2, 7] are given); also return per-vignette rows."""
    p = F.softmax(logp, -1).mean(1)  # [N, 7]: choice distribution, averaged over the two orders
    mass = logp.exp().sum(-1).mean(1)  # [N]: answer mass, averaged over orders
    profile = p.mean(0)
    out = {f"{SHORT[f]}_nats": _nats(profile[i]) for i, f in enumerate(FOUNDATIONS)}
    out["profile"] = {f: float(profile[i]) for i, f in enumerate(FOUNDATIONS)}
    out["p_ans_any"] = float(mass.mean())
    out["coherence"] = out["p_ans_any"]
    out["frac_unscorable"] = float((mass < UNSCORABLE).float().mean())
    out["prefill_nll"] = float(prefill_nll.mean())
    out["acc"] = _accuracy(p, vigs)
    pc = lodds = None
    if prior is not None:
        lpc = contextual_calibration(logp, prior)  # [N, 2, 7]: log p_cal
        pc, lodds = lpc.exp().mean(1).float(), log_odds(lpc).mean(1).float()
        q = content_free_prior(prior).mean(0)  # [7]: the prior, both orders
        prof_c = pc.mean(0)
        out |= {cal_key(f"{SHORT[f]}_nats"): _nats(prof_c[i]) for i, f in enumerate(FOUNDATIONS)}
        out |= {f"{SHORT[f]}_prior_nats": _nats(q[i]) for i, f in enumerate(FOUNDATIONS)}
        out["profile_cal"] = {f: float(prof_c[i]) for i, f in enumerate(FOUNDATIONS)}
        out["acc_cal"] = _accuracy(pc, vigs)
        out["prior_logp"] = prior.tolist()  # [K, 2, 7], CONTENT_FREE order: enough to recompute p_cal
    humans = [i for i, v in enumerate(vigs) if v.human]
    if humans:
        tv = []
        for i in humans:
            h = torch.tensor([vigs[i].human[f] for f in FOUNDATIONS], dtype=torch.float32)
            h = h / h.sum().clamp_min(1e-9)
            tv.append(0.5 * float((p[i] - h).abs().sum()))
        out["human_agree"] = 1 - sum(tv) / len(tv)
    out["n_vignettes"] = len(vigs)
    top = p.argmax(-1)
    rows = [
        {
            "id": v.id,
            "label": v.label,
            "top1": FOUNDATIONS[int(top[i])],
            "p_ans_any": float(mass[i]),
            "prefill_nll": float(prefill_nll[i].mean()),
            **{f"p_{SHORT[f]}": float(p[i, j]) for j, f in enumerate(FOUNDATIONS)},
            **({f"pc_{SHORT[f]}": float(pc[i, j]) for j, f in enumerate(FOUNDATIONS)} if pc is not None else {}),
            **({f"lodds_{SHORT[f]}": float(lodds[i, j]) for j, f in enumerate(FOUNDATIONS)} if pc is not None else {}),
            **{f"logp_{SHORT[f]}": [float(logp[i, 0, j]), float(logp[i, 1, j])] for j, f in enumerate(FOUNDATIONS)},
        }
        for i, v in enumerate(vigs)
    ]
    return out, rows


def _nats(x) -> float:
    return math.log(max(float(x), 1e-45))


def _accuracy(p: torch.Tensor, vigs: list[Vignette]) -> float | None:
    """Share of labelled vignettes whose most likely answer is their label (None without labels)."""
    top = p.argmax(-1)
    labelled = [i for i, v in enumerate(vigs) if v.label is not None]
    return sum(FOUNDATIONS[int(top[i])] == vigs[i].label for i in labelled) / len(labelled) if labelled else None


def reference_nll(model, pairs: list[tuple[list[int], list[int]]], pad_id: int, batch_size: int) -> list[list]:
    """Per reference answer: [sum of -log p(token) over its tokens, token count], given its question."""
    from steer_heal.losses import token_nlls

    return [[float(x.sum()), int(x.numel())] for x in token_nlls(model, pairs, pad_id, batch_size, "reference nll")]


def ref_nll(items: list[list]) -> float:
    """Mean NLL per token over all reference answers: sum of their summed NLLs / their token count."""
    return sum(s for s, _ in items) / max(1, sum(n for _, n in items))


@dataclass
class Scored:
    """One eval: its metrics (the `eval` event) and its per-vignette rows (eval_<model>.jsonl)."""

    m: dict
    rows: list[dict]

    @cached_property
    def arm(self):
        """The per-vignette numbers the paired bootstrap resamples (stats.Arm)."""
        from steer_heal.stats import Arm

        return Arm.from_rows(self.rows)


def evaluate(
    model,
    tok,
    vigs: list[Vignette],
    batch_size: int,
    think_tokens: int = 0,
    desc: str = "eval",
    system: str | None = None,
    prior: bool = True,
) -> tuple[dict, list[dict]]:
    """Metrics and per-vignette rows; `system` replaces the default system prompt (prompting baseline); without
    `prior`, no content-free rows and no calibrated metrics (the eval as it was before calibration)."""
    r = answer_logprobs(model, tok, vigs, batch_size, think_tokens, desc, system=system, prior=prior)
    return metrics(r["logp"], r["prefill_nll"], vigs, r.get("prior"))
