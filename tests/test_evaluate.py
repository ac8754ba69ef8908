"""Vignette loading and the nats metrics."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from steer_heal import data, evaluate
from steer_heal.errors import UserError

SAMPLE = Path(__file__).resolve().parents[2] / "shared" / "data" / "mfv_schema_sample.jsonl"


def test_loads_shipped_set_balanced():
    src, vigs = data.vignettes(None)
    assert len(vigs) >= 126
    for f in data.FOUNDATIONS:
        assert sum(v.label == f for v in vigs) >= 18
    first = data.balanced(vigs, 14)
    assert sorted(v.label for v in first) == sorted(list(data.FOUNDATIONS) * 2)


@pytest.mark.skipif(not SAMPLE.exists(), reason="needs ../shared beside the checkout")
def test_loads_tinymfv_sample_with_human_distributions():
    _, vigs = data.vignettes(str(SAMPLE))
    assert len(vigs) == 7
    assert {v.label for v in vigs} == set(data.FOUNDATIONS)
    assert all(v.human is not None and sum(v.human.values()) > 0 for v in vigs)


def test_unknown_label_names_the_line(tmp_path):
    p = tmp_path / "v.jsonl"
    p.write_text(
        '{"id": "a", "text": "x", "foundation_coarse": "Care"}\n'
        '{"id": "b", "text": "y", "foundation_coarse": "Purity"}\n'
    )
    with pytest.raises(UserError, match=r"v.jsonl:2: field foundation_coarse: 'Purity' must be 'Care', "):
        data.vignettes(str(p))
    p.write_text('{"id": "a"}\n')
    with pytest.raises(UserError, match=r"v.jsonl:1: missing field"):
        data.vignettes(str(p))


def _rated(**human) -> str:
    ratings = {f"human_{f.replace(' ', '')}": 10.0 for f in data.FOUNDATIONS} | human
    return json.dumps({"id": "b", "text": "y", "foundation_coarse": "Care", **ratings})


@pytest.mark.parametrize(
    "line, message",
    [
        (_rated(human_Care=float("nan")), "v.jsonl:3: field human_Care: nan must be a finite number >= 0"),
        (_rated(human_Liberty="lots"), "v.jsonl:3: field human_Liberty: 'lots' must be a valid number"),
        (_rated(human_Fairness=-5), "v.jsonl:3: field human_Fairness: -5 must be a finite number >= 0"),
        (_rated(**{f"human_{f.replace(' ', '')}": 0 for f in data.FOUNDATIONS}), "v.jsonl:3: the seven human_* "),
        (_rated()[:-1].rsplit(", ", 1)[0] + "}", "v.jsonl:3: has human_Care but not ['human_SocialNorms']"),
    ],
    ids=["nan", "text", "negative", "all zero", "partial"],
)
def test_a_bad_human_rating_is_refused_naming_file_line_and_field(tmp_path, line, message):
    # refused, not skipped: one NaN made human_agree null in every eval, and a vignette without ratings already
    # has a way to say so (no human_* fields at all)
    p = tmp_path / "v.jsonl"
    p.write_text('{"id": "a", "text": "x", "foundation_coarse": "Care"}\n\n' + line + "\n")
    with pytest.raises(UserError) as e:
        data.vignettes(str(p))
    assert message in str(e.value) and "\n" not in str(e.value)
    p.write_text('{"id": "a", "text": "x", "foundation_coarse": "Care"}\n\n' + _rated() + "\n")
    assert [v.human for v in data.vignettes(str(p))[1]][0] is None  # no ratings: none, as before
    assert data.vignettes(str(p))[1][1].human["Care"] == 10.0


def test_all_mass_on_one_option():
    vigs = [data.Vignette(str(i), "t", "Authority") for i in range(3)]
    logp = torch.full((3, 2, 7), -30.0)
    logp[..., data.FOUNDATIONS.index("Authority")] = 0.0
    m, rows = evaluate.metrics(logp, torch.zeros(3, 2), vigs)
    assert m["auth_nats"] == pytest.approx(0.0, abs=1e-6)
    assert m["care_nats"] < -20
    assert m["p_ans_any"] == pytest.approx(1.0, abs=1e-6)
    assert m["acc"] == 1.0 and m["frac_unscorable"] == 0.0
    assert len(rows) == 3 and rows[0]["top1"] == "Authority"


def test_orders_average_and_mass():
    vigs = [data.Vignette("0", "t", "Care")]
    logp = torch.full((1, 2, 7), -math.inf)
    logp[0, 0, 0] = math.log(0.4)  # forward order: all choice on Care, mass 0.4
    logp[0, 1, 1] = math.log(0.2)  # reversed order: all choice on Fairness, mass 0.2
    m, _ = evaluate.metrics(logp, torch.zeros(1, 2), vigs)
    assert m["profile"]["Care"] == pytest.approx(0.5) and m["profile"]["Fairness"] == pytest.approx(0.5)
    assert m["p_ans_any"] == pytest.approx(0.3)
    assert m["frac_unscorable"] == 1.0


def test_reversed_order_reverses_the_prompt():
    fwd = evaluate.prompt_text("X", reverse=False)
    rev = evaluate.prompt_text("X", reverse=True)
    pos = lambda s: [s.index(f) for f in data.FOUNDATIONS]  # noqa: E731
    assert pos(fwd) == sorted(pos(fwd))
    assert pos(rev) == sorted(pos(rev), reverse=True)


def test_label_tokens_continue_the_prefill(tiny):
    _, tok = tiny
    ids = evaluate.label_ids(tok)
    assert len(ids) == 7 and all(ids)
    assert len({i[0] for i in ids}) == 7  # SmolLM2: first tokens are distinct, so one pass suffices


def test_full_label_scoring_agrees_with_first_token_scoring(tiny):
    """The path used when labels share a first token scores whole label sequences: equal to the
    first-token log-prob for one-token labels, and never above it for longer ones."""
    model, tok = tiny
    vigs = [data.Vignette("0", "Someone cuts in line.", "Social Norms")]
    first = evaluate.answer_logprobs(model, tok, vigs, 4)["logp"]
    full = evaluate.answer_logprobs(model, tok, vigs, 4, force_full=True)["logp"]
    for j, ids in enumerate(evaluate.label_ids(tok)):
        for o in range(2):
            if len(ids) == 1:
                assert float(full[0, o, j]) == pytest.approx(float(first[0, o, j]), abs=1e-4)
            else:
                assert float(full[0, o, j]) <= float(first[0, o, j]) + 1e-5


def test_hub_vignettes_go_through_datasets_and_the_same_validation(tmp_path, monkeypatch):
    """hf:<repo>:<config> asks `datasets` for the config's third-person split, caches it as JSONL and
    validates it like a file (no network here: a stand-in `datasets` module records the call)."""
    import sys
    import types

    calls = []
    rows = [
        {"id": "c1", "text": "Someone kicks a dog.", "foundation_coarse": "Care", "wrong": 4.1},
        {"id": "a1", "text": "A student mocks the teacher.", "foundation_coarse": "Authority", "wrong": 3.2},
    ]

    def load_dataset(repo, config, split):
        calls.append((repo, config, split))
        return rows

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    monkeypatch.setenv("STEER_HEAL_CACHE", str(tmp_path))
    src, vigs = data.vignettes("hf:wassname/tiny-mfv:classic")
    assert calls == [("wassname/tiny-mfv", "classic", "other_violate")]
    assert src == "hf:wassname/tiny-mfv:classic" and [v.label for v in vigs] == ["Care", "Authority"]
    data.vignettes("hf:wassname/tiny-mfv:classic:self_violate")
    assert calls[-1][2] == "self_violate"
    rows.append({"id": "x", "text": "?", "foundation_coarse": "Purity"})
    with pytest.raises(UserError, match="field foundation_coarse: 'Purity' must be"):
        data.vignettes("hf:wassname/tiny-mfv:classic")
    with pytest.raises(UserError, match="expected hf:<org/name>:<config>"):
        data.vignettes("hf:wassname/tiny-mfv")


@pytest.mark.parametrize("c", [0.0, 4.0])
def test_shared_prefix_eval_equals_the_plain_pass(tiny, c):
    """The tree (common prefix once, each scenario once for both orders) gives the plain pass's numbers,
    steered or not, with batches that split the vignettes unevenly."""
    from steer_heal.hooks import steer

    model, tok = tiny
    _, vigs = data.vignettes(None)
    vigs = data.balanced(vigs, 11)
    g = torch.Generator().manual_seed(0)
    v = {1: torch.randn(model.config.hidden_size, generator=g), 2: torch.randn(model.config.hidden_size, generator=g)}
    with steer(model, v, c):
        tree = evaluate.answer_logprobs(model, tok, vigs, 6, shared_prefix=True)
        plain = evaluate.answer_logprobs(model, tok, vigs, 6, shared_prefix=False)
    assert torch.allclose(tree["logp"], plain["logp"], atol=1e-4)
    assert torch.allclose(tree["prefill_nll"], plain["prefill_nll"], atol=1e-4)


def test_reference_nll_is_the_mean_token_nll_of_the_answers(tiny):
    from steer_heal.losses import completion_batch, naive_logprobs, token_logprob
    from steer_heal.tokens import chat_ids

    model, tok = tiny
    qa = [("How do I boil an egg?", "Put it in boiling water."), ("Hi", "Hello there, how can I help?")]
    pairs = [(chat_ids(tok, q), tok(a, add_special_tokens=False).input_ids) for q, a in qa]
    items = evaluate.reference_nll(model, pairs, tok.pad_token_id, 2)
    b = completion_batch(pairs, tok.pad_token_id, "cpu")
    with torch.no_grad():
        nll = -token_logprob(naive_logprobs(model, b), b["targets"])
    assert [n for _, n in items] == [len(a) for _, a in pairs]
    assert evaluate.ref_nll(items) == pytest.approx(float(nll.mean()), rel=1e-5)


def _labelled_logp(n_per: int = 6, seed: int = 0) -> tuple[torch.Tensor, list[data.Vignette]]:
    """Answer log-probs [N, 2, 7] (answer mass < 1) for n_per vignettes of each foundation."""
    g = torch.Generator().manual_seed(seed)
    vigs = [data.Vignette(f"{f}{i}", "t", f) for i in range(n_per) for f in data.FOUNDATIONS]
    return torch.randn(len(vigs), 2, 7, generator=g) - 2.0, vigs


def test_calibration_divides_out_the_content_free_prior():
    """p_cal = p / q renormalised per order: a vignette answered exactly like the content-free prompt comes
    out uniform, and a logit bias the same on every input leaves p_cal unchanged."""
    prior = torch.randn(3, 2, 7, generator=torch.Generator().manual_seed(1))
    q = evaluate.content_free_prior(prior)  # [2, 7]
    like_prior = q.log()[None] - 1.0  # answers in the prior's proportions, mass e^-1
    uniform = torch.full((1, 2, 7), 1 / 7, dtype=q.dtype)
    assert torch.allclose(evaluate.contextual_calibration(like_prior, prior).exp(), uniform)
    logp, _ = _labelled_logp()
    bias = torch.zeros(7)
    bias[data.FOUNDATIONS.index("Authority")] = -1.5
    calibrated = evaluate.contextual_calibration
    assert torch.allclose(calibrated(logp + bias, prior + bias), calibrated(logp, prior))


def test_log_odds_move_by_exactly_a_logit_bias_however_confident_the_model():
    """l = log(p / (1 - p)) of a softmax: a bias b on one logit moves that answer's log-odds by b, at p = 0.01 or
    p = 0.99 alike (log p itself would move by ~b at the first and ~0 at the second), and at p ~ 1e-22 or
    1 - 1e-22, where clipping p (the first version) capped l and the bias vanished."""
    logits = torch.tensor([[-4.0, 0.0, 0.0], [5.0, 0.0, 0.0], [-50.0, 0.0, 0.0], [50.0, 0.0, 0.0]], dtype=torch.float64)
    bias = torch.tensor([1.3, 0.0, 0.0], dtype=torch.float64)
    lo = lambda z: evaluate.log_odds(torch.log_softmax(z, -1))[:, 0]  # noqa: E731
    assert torch.allclose(lo(logits + bias) - lo(logits), torch.full((4,), 1.3, dtype=torch.float64))
    assert torch.allclose(lo(logits)[:2], torch.tensor([-4.0 - math.log(2), 5.0 - math.log(2)], dtype=torch.float64))


def _arms(logp, prior, vigs):
    from steer_heal.stats import Arm

    m, rows = evaluate.metrics(logp, torch.zeros(logp.shape[:2]), vigs, prior)
    return m, Arm.from_rows(rows)


def test_a_prior_shift_moves_the_raw_trait_only_and_a_judgement_shift_moves_the_discriminative_one():
    """The answer word's prior falls by 1.5 nats on every input: raw shift ~ -1.5, calibrated and discriminative
    exactly 0. The model instead blames Authority less only on the Authority-labelled vignettes (the content-free
    prompt unchanged): the discriminative shift is negative with an interval that excludes 0."""
    from steer_heal import stats

    logp, vigs = _labelled_logp()
    prior = torch.randn(3, 2, 7, generator=torch.Generator().manual_seed(2)) - 2.0
    j = data.FOUNDATIONS.index("Authority")
    bias = torch.zeros(7)
    bias[j] = -1.5
    m0, base = _arms(logp, prior, vigs)
    m1, moved_prior = _arms(logp + bias, prior + bias, vigs)
    idx = stats.resamples(len(vigs), 500, 0)
    raw, cal, disc = (stats.shift(k, moved_prior, base, "Authority", idx) for k in stats.TRAITS)
    assert raw[0] < -0.8 and abs(cal[0]) < 1e-6 and abs(disc[0]) < 1e-6
    assert m1["auth_prior_nats"] - m0["auth_prior_nats"] < -0.8  # the prior itself is what moved
    assert np.nanmax(np.abs(disc[1])) < 1e-6  # on every resample (NaN: one drew no Authority vignette)
    on = torch.tensor([v.label == "Authority" for v in vigs])
    judged = logp.clone()
    judged[on, :, j] -= 1.5
    _, moved_judgement = _arms(judged, prior, vigs)
    e = stats.shift_est("disc", moved_judgement, base, "Authority", idx)
    assert e["est"] == pytest.approx(-1.5, abs=1e-5) and e["hi"] < 0  # a logit bias on those vignettes only
    # a prior that moves more in context than out of it (calibration under-corrects): a bias left on the calibrated
    # logit of every vignette, the confident ones too, still gives a discriminative shift of exactly 0
    confident = logp.clone()
    confident[on, :, j] += 6.0  # the model is sure about the Authority vignettes
    _, base_c = _arms(confident, prior, vigs)
    _, left_over = _arms(confident + bias, prior, vigs)
    assert stats.shift("cal", left_over, base_c, "Authority", idx)[0] < -0.3  # the calibrated trait does move
    assert abs(stats.shift("disc", left_over, base_c, "Authority", idx)[0]) < 1e-5


def test_a_model_whose_answer_word_prior_shifts_has_no_discriminative_shift(tiny):
    """End to end through the eval: a bias on the " Authority" logit at every position (the prior moves, no
    judgement does) shifts the raw trait, while the calibrated and discriminative traits stay ~0."""
    from steer_heal import stats

    model, tok = tiny
    _, vigs = data.vignettes(None)
    vigs = data.balanced(vigs, 21)
    tid = evaluate.label_ids(tok)[data.FOUNDATIONS.index("Authority")][0]

    def bias(module, args, out):
        out[..., tid] -= 2.0
        return out

    base = evaluate.Scored(*evaluate.evaluate(model, tok, vigs, 8))
    handle = model.get_output_embeddings().register_forward_hook(bias)
    try:
        moved = evaluate.Scored(*evaluate.evaluate(model, tok, vigs, 8))
    finally:
        handle.remove()
    idx = stats.resamples(len(vigs), 200, 0)
    raw, cal, disc = (stats.shift_est(k, moved.arm, base.arm, "Authority", idx) for k in stats.TRAITS)
    assert raw["est"] < -1.0 and raw["hi"] < 0
    assert abs(cal["est"]) < 1e-3 and abs(disc["est"]) < 1e-3
