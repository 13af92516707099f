"""Price one ParallelConfig: cut the chain into stages, choose every layer's option, predict time and memory.

Time model. Every (layer, option) gets a unit time u = t_micro + t_step / F, where t_micro is its time per
micro-batch (compute, recompute, tensor-parallel all-reduces, activation offload), t_step its once-per-step
time (exposed data-parallel communication, optimizer update, model-state offload), and
F = m + (pp - 1) / v the pipeline step factor (m micro-batches, v virtual stages; F = m without a pipeline).
A rank's step time is F * (sum of its layers' u + pipeline sends per micro-batch); the step is the slowest
rank. So minimising the sum of u on a rank is exactly minimising its step time, which lets one ILP per rank
choose options with the pipeline bubble and once-per-step costs weighed correctly.

Overlap: a layer's data-parallel gathers and reductions hide together behind the windows
`data_parallel_windows_s` picks (costmodel/overlap.py); tensor-parallel collectives behind their own phase
and pipeline sends behind their own duration, each by the profile's overlap fraction
(costmodel.exposed_time_s).

Memory model per device: model states of its layers (data_parallel_costs) + for each stage it runs, the
stage's micro-batches in flight x its layers' kept activations + its buffers: the largest gathered ZeRO-3
layer and what its recomputed layer rematerialises. `predict` and the ILP (via `ilp_option`) use the same
model; the screening drops buffers and, with one micro-batch, gradients, so it stays a relaxation. Gradients
live at the peak: with one micro-batch the runtime's
zero_grad(set_to_none=True) leaves no gradient when backward starts with every activation live, and backward
frees activations as it makes gradients, so the peak holds max(activations + buffers, gradients) beside the
parameters and optimizer states (the breakdown's `gradients` is the part above activations + buffers); with
gradient accumulation the gradients persist and add up.

Two passes: `screen_config` uses the LP relaxation (planner/memory_fit.py) inside the pipeline partitioner
to get an optimistic step time for thousands of configurations; `solve_config` re-solves the chosen cut with
the exact ILP (planner/ilp.py) per rank.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from torch import nn

from costmodel import (
    Cluster,
    data_parallel_exposed_s,
    dtype_bytes,
    exposed_time_s,
    host_transfer_time_s,
    in_flight_microbatches,
    optimizer_bytes_per_param,
    optimizer_step_time_s,
    pipeline_bubble_fraction,
    point_to_point_time_s,
)
from planner.config_space import ParallelConfig
from planner.data_parallel_costs import (
    data_parallel_time_s,
    gathered_buffer_bytes,
    offload_time_s,
    rank_state_bytes,
)
from planner.ilp import Option, choose_option_counts
from planner.layer_options import (
    TRACED_DTYPE_BYTES,
    LayerOption,
    OptionCost,
    layer_options,
    price_layer_option,
    supports_tensor_parallel,
)
from planner.linear_modules import is_conv1d
from planner.memory_fit import GroupHull, fractional_fit_time_s, group_hull
from planner.model_graph import ModelGraph
from planner.partition import partition_chain
from planner.plan import grid_rows_options
from planner.tensor_parallel_collectives import supports_tensor_parallel_2d
from planner.vocab_parallel import supports_vocab_parallel


@dataclass(frozen=True)
class PricedOption:
    """One option of one layer under one configuration."""

    option: LayerOption
    micro: OptionCost
    state_bytes: int
    parameters_bytes: int
    gradients_bytes: int
    optimizer_states_bytes: int
    step_communication_s: float
    optimizer_s: float
    state_offload_s: float
    unit_time_s: float
    """t_micro + t_step / F (see the module docstring)."""


@dataclass
class ConfigResult:
    """A priced configuration; `choice` is filled by solve_config (None after screening)."""

    config: ParallelConfig
    step_time_s: float
    stage_starts: list[int]
    choice: list[PricedOption] | None = None
    other_stage_starts: list[list[int]] = field(default_factory=list)
    """Other pipeline cuts worth solving exactly (the screening's runner-up)."""
    peak_memory_bytes: int = 0
    breakdown_s: dict[str, float] = field(default_factory=dict)
    """Slowest rank's step: compute_s (incl. recompute_s), communication_s, offload_s, optimizer_s, bubble_s."""
    memory_bytes: dict[str, int] = field(default_factory=dict)
    """Fullest rank's peak: parameters, gradients, optimizer_states, activations, buffers."""
    stage_times_s: list[tuple[float, float]] = field(default_factory=list)
    """(forward, backward) seconds per micro-batch of every stage."""

    @property
    def feasible(self) -> bool:
        return math.isfinite(self.step_time_s)


class ConfigPricer:
    """Prices layers for configurations of one model on one cluster, caching what configurations share."""

    def __init__(self, model: nn.Module, graph: ModelGraph, cluster: Cluster):
        self.model, self.graph, self.cluster = model, graph, cluster
        self.layers = graph.layers
        self._micro: dict[tuple, list[tuple[LayerOption, OptionCost]]] = {}
        self._tp_ok: dict[tuple[str, int], bool] = {}
        self._vocab_ok: dict[tuple[str, int], bool] = {}
        self._priced: dict[tuple[str, ParallelConfig], list[PricedOption]] = {}
        self._min_micro: dict[tuple[int, int, str], float] = {}
        self.kinds = [layer.kind for layer in self.layers]
        self.kind_order = list(dict.fromkeys(self.kinds))
        # prefix[k][i] = layers of kind k among the first i layers: segment kind counts in O(kinds)
        self.prefix = {k: [0] for k in self.kind_order}
        for kind in self.kinds:
            for k in self.kind_order:
                self.prefix[k].append(self.prefix[k][-1] + (k == kind))
        self.first_of_kind = {k: self.kinds.index(k) for k in self.kind_order}
        self.allowed_starts = allowed_stage_starts(model, self.layers)
        self.num_tensors = [sum(1 for _ in (model.get_submodule(layer.path) if layer.path else model).parameters())
                            if layer.num_params else 0 for layer in self.layers]

    # ---- per-layer tables -------------------------------------------------------------------------------
    def micro_options(self, index: int, tp: int, micro_batch_size: int,
                      param_dtype: str) -> list[tuple[LayerOption, OptionCost]]:
        """Options of a layer and their per-micro-batch costs. They are the same with and without a pipeline
        (sequence and vocabulary parallelism run on traced stages too)."""
        layer = self.layers[index]
        key = (layer.kind, tp, micro_batch_size, param_dtype)
        if key not in self._micro:
            tp_key = (layer.kind, tp)
            if tp_key not in self._tp_ok:
                self._tp_ok[tp_key] = supports_tensor_parallel(self.model, layer, tp)
                self._vocab_ok[tp_key] = supports_vocab_parallel(self.model, layer, tp)
            scale = micro_batch_size / self.graph.sample_batch_size
            # the runtime's sequence parallelism (DTensor styles for nn.Linear) does not run Conv1D units
            sequence_ok = not self._has_conv1d_units(layer)
            grids = [rows for rows in grid_rows_options(tp) if self._tp_ok[tp_key]
                     and supports_tensor_parallel_2d(layer, rows, tp // rows, micro_batch_size)]
            options = layer_options(layer, self._tp_ok[tp_key], self.cluster, sequence_parallel_ok=sequence_ok,
                                    vocab_parallel_ok=self._vocab_ok[tp_key],
                                    tensor_2d_rows=grids)
            self._micro[key] = [(o, price_layer_option(layer, o, tp, scale, self.cluster, param_dtype))
                                for o in options]
        return self._micro[key]

    def _has_conv1d_units(self, layer) -> bool:
        prefix = f"{layer.path}." if layer.path else ""
        return any(is_conv1d(self.model.get_submodule(prefix + rel))
                   for unit in layer.tp_units for rel in (*unit.colwise, unit.rowwise))

    def min_micro_time_s(self, tp: int, micro_batch_size: int, param_dtype: str) -> float:
        """Sum over layers of their fastest time per micro-batch: the base of a configuration's lower bound."""
        key = (tp, micro_batch_size, param_dtype)
        if key not in self._min_micro:
            self._min_micro[key] = sum(min(c.time_s for _, c in self.micro_options(i, *key))
                                       for i in range(len(self.layers)))
        return self._min_micro[key]

    def priced_options(self, index: int, config: ParallelConfig) -> list[PricedOption]:
        key = (self.kinds[index], config)
        if key not in self._priced:
            self._priced[key] = self._price(index, config)
        return self._priced[key]

    def _price(self, index: int, config: ParallelConfig) -> list[PricedOption]:
        factor = pipeline_step_factor(config.pp, config.num_microbatches, config.virtual_stages)
        overlap = self.cluster.overlap
        setup = config.data_parallel_setup()
        priced = []
        for option, micro in self.micro_options(index, config.tp, config.micro_batch_size, config.param_dtype):
            states = rank_state_bytes(micro.local_num_params, setup)
            gather_s, reduce_s = data_parallel_time_s(micro.local_num_params, setup, self.cluster)
            communication_s = data_parallel_exposed_s(gather_s, reduce_s,
                                                      *data_parallel_windows_s(micro, config.num_microbatches),
                                                      overlap)
            owned = micro.local_num_params if config.dp_kind == "ddp" else -(-micro.local_num_params //
                                                                           setup.shard_degree)
            mixed = config.param_dtype != "float32"
            if config.offload:
                # offloaded states are updated by the host CPU; the profile has no host-memory figure, so its
                # traffic is priced at the host link's bandwidth (a GPU's share of host DRAM is of that order);
                # the host runs the same per-tensor AdamW loop, so it pays the same per-tensor overhead (without
                # it, tiny models on the `cpu` preset, where that overhead dominates, chose zero3 + offload)
                touched = owned * optimizer_bytes_per_param("adamw", config.param_dtype, mixed)
                optimizer_s = (host_transfer_time_s(touched, self.cluster)
                               + self.num_tensors[index] * self.cluster.optimizer_tensor_overhead_s) if owned else 0.0
            else:
                optimizer_s = optimizer_step_time_s(owned, self.cluster, optimizer="adamw",
                                                    param_dtype=config.param_dtype, master_weights=mixed,
                                                    num_tensors=self.num_tensors[index])
            offload_s = offload_time_s(micro.local_num_params, setup, self.cluster)
            unit = micro.time_s + (communication_s + optimizer_s + offload_s) / factor
            priced.append(PricedOption(option, micro, states.total_bytes, states.parameters_bytes,
                                       states.gradients_bytes, states.optimizer_states_bytes, communication_s,
                                       optimizer_s, offload_s, unit))
        return priced

    # ---- screening ------------------------------------------------------------------------------------
    def ilp_option(self, config: ParallelConfig, priced: PricedOption, in_flight: float) -> Option:
        """The ILP's view of one option on a stage holding `in_flight` micro-batches: the same memory model as
        predict(), so whatever the ILP accepts predict() does too, and the other way round."""
        activations = in_flight * priced.micro.activation_bytes
        buffers = {"working_bytes": priced.micro.working_bytes,
                   "gathered_bytes": gathered_buffer_bytes(priced.micro.local_num_params,
                                                           config.data_parallel_setup())}
        held = priced.parameters_bytes + priced.optimizer_states_bytes
        if config.num_microbatches == 1:  # gradients replace activations as backward runs
            return Option(priced.unit_time_s, held, activation_bytes=activations,
                          gradient_bytes=priced.gradients_bytes, **buffers)
        return Option(priced.unit_time_s, held + priced.gradients_bytes + activations, **buffers)

    def p2p_s(self, config: ParallelConfig, first_layer: int) -> float:
        """Forward activation in and its gradient back, per micro-batch, for a stage starting at first_layer."""
        if config.pp == 1 or first_layer == 0:
            return 0.0
        message = self.layers[first_layer].input_bytes * config.micro_batch_size / self.graph.sample_batch_size
        message *= dtype_bytes(config.param_dtype) / TRACED_DTYPE_BYTES
        peer = config.dp * config.tp  # the next stage's rank for rank 0
        send_s = 2 * point_to_point_time_s(message, 0, peer, self.cluster)
        return exposed_time_s(send_s, send_s, self.cluster.overlap.pipeline_p2p)

    def screen(self, config: ParallelConfig) -> ConfigResult:
        """Optimistic step time (LP relaxation) and the pipeline cut that achieves it."""
        tables = [self.priced_options(i, config) for i in range(len(self.layers))]
        # each stage may fill its rank's whole memory: the rank's stages together must fit, which only the exact
        # solve checks; any tighter per-stage share would make the screen stricter than the solve it bounds
        stage_budget = self.cluster.usable_memory_bytes
        hull_cache: dict[tuple[str, float], GroupHull] = {}
        kinds = self.kinds

        def hull(index: int, in_flight: float) -> GroupHull:
            key = (kinds[index], in_flight)
            if key not in hull_cache:
                hull_cache[key] = group_hull([self.ilp_option(config, p, in_flight) for p in tables[index]])
            return hull_cache[key]

        in_flight = self.in_flight(config)
        prefix, first = self.prefix, self.first_of_kind
        p2p = [self.p2p_s(config, start) for start in range(len(self.layers))]
        # a segment's fit depends only on how many layers of each kind it holds: repeated blocks make most
        # (start, end) pairs share one count vector, so the LP runs once per (in-flight, counts)
        fits: dict[tuple[float, tuple[int, ...]], float] = {}
        memo: dict[tuple[float, int, int], float] = {}

        def segment_cost(stage: int, start: int, end: int) -> float:
            f = in_flight[stage]
            key = (f, start, end)
            if key not in memo:
                counts = (f, tuple(prefix[k][end] - prefix[k][start] for k in self.kind_order))
                if counts not in fits:
                    groups = [(hull(first[k], f), n) for k, n in zip(self.kind_order, counts[1], strict=True)]
                    fits[counts] = fractional_fit_time_s([g for g in groups if g[1]], stage_budget)
                memo[key] = fits[counts] + p2p[start]
            return memo[key]

        # stages start only where no tied parameter would be split (allowed_starts): the partitioner cuts the
        # chain of blocks between allowed starts, each block costed as its layers
        starts_at = self.allowed_starts
        if config.num_stages > len(starts_at):
            return ConfigResult(config, math.inf, [])
        bounds = starts_at + [len(self.layers)]

        def block_cost(stage: int, start: int, end: int) -> float:
            return segment_cost(stage, bounds[start], bounds[end])

        # the bottleneck cut balances stages; with virtual stages a rank runs several, and the even cut can
        # balance ranks better, so both are candidates
        cuts = [[bounds[b] for b in even_stage_starts(len(starts_at), config.num_stages)]]
        found = partition_chain(len(starts_at), config.num_stages, block_cost)
        if found is not None and [bounds[b] for b in found[0]] != cuts[0]:
            cuts.insert(0, [bounds[b] for b in found[0]])
        factor = pipeline_step_factor(config.pp, config.num_microbatches, config.virtual_stages)
        ends = len(self.layers)

        def rank_time_s(starts: list[int], rank: int) -> float:
            # the rank's stages share its memory: one LP over all their layers (a relaxation of the rank's exact
            # ILP, and tighter than fitting each stage alone, which the partitioner does to choose the cut)
            groups: dict[tuple[str, float], int] = {}
            send_s = 0.0
            for stage in range(rank, config.num_stages, config.pp):
                start, end = starts[stage], (starts + [ends])[stage + 1]
                send_s += p2p[start]
                for k in self.kind_order:
                    count = prefix[k][end] - prefix[k][start]
                    if count:
                        groups[k, in_flight[stage]] = groups.get((k, in_flight[stage]), 0) + count
            hulls = [(hull(first[k], f), count) for (k, f), count in groups.items()]
            return fractional_fit_time_s(hulls, self.cluster.usable_memory_bytes) + send_s

        priced = []
        for starts in cuts:
            priced.append((factor * max(rank_time_s(starts, r) for r in range(config.pp)), starts))
        priced = [p for p in priced if math.isfinite(p[0])]
        if not priced:
            return ConfigResult(config, math.inf, [])
        priced.sort(key=lambda p: p[0])
        return ConfigResult(config, priced[0][0], priced[0][1], other_stage_starts=[p[1] for p in priced[1:]])

    # ---- exact solve --------------------------------------------------------------------------------
    def solve(self, screened: ConfigResult) -> ConfigResult:
        """Exact per-rank ILP on each screened cut; the fastest result, predicted."""
        results = [self.solve_cut(screened.config, starts)
                   for starts in [screened.stage_starts, *screened.other_stage_starts]]
        return min(results, key=lambda r: r.step_time_s)

    def solve_cut(self, config: ParallelConfig, starts: list[int]) -> ConfigResult:
        """Exact per-rank ILP on one pipeline cut."""
        n = len(self.layers)
        tables = [self.priced_options(i, config) for i in range(n)]
        budget = self.cluster.usable_memory_bytes
        stage_of = stages_of_layers(starts, n)
        in_flight = self.in_flight(config)
        choice: list[PricedOption | None] = [None] * n
        for rank in range(config.pp):
            groups: dict[str, list[int]] = {}
            for i in range(n):
                if stage_of[i] % config.pp == rank:
                    groups.setdefault(f"{self.layers[i].kind}@{in_flight[stage_of[i]]}", []).append(i)
            options = {g: {p.option.label: self.ilp_option(config, p, in_flight[stage_of[idx[0]]])
                           for p in tables[idx[0]]}
                       for g, idx in groups.items()}
            counts = choose_option_counts(options, {g: len(idx) for g, idx in groups.items()}, budget)
            if counts is None:
                return ConfigResult(config, math.inf, starts)
            for g, idx in groups.items():
                by_label = {p.option.label: p for p in tables[idx[0]]}
                # leanest options go to the earliest layers of the group: any order is equally good
                labels = sorted(counts[g], key=lambda lab: options[g][lab].relaxed_memory_bytes)
                queue = [lab for lab in labels for _ in range(counts[g][lab])]
                for i, label in zip(idx, queue, strict=True):
                    choice[i] = by_label[label]
        return self.predict(config, starts, choice)

    def in_flight(self, config: ParallelConfig) -> list[float]:
        """Micro-batches in flight for every stage (stage s runs on pipeline rank s % pp)."""
        return [in_flight_microbatches(config.schedule, config.pp, s % config.pp, config.num_microbatches,
                                       config.virtual_stages) for s in range(config.num_stages)]

    def predict(self, config: ParallelConfig, starts: list[int], choice: list[PricedOption]) -> ConfigResult:
        """Step time (slowest rank), its breakdown, and the peak memory (fullest rank) of a complete assignment.

        The result is infeasible (infinite time) when some rank exceeds the device's usable memory.
        """
        n = len(self.layers)
        stage_of = stages_of_layers(starts, n)
        in_flight = self.in_flight(config)
        factor = pipeline_step_factor(config.pp, config.num_microbatches, config.virtual_stages)
        m = config.num_microbatches
        slowest: tuple[float, dict[str, float]] = (-1.0, {})
        peak, memory = 0, {}
        for rank in range(config.pp):
            members = [choice[i] for i in range(n) if stage_of[i] % config.pp == rank]
            # this rank's buffers: its largest gathered ZeRO-3 layer, and what its recomputed layer
            # rematerialises (0 for layers that keep everything they saved: those activations are counted)
            reserve = gathered_buffer_bytes(max((c.micro.local_num_params for c in members), default=0),
                                            config.data_parallel_setup()) + max(
                (c.micro.working_bytes for c in members), default=0)
            p2p_s = sum(self.p2p_s(config, s) for stage, s in enumerate(starts) if stage % config.pp == rank)
            micro_s = sum(c.micro.time_s for c in members) + p2p_s
            total = factor * micro_s + sum(c.step_communication_s + c.optimizer_s + c.state_offload_s
                                           for c in members)
            if total > slowest[0]:
                slowest = (total, {
                    "compute_s": m * sum(c.micro.compute_s + c.micro.recompute_s for c in members),
                    "recompute_s": m * sum(c.micro.recompute_s for c in members),
                    "communication_s": m * (sum(c.micro.tp_communication_s for c in members) + p2p_s)
                    + sum(c.step_communication_s for c in members),
                    "offload_s": m * sum(c.micro.offload_s for c in members)
                    + sum(c.state_offload_s for c in members),
                    "optimizer_s": sum(c.optimizer_s for c in members),
                    "bubble_s": (factor - m) * micro_s})
            activations = sum(in_flight[stage_of[i]] * choice[i].micro.activation_bytes
                              for i in range(n) if stage_of[i] % config.pp == rank)
            gradients = sum(c.gradients_bytes for c in members)
            if config.num_microbatches == 1:  # gradients appear as backward frees activations (module docstring)
                gradients = max(0, gradients - int(activations) - reserve)
            parts = {"parameters": sum(c.parameters_bytes for c in members), "gradients": gradients,
                     "optimizer_states": sum(c.optimizer_states_bytes for c in members),
                     "activations": int(activations), "buffers": reserve}
            if sum(parts.values()) > peak:
                peak, memory = sum(parts.values()), parts
        step = slowest[0] if peak <= self.cluster.usable_memory_bytes * (1 + 1e-9) else math.inf
        return ConfigResult(config, step, starts, choice=list(choice), peak_memory_bytes=peak,
                            breakdown_s=slowest[1], memory_bytes=memory,
                            stage_times_s=self.stage_times_s(config, starts, choice))

    def stage_times_s(self, config: ParallelConfig, starts: list[int],
                      choice: list[PricedOption]) -> list[tuple[float, float]]:
        """(forward, backward) seconds of every stage for one micro-batch: its layers' time split by
        OptionCost.forward_s, plus half its pipeline send each way. The pipeline timeline draws these."""
        stage_of = stages_of_layers(starts, len(self.layers))
        times = []
        for stage, start in enumerate(starts):
            members = [c for c, s in zip(choice, stage_of, strict=True) if s == stage]
            half_p2p_s = self.p2p_s(config, start) / 2
            forward_s = sum(c.micro.forward_s for c in members) + half_p2p_s
            times.append((forward_s, sum(c.micro.time_s for c in members) + 2 * half_p2p_s - forward_s))
        return times


def data_parallel_windows_s(micro: OptionCost, num_microbatches: int) -> tuple[float, float]:
    """(gather window, reduction window) of one layer per step, seconds: the compute its data-parallel
    collectives run beside (costmodel/overlap.py). Gathers: every micro-batch's forward, backward and
    recomputation (FSDP2 prefetches one layer ahead in both passes). Reductions: the last micro-batch's
    backward and recomputation (with accumulation, gradients are reduced once, after the last one)."""
    return (num_microbatches * (micro.compute_s + micro.recompute_s),
            micro.backward_compute_s + micro.recompute_s)


def allowed_stage_starts(model: nn.Module, layers: list) -> list[int]:
    """Chain indices where a pipeline stage may start: 0, and every layer that does not split a tied parameter.

    A parameter used by layers i < j (a head tied to the token embedding) must live on one stage, since the
    pipeline runtime refuses a parameter shared by two stages (the copies' gradients would never be summed), so
    no stage may start at i + 1 .. j. For GPT-2 (wte first, lm_head last) that leaves only pp = 1.
    """
    users: dict[int, list[int]] = {}
    for index, layer in enumerate(layers):
        if layer.path:
            for p in model.get_submodule(layer.path).parameters():
                users.setdefault(id(p), []).append(index)
    forbidden: set[int] = set()
    for indices in users.values():
        forbidden.update(range(min(indices) + 1, max(indices) + 1))
    return [i for i in range(len(layers)) if i == 0 or i not in forbidden]


def even_stage_starts(num_layers: int, num_stages: int) -> list[int]:
    """First layer of each stage when layers are dealt out as evenly as possible (earlier stages get extras)."""
    base, extra = divmod(num_layers, num_stages)
    return [stage * base + min(stage, extra) for stage in range(num_stages)]


def stages_of_layers(starts: list[int], num_layers: int) -> list[int]:
    """Stage index of every layer from the stages' first layers."""
    stage_of = [0] * num_layers
    for stage, (s, e) in enumerate(zip(starts, starts[1:] + [num_layers], strict=True)):
        stage_of[s:e] = [stage] * (e - s)
    return stage_of


def pipeline_step_factor(pp: int, num_microbatches: int, virtual_stages: int = 1) -> float:
    """Step time over the slowest rank's time per micro-batch: m / (1 - bubble fraction) = m + (pp - 1) / v."""
    schedule = "none" if pp == 1 else ("interleaved_1f1b" if virtual_stages > 1 else "1f1b")
    return num_microbatches / (1 - pipeline_bubble_fraction(schedule, pp, num_microbatches, virtual_stages))
