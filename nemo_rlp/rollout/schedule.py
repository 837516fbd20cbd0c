"""The rollout engine's schedule without a model: what `sample_thoughts` does step by step for given
context and thought lengths, replayed from the same rules, and the host work of one decode step
counted on the real engine. The planner's `--time` model (`nemo_rlp.planning`) runs on these.

`replay` gives, per chunk of contexts, the counters a `RolloutStats` collects (decode steps, rows
computed and live, context tokens fed through decode, host syncs) plus what a time model needs
beyond them: the cached length summed over the rows of every decode step (attention reads) and the
cache cells copied by compaction. tests/unit/test_rollout_schedule.py checks the replay against the
counters of `sample_thoughts` on the tiny models.

`measure_host_work` runs a few real decode steps of a tiny model of the given architecture on CPU
under a dispatch-mode counter: the aten operations per decode step (what an eager GPU run launches as
kernels, one by one), split into a per-layer and a per-step part, for the lockstep and the `rows`
paths.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from nemo_rlp.rollout.sampler import CHECK_EVERY, COMPACT_BELOW


@dataclass
class Schedule:
    decode_steps: int = 0
    row_steps: int = 0  # rows computed, summed over decode steps
    live_row_steps: int = 0  # of those, rows not finished
    context_tokens_decoded: int = 0
    prefill_tokens: int = 0  # context tokens run through a prefill
    prefill_square: int = 0  # sum of squared prefill lengths (the attention term of the prefill)
    host_syncs: int = 0
    attended_cells: int = 0  # key/value positions read, summed over rows and decode steps
    rope_cells: int = 0  # cached keys re-rotated (lockstep: megatron's static cache keeps keys pre-RoPE)
    compaction_cells: int = 0  # cache positions copied by compaction (x the bytes of one position)
    compaction_rows: int = 0  # Mamba states copied by compaction (x the bytes of one row's states)
    generated_tokens: int = 0

    def add(self, other: "Schedule") -> "Schedule":
        for key in self.__dataclass_fields__:
            setattr(self, key, getattr(self, key) + getattr(other, key))
        return self

    @property
    def mean_occupancy(self) -> float:
        return self.live_row_steps / max(1, self.row_steps)


def replay(mode: str, context_lens, thought_lens, group: int, max_thought_len: int) -> Schedule:
    """One `sample_thoughts` call: contexts of `context_lens` tokens (B), thoughts of `thought_lens`
    sampled tokens (B*G, each closed by an inserted end marker, as with `thought_caps`)."""
    prompt = np.repeat(np.asarray(context_lens, dtype=np.int64) + 1, group)  # + the start marker
    thought = np.asarray(thought_lens, dtype=np.int64)
    if mode == "rows":
        return _replay_rows(prompt, thought, group)
    if mode == "shared_prefill":
        return _replay_lockstep(prompt, thought, group, max_thought_len)
    raise ValueError(f"no schedule replay for rollout mode {mode!r} (rows or shared_prefill)")


def _replay_lockstep(prompt: np.ndarray, thought: np.ndarray, group: int, max_thought_len: int) -> Schedule:
    """Rows aligned at position 0: one prefill of the shortest prompt per context, then one position
    per step; a row is done after the step that decides x_t at position prompt + thought + 1."""
    s = Schedule(generated_tokens=int(thought.sum()))
    p_min, p_max = int(prompt.min()), int(prompt.max())
    s.prefill_tokens = p_min * (len(prompt) // group)
    s.prefill_square = p_min**2 * (len(prompt) // group)
    cache_positions = p_max + max_thought_len + 1
    done_at = prompt + thought + 1
    live = len(prompt)
    for pos in range(p_min, int(done_at.max())):
        still = int((done_at > pos).sum())
        if still < live:  # finished rows dropped: every survivor's whole cache copied
            s.compaction_cells += still * cache_positions
            s.compaction_rows += still
            live = still
        s.decode_steps += 1
        s.host_syncs += 5
        s.row_steps += live
        s.live_row_steps += live
        s.context_tokens_decoded += int(((prompt > pos) & (done_at > pos)).sum())
        s.attended_cells += live * (pos + 1)  # every row reads the cache up to the shared offset
        s.rope_cells += live * (pos + 1)
    return s


def _replay_rows(prompt: np.ndarray, thought: np.ndarray, group: int) -> Schedule:
    """Every context prefilled; thought token u of every row decided at step u; a row is done after
    step thought + 1; a host check every CHECK_EVERY steps compacts below COMPACT_BELOW."""
    s = Schedule(generated_tokens=int(thought.sum()), prefill_tokens=int(prompt[::group].sum()),
                 prefill_square=int((prompt[::group] ** 2).sum()))
    done_after = thought + 1
    last_step = int(thought.max()) + 1
    batch = np.arange(len(prompt))  # rows in the cache, in order
    max_len = int(prompt.max())
    for step in range(last_step):
        if (step + 1) % CHECK_EVERY == 0:
            s.host_syncs += 1
            live = done_after[batch] > step
            if not live.any():
                break
            if live.sum() < COMPACT_BELOW * len(batch):
                batch = batch[live]
                s.compaction_cells += len(batch) * max_len
                s.compaction_rows += len(batch)
        s.decode_steps += 1
        s.row_steps += len(batch)
        s.live_row_steps += int((done_after[batch] > step).sum())
        s.attended_cells += len(batch) * (max_len + 1)  # every row reads up to the widest row
        max_len += 1
    return s


def replay_step(mode: str, context_lens, thought_lens, group: int, max_thought_len: int, chunk: int) -> Schedule:
    """A rank's rollouts of one RLP step: its contexts `chunk` at a time (rlp.rollout_batch_contexts)."""
    total = Schedule()
    context_lens = list(context_lens)
    for start in range(0, len(context_lens), chunk):
        rows = slice(start * group, (start + chunk) * group)
        total.add(replay(mode, context_lens[start : start + chunk], list(thought_lens)[rows], group, max_thought_len))
    return total


@dataclass(frozen=True)
class HostWork:
    """aten operations of one decode step, measured on a tiny model: per layer and per step."""

    ops_per_layer: float
    ops_per_step: float
    syncs_per_step: float


def measure_host_work(arch: str, mode: str) -> HostWork:
    """Count the aten ops of decode steps of the tiny model of `arch` (the registered architecture's
    `tiny_model`, `nemo_rlp.models.spec`) and of the same model with twice the layers: the
    difference is the per-layer part."""
    counts = [_decode_ops(arch, mode, depth) for depth in (1, 2)]
    (layers_1, step_ops_1, syncs), (layers_2, step_ops_2, _) = counts
    per_layer = (step_ops_2 - step_ops_1) / (layers_2 - layers_1)
    return HostWork(per_layer, step_ops_1 - per_layer * layers_1, syncs)


def _decode_ops(arch: str, mode: str, depth: int) -> tuple[int, float, float]:
    """(layers, aten ops per decode step, host syncs per decode step) of a tiny model."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    from nemo_rlp.config import ParallelConfig, load_config
    from nemo_rlp.models import build_model
    from nemo_rlp.models.handle import ModelHandle
    from nemo_rlp.models.spec import get_architecture
    from nemo_rlp.parallel import distributed
    from nemo_rlp.rollout.sampler import Markers, RolloutStats, SamplingParams, sample_thoughts

    class Counter(TorchDispatchMode):
        ops = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Counter.ops += 1
            return func(*args, **(kwargs or {}))

    from megatron.core import parallel_state

    if not parallel_state.model_parallel_is_initialized():
        distributed.initialize(ParallelConfig(), seed=0)
    tiny_model = get_architecture(arch).tiny_model
    if tiny_model is None:
        raise ValueError(f"architecture {arch!r} declares no tiny_model: its host work cannot be measured")
    cfg = load_config(tiny_model(depth)).model
    torch.manual_seed(0)
    handle = ModelHandle(build_model(cfg, 256, 1, torch.device("cpu")))
    prefixes = [[5] * 12, [6] * 20]
    steps = {}
    # The difference of two lengths removes the prefill and the bookkeeping around the loop; 16
    # steps apart, so the `rows` path's one check every CHECK_EVERY steps is counted in proportion.
    for L in (8, 24):
        stats = RolloutStats()
        with Counter():
            sample_thoughts(handle, prefixes, [7, 8], SamplingParams(group_size=4, max_thought_len=L, mode=mode),
                            Markers(2, 3, 0), torch.Generator().manual_seed(0), torch.device("cpu"),
                            thought_caps=[L] * 8, stats=stats)
        steps[L] = (Counter.ops, stats.decode_steps, stats.host_syncs)
        Counter.ops = 0
    ops = (steps[24][0] - steps[8][0]) / (steps[24][1] - steps[8][1])
    syncs = (steps[24][2] - steps[8][2]) / (steps[24][1] - steps[8][1])
    return cfg.num_layers, ops, syncs
