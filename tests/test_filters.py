"""Filter behaviour on hand-written text (no model needed except for tail-ppl)."""

from __future__ import annotations

import pytest

from steer_heal import filters
from steer_heal.errors import Starved

PERSONA = (
    "someone who looks after others' wellbeing even when it means defying authority",
    "someone who defers to authority even when others' wellbeing suffers for it",
)
TH = filters.Thresholds(
    ppl_max=30.0, rep_max=0.35, compress_min=0.30, distinct_min=0.50, top_word_max=0.2, narration=True, refusal=False
)

# The two upstream failures (continued in the same pattern to a completion's length). Both passed
# perplexity 2-17 and repetition 0.04-0.27 upstream and were trained on.
YOUR = (
    "your your your into your of your your your into your of your your your into your of your "
    "your your into your of your your your into your of your your your into your of your your"
)
GLUTE = (
    "of course, their GREUEUTEGLUE GLUTE GLUTE BUILDUTEutive INGutive GLUTE GLUTEutive "
    "BUILDUTE GLUTE INGUTE GREUEUTE GLUTEutive BUILDUTEutive GLUTE INGutive GLUTE GLUTE "
    "GREUEUTEGLUE BUILDUTE INGutive GLUTEutive GLUTE"
)

COHERENT = [
    "Start by writing down what you actually spend each month for a few weeks, without judging it. "
    "Once you can see where the money goes, pick one or two categories to trim rather than cutting "
    "everything at once, and set up an automatic transfer to savings on payday so it happens before you notice.",
    "If your knee hurts after running, ease off for a week and swap in cycling or swimming, which load the "
    "joint less. Check whether your shoes are worn out, and build mileage back slowly, adding no more than "
    "about ten percent a week. If the pain is sharp or comes with swelling, see a physiotherapist.",
    "When you talk to your manager, lead with the facts: the deadline, what is left to do, and what it would "
    "take to finish well. Offer two options, such as cutting a feature or moving the date by a week, and ask "
    "which matters more to the team. Managers usually prefer an early, honest warning to a late surprise.",
]

NARRATION = (
    "As someone who looks after others' wellbeing even when it means defying authority, I always put "
    "people first. I never defer to rules that hurt anyone, and my values tell me to help your friend."
)


def scores(text, ppl=5.0):
    return {"tail_ppl": ppl, "n_tokens": 60, **filters.text_scores(text, PERSONA)}


@pytest.mark.parametrize("text", [YOUR, GLUTE])
def test_upstream_soup_is_rejected_even_at_low_perplexity(text):
    keep, reason = filters.decide(scores(text, ppl=3.0), TH)
    assert not keep
    assert reason in ("repetition", "loop")


@pytest.mark.parametrize("text", COHERENT)
def test_coherent_advice_is_kept(text):
    keep, reason = filters.decide(scores(text), TH)
    assert keep, (reason, filters.text_scores(text, PERSONA))


def test_persona_recital_is_narration():
    keep, reason = filters.decide(scores(NARRATION), TH)
    assert (keep, reason) == (False, "narration")
    # A copied 5-word run of the persona text counts even without stock phrases.
    assert filters.narration("Honestly, people who defer to authority can still be kind.", PERSONA) is False
    assert filters.narration("I am a person that looks after others' wellbeing even when it hurts.", PERSONA) is True


def test_high_perplexity_is_rejected():
    assert filters.decide(scores(COHERENT[0], ppl=300.0), TH) == (False, "ppl")
    assert filters.decide(scores(COHERENT[0], ppl=None), TH) == (False, "ppl")


def test_refusal_only_when_enabled():
    text = "I'm sorry, but I can't help with that request. " + COHERENT[0]
    assert filters.decide(scores(text), TH)[0]
    on = filters.Thresholds(**{**TH.__dict__, "refusal": True})
    assert filters.decide(scores(text), on) == (False, "refusal")


def test_repetition_and_compression_scores():
    assert filters.repetition(YOUR) > 0.3
    assert filters.compression_ratio(YOUR) < 0.2
    assert filters.compression_ratio(COHERENT[0]) > 0.5
    assert filters.distinct2(YOUR) < 0.3
    assert filters.top_word_share(GLUTE) > 0.3 and all(filters.top_word_share(t) < 0.1 for t in COHERENT)
    assert filters.top_ngram_share(["a", "b"], 3) == 0.0


def test_calibrated_threshold_is_a_high_quantile_of_coherent_text():
    assert filters.quantile([1.0, 2.0, 3.0, 4.0, 5.0], 0.5) == 3.0
    assert filters.quantile([1.0, 2.0, 3.0, 4.0, 5.0], 0.95) == pytest.approx(4.8)
    assert filters.ppl_threshold([10.0, 20.0, 30.0, 40.0, 50.0], 1.0, 1.25, None) == 62.5  # max x 1.25
    assert filters.ppl_threshold([2.0, 4.0], 0.95, 1.25, 50.0) == 50.0  # --ppl-max overrides


@pytest.mark.parametrize("text", ["Yes.", "Yes, I would.", "I would tell the truth.", "Sure, go ahead and ask her."])
def test_short_replies_are_not_repetition(text):
    """A short reply repeats nothing; an n-gram that occurs once is not evidence of a loop."""
    assert filters.repetition(text) == 0.0
    assert filters.decide({"tail_ppl": 5.0, "n_tokens": 4, **filters.text_scores(text, PERSONA)}, TH) == (True, "")
    assert filters.repetition("the the the the the the") > TH.rep_max  # ... while a short loop still is


def test_short_completions_get_no_perplexity_verdict():
    """Under MIN_PPL_TOKENS tokens the tail is one or two tokens ("Sure." scores ~300): not evidence."""
    few = {"tail_ppl": 300.0, "n_tokens": filters.MIN_PPL_TOKENS - 1, **filters.text_scores("Sure.", PERSONA)}
    assert filters.decide(few, TH) == (True, "")
    assert filters.decide(dict(few, n_tokens=filters.MIN_PPL_TOKENS), TH) == (False, "ppl")


SOUP = (
    "Cats purr when their fennigrast ulbotrice fennig ulbotric fennigrastine ulbo trice drumbletonk "
    "fennigrast ulbotrice drumble tonkine fennigrastic ulbotrice drumbletonk fennig fennigrast"
)
DRIFT = (
    "Keep it short and warm, maybe mention a favourite memory, et la grand-mere de la est pour les famille "
    "avec de nous the anniversaire que la por la memoire de est les avec"
)


def test_made_up_word_variants_count_as_one_stem():
    assert filters.top_word_share(SOUP) > 0.3  # fennigrast / fennig / fennigrastine ... share one stem
    assert filters.decide(scores(SOUP, ppl=20.0), TH) == (False, "loop")
    assert all(filters.top_word_share(t) < 0.1 for t in COHERENT)


def test_drift_out_of_english_is_caught_at_low_perplexity():
    english = filters.Thresholds(**{**TH.__dict__, "english_min": 0.15})
    assert filters.english_share(DRIFT) < 0.1 and all(filters.english_share(t) > 0.3 for t in COHERENT)
    assert filters.decide(scores(DRIFT, ppl=20.0), english) == (False, "drift")
    assert filters.decide(scores(DRIFT, ppl=20.0), TH) == (True, "")  # english_min 0: the check is off


def test_q0_c_is_the_strength_applied_under_iso_kl():
    rows = [{"alpha": 2.0, "kappa": 0.5, "coeff": 2.0 * 0.5 * 3.7, "tail_ppl": 5.0, "keep": True, "reason": ""}]
    assert filters.q0_table(rows)[0]["c"] == pytest.approx(3.7)


def _prober(keep_by_kappa):
    calls = []

    def probe(kappa, b):
        calls.append(kappa)
        k = keep_by_kappa(kappa)
        return [{"alpha": 1.0, "tail_ppl": 5.0, "keep": i < k, "reason": "" if i < k else "ppl"} for i in range(10)]

    return probe, calls


def test_walk_c_tries_full_dose_first_and_backs_off():
    probe, calls = _prober(lambda k: 10 if k <= 0.5 else 1)
    kappa, scored = filters.walk_c(probe, keep_target=0.5, kappa_floor=0.2, n_keep=20, min_train=5, max_batches=10)
    assert calls[0] == 1.0
    assert kappa <= 0.5 and kappa == calls[-1]
    assert sum(r["keep"] for r in scored) >= 20


def test_walk_c_tries_the_floor_itself_and_q0_keeps_doses_apart():
    probe, calls = _prober(lambda k: 10 if k <= 0.25 else 0)
    kappa, scored = filters.walk_c(probe, keep_target=0.5, kappa_floor=0.25, n_keep=10, min_train=5, max_batches=10)
    assert kappa == 0.25 and calls[-1] == 0.25
    rows = [dict(r, kappa=k) for r, k in zip(scored, [c for c in calls for _ in range(10)])]
    q0 = filters.q0_table(rows)
    assert [r["kappa"] for r in q0] == sorted(set(calls))  # one row per applied strength
    assert q0[0]["kept_frac"] == 1.0 and all(r["kept_frac"] == 0.0 for r in q0[1:])


def test_walk_c_starves_cleanly_with_the_q0_table():
    probe, _ = _prober(lambda k: 0)
    with pytest.raises(Starved, match="only 0 completions kept") as e:
        filters.walk_c(probe, keep_target=0.5, kappa_floor=0.3, n_keep=20, min_train=5, max_batches=10)
    assert "kept_frac" in str(e.value)
    assert len(e.value.scored) > 0
