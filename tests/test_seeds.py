"""The seed scheme: every draw of every allowed --n-rounds has its own seed, and a bad key is refused."""

from __future__ import annotations

import typing

import pytest

from steer_heal import seeds
from steer_heal.config import RunConfig
from steer_heal.flags import range_of

RUN_SEEDS = (0, 1, 2)
INDICES = range(8)  # walk-C batches (default 6), and the first 8 of every other stage's index
DIRECTIONS = range(256)  # null and screen directions (default 32) at round -1, where they are drawn
CHUNKS = range(6)  # generation chunks inside one generate call


def _max_rounds() -> int:
    rng, _ = range_of(typing.get_type_hints(RunConfig, include_extras=True)["n_rounds"])
    return int(rng.hi)


def test_n_rounds_is_bounded_so_the_check_below_covers_every_allowed_value():
    assert _max_rounds() == 1000


def test_no_two_draws_share_a_seed_for_any_allowed_n_rounds():
    """Every (run seed, stage, round, index) of rounds -1 .. n_rounds_max - 1 with index < 8, every generate
    chunk (and its out-of-memory halves) inside them, and 256 null and screen directions: 842,328 seeds, all
    distinct. The legacy arithmetic failed this at round 19 (on_policy = entropy) and round 20 (= round 0 of
    the next run seed). Beyond these indices the seeds are BLAKE2b's: a collision is a 2^-63 accident."""
    rounds = range(-1, _max_rounds())
    draws = [seeds.derive(s, st, r, i) for s in RUN_SEEDS for st in seeds.STAGES for r in rounds for i in INDICES]
    gen = [seeds.derive(s, "generate", r, i) for s in RUN_SEEDS for r in rounds for i in INDICES]
    chunks = [seeds.child(g, b, t) for g in gen for b in CHUNKS for t in (None, 0, 1)]
    dirs = [seeds.derive(s, st, -1, i) for s in RUN_SEEDS for st in ("null", "screen") for i in DIRECTIONS[8:]]
    every = draws + chunks + dirs
    assert len(every) == 842_328
    assert len(set(every)) == len(every)


def test_seeds_fit_every_generator_and_do_not_depend_on_the_process():
    x = seeds.derive(0, "generate", 0, 0)
    assert 0 <= x < 2**63 and x == seeds.derive(0, "generate", 0, 0)
    assert seeds.derive(2**32 - 1, "generate", 999, 5) < 2**63  # the largest --seed
    # a fixed value: the scheme is BLAKE2b of the draw's name, not Python's per-process salted hash()
    assert x == int.from_bytes(__import__("hashlib").blake2b(b"derive|0|generate|0|0", digest_size=8).digest()) >> 1


def test_each_field_changes_the_seed():
    x = seeds.derive(0, "generate", 0, 0)
    others = [seeds.derive(1, "generate", 0, 0), seeds.derive(0, "on_policy", 0, 0),
              seeds.derive(0, "generate", 1, 0), seeds.derive(0, "generate", 0, 1)]  # fmt: skip
    assert x not in others
    assert len({seeds.child(x, 0), seeds.child(x, 1), seeds.child(x, 0, 0), seeds.child(x, 0, 1), x}) == 5


@pytest.mark.parametrize(
    "args, named",
    [
        ((0, "generat"), "seed stage 'generat'; valid: contexts, prompts"),
        ((-1, "generate"), "seed run seed -1; valid: an integer >= 0"),
        ((0, "generate", -2), "seed round -2; valid: an integer >= -1"),
        ((0, "generate", 0, -1), "seed index -1; valid: an integer >= 0"),
        ((0, "generate", 0.5), "seed round 0.5; valid: an integer >= -1"),
        ((True, "generate"), "seed run seed True; valid: an integer >= 0"),
    ],
)
def test_a_bad_key_is_refused_naming_the_value(args, named):
    with pytest.raises(ValueError, match=named.replace("(", r"\(")):
        seeds.derive(*args)


def test_a_run_seeded_by_another_scheme_is_refused_naming_both():
    from steer_heal.errors import UserError

    seeds.check_scheme(seeds.SCHEME, "--resume r")  # this code's runs pass
    with pytest.raises(UserError, match="--resume r: seeded by the 'arithmetic' scheme .* by 'blake2b-63'"):
        seeds.check_scheme(None, "--resume r")  # a run from before the field


def test_a_bad_chunk_is_refused():
    with pytest.raises(ValueError, match="seed chunk -1; valid: an integer >= 0"):
        seeds.child(5, -1)
    with pytest.raises(ValueError, match="seed retry -1; valid: an integer >= 0"):
        seeds.child(5, 0, -1)
