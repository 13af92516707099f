"""The strategy ILP against hand-built tables with known answers and against brute force."""

import itertools
import random

import pytest

from planner.ilp import Option, choose_strategies

MIB = 2**20


def test_replicates_when_memory_allows():
    options = {"block": {"replicate": Option(1.0, 100 * MIB), "tensor": Option(1.5, 30 * MIB)}}
    assert choose_strategies(options, {"block": 4}, 1000 * MIB) == {"block": "replicate"}


def test_tensor_parallel_when_memory_forces_it():
    options = {"block": {"replicate": Option(1.0, 100 * MIB), "tensor": Option(1.5, 30 * MIB)}}
    assert choose_strategies(options, {"block": 4}, 200 * MIB) == {"block": "tensor"}


def test_shards_the_kind_that_saves_most_per_second_lost():
    options = {
        "attn": {"replicate": Option(1.0, 50 * MIB), "tensor": Option(1.1, 10 * MIB)},
        "mlp": {"replicate": Option(1.0, 50 * MIB), "tensor": Option(2.0, 20 * MIB)},
    }
    assert choose_strategies(options, {"attn": 1, "mlp": 1}, 70 * MIB) == {"attn": "tensor", "mlp": "replicate"}


def test_infeasible_returns_none():
    options = {"block": {"replicate": Option(1.0, 100 * MIB), "tensor": Option(1.5, 30 * MIB)}}
    assert choose_strategies(options, {"block": 4}, 100 * MIB) is None


def brute_force(options, counts, budget):
    kinds = list(options)
    best = None
    for combo in itertools.product(*(list(options[k]) for k in kinds)):
        memory = sum(counts[k] * options[k][s].memory_bytes for k, s in zip(kinds, combo, strict=True))
        time = sum(counts[k] * options[k][s].time_s for k, s in zip(kinds, combo, strict=True))
        if memory <= budget and (best is None or time < best[0] - 1e-12):
            best = (time, dict(zip(kinds, combo, strict=True)))
    return best


@pytest.mark.parametrize("seed", range(30))
def test_matches_brute_force(seed):
    rng = random.Random(seed)
    options = {f"k{i}": {s: Option(rng.uniform(0.1, 2.0), rng.randint(1, 100) * MIB)
                         for s in ["replicate", "tensor", "other"][: rng.randint(1, 3)]}
               for i in range(rng.randint(1, 5))}
    counts = {k: rng.randint(1, 4) for k in options}
    budget = rng.randint(50, 800) * MIB
    expected = brute_force(options, counts, budget)
    got = choose_strategies(options, counts, budget)
    if expected is None:
        assert got is None
    else:
        time = sum(counts[k] * options[k][s].time_s for k, s in got.items())
        assert time == pytest.approx(expected[0], rel=1e-6)
        assert sum(counts[k] * options[k][s].memory_bytes for k, s in got.items()) <= budget
