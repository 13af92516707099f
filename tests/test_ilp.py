"""The option ILP, its LP screening estimate and the pipeline partitioner, against hand answers and brute force."""

import itertools
import math
import random

import pytest

from planner.ilp import Option, choose_option_counts
from planner.memory_fit import fractional_fit_time_s, group_hull
from planner.partition import partition_chain

MIB = 2**20


def test_replicates_when_memory_allows():
    options = {"block": {"replicate": Option(1.0, 100 * MIB), "tensor": Option(1.5, 30 * MIB)}}
    assert choose_option_counts(options, {"block": 4}, 1000 * MIB) == {"block": {"replicate": 4, "tensor": 0}}


def test_mixes_options_within_a_kind_when_memory_binds():
    options = {"block": {"replicate": Option(1.0, 100 * MIB), "tensor": Option(1.5, 30 * MIB)}}
    # 4 x 100 = 400 does not fit in 300; 2 replicated + 2 sharded = 260 does, 3 + 1 = 330 does not
    assert choose_option_counts(options, {"block": 4}, 300 * MIB) == {"block": {"replicate": 2, "tensor": 2}}


def test_shards_the_kind_that_saves_most_per_second_lost():
    options = {
        "attn": {"replicate": Option(1.0, 50 * MIB), "tensor": Option(1.1, 10 * MIB)},
        "mlp": {"replicate": Option(1.0, 50 * MIB), "tensor": Option(2.0, 20 * MIB)},
    }
    assert choose_option_counts(options, {"attn": 1, "mlp": 1}, 70 * MIB) == {
        "attn": {"replicate": 0, "tensor": 1}, "mlp": {"replicate": 1, "tensor": 0}}


def test_infeasible_returns_none():
    options = {"block": {"replicate": Option(1.0, 100 * MIB), "tensor": Option(1.5, 30 * MIB)}}
    assert choose_option_counts(options, {"block": 4}, 100 * MIB) is None
    hull = group_hull(list(options["block"].values()))
    assert fractional_fit_time_s([(hull, 4)], 100 * MIB) == math.inf


def brute_force(options, counts, budget):
    """Every layer of every group picks independently: the ILP's counts must match the best of these."""
    slots = [(g, o) for g in options for _ in range(counts[g]) for o in [list(options[g])]]
    best = None
    for combo in itertools.product(*(opts for _, opts in slots)):
        memory = sum(options[g][o].memory_bytes for (g, _), o in zip(slots, combo, strict=True))
        time = sum(options[g][o].time_s for (g, _), o in zip(slots, combo, strict=True))
        if memory <= budget and (best is None or time < best - 1e-12):
            best = time
    return best


def random_instance(rng):
    options = {f"g{i}": {f"o{j}": Option(rng.uniform(0.1, 2.0), rng.randint(1, 100) * MIB)
                         for j in range(rng.randint(1, 4))}
               for i in range(rng.randint(1, 3))}
    counts = {g: rng.randint(1, 3) for g in options}
    return options, counts, rng.randint(20, 600) * MIB


@pytest.mark.parametrize("seed", range(40))
def test_ilp_matches_brute_force_and_lp_bound_is_below(seed):
    options, counts, budget = random_instance(random.Random(seed))
    expected = brute_force(options, counts, budget)
    got = choose_option_counts(options, counts, budget)
    hulls = [(group_hull(list(opts.values())), counts[g]) for g, opts in options.items()]
    relaxed = fractional_fit_time_s(hulls, budget)
    if expected is None:
        assert got is None
        assert relaxed == math.inf
        return
    assert all(sum(c.values()) == counts[g] for g, c in got.items())
    time = sum(options[g][o].time_s * n for g, c in got.items() for o, n in c.items())
    memory = sum(options[g][o].memory_bytes * n for g, c in got.items() for o, n in c.items())
    assert time == pytest.approx(expected, rel=1e-6)
    assert memory <= budget
    assert relaxed <= time * (1 + 1e-9)


def brute_force_partition(num_layers, num_stages, cost):
    best = None
    for cuts in itertools.combinations(range(1, num_layers), num_stages - 1):
        starts = [0, *cuts]
        ends = [*cuts, num_layers]
        bottleneck = max(cost(k, s, e) for k, (s, e) in enumerate(zip(starts, ends, strict=False)))
        if best is None or bottleneck < best:
            best = bottleneck
    return best


@pytest.mark.parametrize("seed", range(40))
def test_partition_matches_brute_force(seed):
    rng = random.Random(seed)
    n = rng.randint(1, 9)
    stages = rng.randint(1, min(n, 4))
    times = [rng.uniform(0.1, 3.0) for _ in range(n)]
    memory = [rng.randint(1, 10) for _ in range(n)]
    in_flight = [stages - k for k in range(stages)]  # 1F1B: earlier stages hold more micro-batches
    limit = rng.randint(5, 60)

    def cost(stage, start, end):
        if sum(memory[start:end]) * in_flight[stage] > limit:
            return math.inf
        return sum(times[start:end])

    expected = brute_force_partition(n, stages, cost)
    found = partition_chain(n, stages, cost)
    if expected is None or expected == math.inf:
        assert found is None
    else:
        starts, bottleneck = found
        assert len(starts) == stages and starts[0] == 0 and starts == sorted(set(starts))
        assert bottleneck == pytest.approx(expected, rel=1e-5)


def peak_bytes(options, slots, combo):
    """What the ILP's legend says a full assignment needs: held bytes + max(activations + largest buffers,
    gradients)."""
    chosen = [options[g][o] for (g, _), o in zip(slots, combo, strict=True)]
    varying = max(sum(c.activation_bytes for c in chosen) + max(c.working_bytes for c in chosen)
                  + max(c.gathered_bytes for c in chosen), sum(c.gradient_bytes for c in chosen))
    return sum(c.memory_bytes for c in chosen) + varying


@pytest.mark.parametrize("seed", range(30))
def test_ilp_with_buffers_and_gradients_matches_brute_force(seed):
    rng = random.Random(1000 + seed)
    options = {f"g{i}": {f"o{j}": Option(rng.uniform(0.1, 2.0), rng.randint(1, 40) * MIB,
                                         activation_bytes=rng.randint(0, 40) * MIB,
                                         gradient_bytes=rng.randint(0, 60) * MIB,
                                         working_bytes=rng.choice([0, rng.randint(1, 50)]) * MIB,
                                         gathered_bytes=rng.choice([0, rng.randint(1, 50)]) * MIB)
                         for j in range(rng.randint(1, 3))}
               for i in range(rng.randint(1, 3))}
    counts = {g: rng.randint(1, 3) for g in options}
    budget = rng.randint(50, 500) * MIB
    slots = [(g, list(options[g])) for g in options for _ in range(counts[g])]
    best = None
    for combo in itertools.product(*(opts for _, opts in slots)):
        if peak_bytes(options, slots, combo) <= budget:
            time = sum(options[g][o].time_s for (g, _), o in zip(slots, combo, strict=True))
            best = time if best is None else min(best, time)
    got = choose_option_counts(options, counts, budget)
    hulls = [(group_hull(list(opts.values())), counts[g]) for g, opts in options.items()]
    if best is None:
        assert got is None
        return
    combo = [o for g, c in got.items() for o, k in c.items() for _ in range(k)]
    ordered_slots = [(g, list(options[g])) for g, c in got.items() for _ in range(sum(c.values()))]
    assert peak_bytes(options, ordered_slots, combo) <= budget
    assert sum(options[g][o].time_s for (g, _), o in zip(ordered_slots, combo, strict=True)) == pytest.approx(best)
    assert fractional_fit_time_s(hulls, budget) <= best * (1 + 1e-9)  # the screening stays a lower bound


def test_the_solver_prints_nothing_on_stdout():
    """HiGHS's library prints a banner on fd 1 when a process builds its first solver; `meshplan plan`'s
    stdout must hold only meshplan's output, so a fresh process that solves an ILP prints nothing."""
    import subprocess
    import sys

    code = ("from planner.ilp import Option, choose_option_counts\n"
            "print(choose_option_counts({'b': {'r': Option(1.0, 1.0)}}, {'b': 2}, 10.0), end='')")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "{'b': {'r': 2}}", done.stdout
