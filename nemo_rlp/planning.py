"""Plan an at-scale run on paper: parameters, memory per GPU, tokens and FLOPs per step, and the token
budget of a compute-matched continued-pretraining (CPT) baseline. `python -m nemo_rlp.plan` prints it.

Everything here is arithmetic over a validated `RunConfig`, except one thing: the parameters are
counted on the real megatron-core model, built by the project's own providers on the meta device
(no memory, no GPU, about a second). The memory model follows what the code does today; where the
code holds a whole batch at once, so does the model. Byte counts below are per GPU.

Notation: P parameters on this GPU (its tensor-parallel shard of its pipeline stage's layers), TP/PP/DP
the layout, B contexts per RLP step (`rlp.contexts_per_step`), b = ceil(B / DP) contexts per
data-parallel rank, G thoughts per context, L the thought length, c = `data.max_context`,
R = b * G rollout rows, V the padded vocabulary, h the hidden size. Worst cases are planned: every
context has c tokens and every thought runs to L, because the rows of one batch are as wide as the
widest of them, so one long thought makes the whole batch pay.

Static (held the whole run; `nemo_rlp.training.policy`):
- weights: P * 2 bytes (bf16 `model.params_dtype`; 4 for fp32).
- EMA teacher: P * 4. φ is a second model of the same sharding kept in fp32 by design (a bf16 EMA at
  τ = 0.999 would round most updates away; `nemo_rlp.ema`).
- gradients: P * 4. megatron's DDP keeps fp32 main grads (`grad_reduce_in_fp32=True`).
- optimizer: P * 12 / S: megatron's mixed-precision Adam keeps an fp32 master copy and the two fp32
  moments (8 bytes with fp32 weights, which need no master copy). S = DP with the distributed
  optimizer (`parallel.distributed_optimizer`, or the what-if), which shards this state over
  data-parallel ranks, else 1.

Phases (transient; the peak is static + the largest phase + `reserve_gib` for the CUDA context, NCCL
buffers, Transformer Engine workspaces and allocator fragmentation):
1. teacher scoring (S_ema; `nemo_rlp.training.steps.teacher_scorer`, all windows of a rank in one
   forward): ceil(b / `data.positions_per_document`) windows of c + 1 tokens through the fp32
   teacher; its logits [rows, c+1, V/TP] fp32 plus the transposed copy the log-prob takes (8 bytes per
   entry), and one layer's fp32 working set (the inference working set below, doubled).
2. rollout (`nemo_rlp.rollout.sampler`, all R rows of a rank at once; megatron's static inference
   context allocates for all of them up front):
   - KV cache per attention layer: 2 * R * (c + L + 2) * (kv_heads / TP) * head_dim * 2 bytes;
   - Mamba state per Mamba layer and row: conv (conv_dim / TP) * d_conv + SSM (heads / TP) * head_dim
     * d_state, in the weights' dtype; conv_dim = heads * head_dim + 2 * groups * d_state;
   - one layer's cache copied while rows are selected (`ModelHandle.select_cache_rows`);
   - sampling buffers: R * V * 24 bytes. Every tensor-parallel rank holds the full-vocabulary fp32
     logits of every live row, and a sampling step makes about six such buffers (the logits, the rows
     that think, the exponential noise, the scaled logits, the probabilities, their ratio to the noise);
   - prefill working set: b * (c + 1) tokens (one prefill per context, `shared_prefill`; R * (c + 1) in
     `cache` mode; R * (c + L + 2) per step and no cache in `recompute` mode) times the per-token
     inference working set: 3 * h * 2 bytes of hidden states plus the widest layer's intermediates
     (Mamba: in_proj output, conv output, scan output and fp32 chunk states; attention: QKV and the
     attention output; MLP: fc1 and activation outputs), all / TP except the hidden states.
   The prefill and the sampling buffers do not coexist: cache + max(prefill, sampling + copy).
3. RLP training (`nemo_rlp.training.steps.rlp_update`): a microbatch of `rlp.micro_batch_rows` rows
   (groups split), else G * `rlp.micro_batch_contexts` rows (all b contexts when 0), of c + L + 2
   input tokens. Rollouts hold `rlp.rollout_batch_contexts` contexts at once and the teacher scores
   `rlp.score_batch_windows` windows per forward (0: all). No activation recomputation (the providers
   do not enable it), so every layer keeps what its backward needs. Rough bytes per token (bf16,
   Transformer Engine layers, flash attention, dropout 0):
   - every layer: its input and its normalised input, 2 * h * 2, replicated over TP; / TP with
     sequence parallelism (`parallel.sequence_parallel`: each TP rank keeps its 1/TP of the tokens,
     and the linears keep their input un-gathered, gathering it again in backward);
   - attention: QKV output, q/k norm inputs when `qk_layernorm`, and flash attention's q, k, v and
     output: 2 * ((q + 2kv) + (q + kv if qk_layernorm) + (2q + 2kv)) / TP with q = heads * head_dim,
     kv = kv_heads * head_dim;
   - MLP: fc1 output and activation output: 2 * (F * (2 if gated else 1) + F) / TP (the local specs'
     SwiGLU keeps the same, `nemo_rlp.models.mlp`);
   - Mamba: in_proj output (2 * d_inner + 2 * groups * d_state + heads), conv output (d_inner + 2 *
     groups * d_state), scan output and gated-norm output (2 * d_inner), all * 2 / TP, plus dt and its
     cumulative sum in fp32, 8 * heads / TP;
   - GPT layers are an attention and an MLP half; the final norm and the output layer keep 2 * h * 2
     (/ TP with sequence parallelism).
   The loss adds the logits: [tokens, V/TP] in bf16, cast to fp32 and transposed into a contiguous
   fp32 copy that the cross-entropy keeps as its softmax: 10 bytes per entry at the forward peak. With
   packed RLP rows (`rlp.pack_rows`) only the L + 1 positions that predict a thought token or x_t get
   logits (`nemo_rlp.training.packing.logits_at`), not the context; NTP rows get them everywhere. Under pipeline parallelism the first stage holds min(PP, microbatches)
   microbatches in flight (1F1B).
4. NTP training: the same model with `trainer.ntp_micro_batch_size` rows (the whole per-rank batch when
   0) of `data.ntp_seq_len` tokens.

FLOPs: 6 * N per trained token, 2 * N per token that is only run forward (teacher scoring, rollout
prefill and decoding), N the parameters that multiply (all but the input embedding when it is not tied
to the output layer). The quadratic attention term is left out; at c + L = 4096 tokens it adds about
4 * s * heads * head_dim FLOPs per attention layer and token.

What-ifs (`WhatIf`, `--what-if` on the command line): the distributed optimizer (also
`parallel.distributed_optimizer`), and quick overrides of the three piece sizes above without editing the config. A plan
with any of them says so in its header; the Slurm dry run plans the config as it is.

CPT baseline (docs/design.md section 1): a continued-pretraining run that sees as many tokens as RLP spends,
T_flop = n * l_seq * bs * iters + T_inp, with n = G thoughts per context, l_seq = L tokens per thought,
bs = B contexts per step, iters = RLP steps, and T_inp the input tokens the run reads: the contexts
(B * c per RLP step, an upper bound) and the interleaved NTP batches.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Optional

from nemo_rlp.config import ConfigError, ModelConfig, ParallelConfig, RunConfig, mamba_heads
from nemo_rlp.models.spec import get_architecture

GiB = float(2**30)

# Published sizes of the named at-scale models (see tests/unit/test_model_sizes.py for the sources).
PUBLISHED_PARAMETERS = {
    "nemotron_nano_12b_v2": 12.31e9,
    # Published as "1.7B"; its HF config gives 1.7206e9 with tied embeddings: 3 significant digits.
    "qwen3_1p7b": 1.72e9,
}

SAMPLING_BYTES_PER_ROW_AND_VOCAB = 24  # about six fp32 [rows, V] buffers per sampling step
LOGIT_BYTES_TRAIN = 10  # bf16 logits + fp32 cast + fp32 transposed copy (kept as the softmax)
LOGIT_BYTES_TEACHER = 8  # fp32 logits + fp32 transposed copy


# ------------------------------------------------------------------------------------------------
# Parameters
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LayerParams:
    kind: str  # 'M' Mamba, '*' attention, '-' MLP (hybrid); 'T' a GPT transformer layer
    total: int
    tp_sharded: int  # the part split over tensor-parallel ranks; the rest is replicated


@dataclass(frozen=True)
class ParameterCounts:
    """The model's parameters as built by `nemo_rlp.models.build_model` (TP=1, meta device)."""

    total: int
    vocab_size: int
    embedding: int  # input word embeddings (vocab-parallel)
    output_layer: int  # the untied output layer; 0 when tied to the embedding
    other_first: int  # replicated parameters of the first stage outside layers (e.g. position table)
    final_norm: int
    layers: tuple[LayerParams, ...]

    def per_gpu(self, tp: int, pp: int, stage: int, tied: bool) -> int:
        """Parameters one GPU holds: its TP shard of stage `stage`'s layers and embeddings."""
        per_stage = len(self.layers) // pp
        layers = self.layers[stage * per_stage : (stage + 1) * per_stage]
        count = sum(lp.tp_sharded // tp + (lp.total - lp.tp_sharded) for lp in layers)
        if stage == 0:
            count += self.embedding // tp + self.other_first
        if stage == pp - 1:
            count += self.final_norm + self.output_layer // tp
            if tied and pp > 1:  # the last stage keeps its own copy of the tied embedding
                count += self.embedding // tp
        return count

    @property
    def matmul(self) -> int:
        """Parameters that multiply per token: all but an input embedding not tied to the output."""
        return self.total - (self.embedding if self.output_layer else 0)


def layer_kinds(m: ModelConfig) -> str:
    """One symbol per layer ('T' transformer, '*' attention, '-' MLP, 'M' Mamba): the architecture's
    declaration (`ArchitectureSpec.layer_kinds`, nemo_rlp.models.spec)."""
    return get_architecture(m.arch).layer_kinds(m)


def count_parameters(m: ModelConfig, vocab_size: int) -> ParameterCounts:
    """Build the model on the meta device at TP=1 and count its parameters by role."""
    import torch
    from megatron.core import parallel_state

    from nemo_rlp.models import build_model
    from nemo_rlp.parallel import distributed

    started = not parallel_state.model_parallel_is_initialized()
    if started:
        distributed.initialize(ParallelConfig(), seed=0)
    elif (parallel_state.get_tensor_model_parallel_world_size(), parallel_state.get_pipeline_model_parallel_world_size()) != (1, 1):
        raise RuntimeError("count_parameters needs megatron's parallel state at TP=1, PP=1 (or none)")
    try:
        with torch.device("meta"):
            model = build_model(m, vocab_size, 1, torch.device("meta"))
        kinds = layer_kinds(m)
        tp_local = get_architecture(m.arch).tp_local_parameters
        layers = [[0, 0] for _ in kinds]
        embedding = output = other = final_norm = 0
        for name, p in model.named_parameters():
            n = p.numel()
            if name.startswith("decoder.layers."):
                index = int(name.split(".")[2])
                sharded = getattr(p, "tensor_model_parallel", False) or name.endswith(tp_local)
                layers[index][0] += n
                layers[index][1] += n if sharded else 0
            elif name == "embedding.word_embeddings.weight":
                embedding += n
            elif name.startswith("embedding."):
                other += n
            elif name.startswith("output_layer."):
                output += n
            elif name.startswith("decoder."):
                final_norm += n
            else:
                raise RuntimeError(f"count_parameters: unexpected parameter {name}")
        total = sum(p.numel() for p in model.parameters())
        del model
    finally:
        if started:
            distributed.destroy()
    return ParameterCounts(
        total=total, vocab_size=vocab_size, embedding=embedding, output_layer=output, other_first=other,
        final_norm=final_norm,
        layers=tuple(LayerParams(kind, t, s) for kind, (t, s) in zip(kinds, layers)),
    )


# ------------------------------------------------------------------------------------------------
# Per-token byte counts of the memory model (module docstring)
# ------------------------------------------------------------------------------------------------


def _dims(m: ModelConfig) -> dict:
    head_dim = m.kv_channels or m.hidden_size // m.num_attention_heads
    heads = mamba_heads(m)
    d_inner = heads * m.mamba_head_dim
    return dict(
        h=m.hidden_size,
        q=m.num_attention_heads * head_dim,
        kv=(m.num_query_groups or m.num_attention_heads) * head_dim,
        head_dim=head_dim,
        kv_heads=m.num_query_groups or m.num_attention_heads,
        ffn=m.ffn_hidden_size or 4 * m.hidden_size,
        m_heads=heads,
        d_inner=d_inner,
        gn=m.mamba_num_groups * m.mamba_state_dim,
        conv_dim=d_inner + 2 * m.mamba_num_groups * m.mamba_state_dim,
        ssm_per_row=heads * m.mamba_head_dim * m.mamba_state_dim,
    )


def training_bytes_per_token(kind: str, m: ModelConfig, tp: int, sequence_parallel: bool = False) -> float:
    """Activation bytes one layer keeps for its backward, per token (bf16, no recompute)."""
    d = _dims(m)
    # layer input + normalised input: replicated over TP, or split over TP with sequence parallelism
    norm = 2 * d["h"] * 2 / (tp if sequence_parallel else 1)
    if kind == "*":
        qk_norm = (d["q"] + d["kv"]) if m.qk_layernorm else 0
        return norm + 2 * ((d["q"] + 2 * d["kv"]) + qk_norm + (2 * d["q"] + 2 * d["kv"])) / tp
    if kind == "-":
        fc1 = d["ffn"] * (2 if m.gated_linear_unit else 1)
        return norm + 2 * (fc1 + d["ffn"]) / tp
    if kind == "M":
        in_proj = 2 * d["d_inner"] + 2 * d["gn"] + d["m_heads"]
        return norm + 2 * (in_proj + d["conv_dim"] + 2 * d["d_inner"]) / tp + 8 * d["m_heads"] / tp
    if kind == "T":
        return (training_bytes_per_token("*", m, tp, sequence_parallel)
                + training_bytes_per_token("-", m, tp, sequence_parallel))
    raise ValueError(f"unknown layer kind {kind!r}")


def inference_bytes_per_token(m: ModelConfig, tp: int, kinds: str, dtype_bytes: int = 2) -> float:
    """The working set of a forward without gradients, per token: hidden states plus the widest
    layer's intermediates (one layer at a time)."""
    d = _dims(m)
    widest = 0.0
    for kind in set(kinds):
        if kind in "*T":
            widest = max(widest, (d["q"] + 2 * d["kv"] + d["q"]) / tp)
        if kind in "-T":
            widest = max(widest, (d["ffn"] * (2 if m.gated_linear_unit else 1) + d["ffn"]) / tp)
        if kind == "M":
            in_proj = 2 * d["d_inner"] + 2 * d["gn"] + d["m_heads"]
            # fp32 chunk states of the SSD scan, one per chunk of `mamba_chunk_size` tokens
            states = d["ssm_per_row"] * 4 / dtype_bytes / m.mamba_chunk_size
            widest = max(widest, (in_proj + d["conv_dim"] + 2 * d["d_inner"] + states) / tp)
    return dtype_bytes * (3 * d["h"] + widest)


# ------------------------------------------------------------------------------------------------
# The plan
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Hardware:
    nodes: int = 1
    gpus_per_node: int = 8
    gpu_memory_gib: float = 80.0
    reserve_gib: float = 6.0

    @property
    def world_size(self) -> int:
        return self.nodes * self.gpus_per_node


@dataclass(frozen=True)
class WhatIf:
    """Changes to plan without editing the config (the distributed optimizer is not in the trainer
    yet); a plan with any of them set says so in its header."""

    distributed_optimizer: bool = False  # shard the fp32 master copy and Adam moments over DP
    rollout_chunk_contexts: Optional[int] = None  # contexts rolled out at once (None: rlp.rollout_batch_contexts)
    # RLP training microbatches of this many rows (the trainer's rlp.micro_batch_rows; None: the config's)
    train_microbatch_rows: Optional[int] = None
    teacher_rows: Optional[int] = None  # windows per teacher forward (None: rlp.score_batch_windows)

    def active(self) -> list[str]:
        out = ["distributed optimizer"] if self.distributed_optimizer else []
        for key in ("rollout_chunk_contexts", "train_microbatch_rows", "teacher_rows"):
            value = getattr(self, key)
            if value is not None:
                if value < 1:
                    raise ConfigError(f"what-if {key}={value} is not allowed: an integer >= 1")
                out.append(f"{key}={value}")
        return out


@dataclass
class Phase:
    name: str
    items: list[tuple[str, float]]  # (what, bytes)
    note: str = ""
    hint: str = ""

    @property
    def bytes(self) -> float:
        return sum(b for _, b in self.items)


@dataclass
class StageMemory:
    stage: int
    params: int
    static: list[tuple[str, float]]
    phases: list[Phase]
    reserve: float

    @property
    def static_bytes(self) -> float:
        return sum(b for _, b in self.static)

    @property
    def largest_phase(self) -> Phase:
        return max(self.phases, key=lambda p: p.bytes)

    @property
    def peak(self) -> float:
        return self.static_bytes + self.largest_phase.bytes + self.reserve


@dataclass
class Plan:
    experiment: str
    cfg: RunConfig
    hardware: Hardware
    counts: ParameterCounts
    what_if: WhatIf
    tp: int
    pp: int
    dp: int
    contexts_per_rank: int
    stages: list[StageMemory]
    tokens: dict[str, float] = field(default_factory=dict)
    flops: dict[str, float] = field(default_factory=dict)
    run: dict[str, float] = field(default_factory=dict)
    # Set by `make_plan` when the layout does not fit: the smallest node count at which it would
    # (same TP/PP), or None when no data-parallel size helps.
    fits_from_nodes: Optional[int] = None

    @property
    def worst(self) -> StageMemory:
        return max(self.stages, key=lambda s: s.peak)

    @property
    def fits(self) -> bool:
        return self.worst.peak <= self.hardware.gpu_memory_gib * GiB

    @property
    def published(self) -> Optional[float]:
        return PUBLISHED_PARAMETERS.get(self.cfg.model.name)

    def table(self) -> str:
        return format_plan(self)

    def refusal(self) -> str:
        """Why the layout does not fit and what shrinks it; empty when it fits."""
        if self.fits:
            return ""
        worst = self.worst
        phase = worst.largest_phase
        top = sorted(worst.static + phase.items, key=lambda item: -item[1])[:3]
        where = f" on pipeline stage {worst.stage}" if self.pp > 1 else ""
        return (
            f"layout does not fit: {worst.peak / GiB:.1f} GiB per GPU{where} during {phase.name} > "
            f"{self.hardware.gpu_memory_gib:g} GiB (--gpu-memory-gib). Largest items: "
            + ", ".join(f"{name} {b / GiB:.1f} GiB" for name, b in top)
            + f". {phase.hint} "
            + (
                f"With TP={self.tp} PP={self.pp} it fits from {self.fits_from_nodes} nodes (--nodes / sbatch --nodes)."
                if self.fits_from_nodes
                else f"No node count fits TP={self.tp} PP={self.pp}: this phase does not shrink with more "
                "data-parallel replicas."
            )
        )


def make_plan(
    cfg: RunConfig,
    hardware: Hardware,
    counts: ParameterCounts,
    experiment: str = "",
    what_if: WhatIf = WhatIf(),
    search_nodes: bool = True,
) -> Plan:
    """The plan of `cfg` on `hardware`; `counts` from `count_parameters` (at the layout's vocabulary).
    When it does not fit and `search_nodes`, also finds the smallest node count that would."""
    what_if.active()  # validates
    r, t, p = cfg.rlp, cfg.trainer, cfg.parallel
    tp, pp = p.tensor_model_parallel_size, p.pipeline_model_parallel_size
    from nemo_rlp.parallel.distributed import check_layout

    dp = check_layout(p, hardware.world_size)
    for key, total in (("rlp.contexts_per_step", r.contexts_per_step), ("trainer.ntp_batch_size", t.ntp_batch_size)):
        if total < dp:
            raise ConfigError(f"{key}={total} is smaller than the data-parallel size {dp}: every rank needs one")
    work = _RankWork.of(cfg, counts, dp, what_if)
    # The layer kinds of each pipeline stage, as the architecture splits them (nemo_rlp.models.spec).
    stage_layer_kinds = get_architecture(cfg.model.arch).stages(cfg.model, pp)
    stages = []
    for s in range(pp):
        stage_kinds = stage_layer_kinds[s]
        stage = _StagePlanner(cfg, work, s, stage_kinds)
        params = counts.per_gpu(tp, pp, s, cfg.model.share_embeddings_and_output_weights)
        phases = [stage.teacher_phase(), stage.rollout_phase(), stage.rlp_training_phase(), stage.ntp_training_phase()]
        stages.append(StageMemory(s, params, _static_items(cfg, params, dp, what_if), phases,
                                  hardware.reserve_gib * GiB))

    plan = Plan(
        experiment=experiment, cfg=cfg, hardware=hardware, counts=counts, what_if=what_if,
        tp=tp, pp=pp, dp=dp, contexts_per_rank=work.b, stages=stages,
    )
    _tokens_and_flops(plan)
    if search_nodes and not plan.fits:
        plan.fits_from_nodes = _smallest_fitting_nodes(cfg, hardware, counts, what_if)
    return plan


@dataclass(frozen=True)
class _RankWork:
    """How much one data-parallel rank does in an RLP step and an NTP step, as the code splits it."""

    b: int  # contexts per rank
    V: int  # vocabulary
    w_bytes: int  # bytes per weight (and per cached value) in the model's dtype
    positions: int  # the sampler's cache length: prompt (context + <think>), L thoughts, </think>
    width: int  # training inputs: row (context, <think>, thought, </think>, x_t) minus the last token
    windows: int  # teacher windows per forward
    roll_contexts: int  # contexts per rollout chunk
    R: int  # rollout rows at once
    train_rows: int  # RLP rows per training microbatch
    train_micro: int  # RLP training microbatches
    ntp_rows: int  # NTP rows per microbatch
    ntp_micro: int  # NTP microbatches

    @staticmethod
    def of(cfg: RunConfig, counts: ParameterCounts, dp: int, what_if: WhatIf) -> _RankWork:
        r, d, t = cfg.rlp, cfg.data, cfg.trainer
        b = -(-r.contexts_per_step // dp)
        G, L, c = r.group_size, r.max_thought_len, d.max_context
        ntp_rank = -(-t.ntp_batch_size // dp)
        ntp_rows = t.ntp_micro_batch_size or ntp_rank
        windows = -(-b // d.positions_per_document)
        teacher_rows = what_if.teacher_rows or r.score_batch_windows
        if teacher_rows:
            windows = min(windows, teacher_rows)
        roll_contexts = min(b, what_if.rollout_chunk_contexts or r.rollout_batch_contexts or b)
        train_rows = what_if.train_microbatch_rows or r.micro_batch_rows or (r.micro_batch_contexts or b) * G
        return _RankWork(
            b=b, V=counts.vocab_size, w_bytes=2 if cfg.model.params_dtype == "bf16" else 4,
            positions=c + 1 + L + 1, width=c + L + 2, windows=windows, roll_contexts=roll_contexts,
            R=roll_contexts * G, train_rows=train_rows, train_micro=-(-b * G // train_rows),
            ntp_rows=ntp_rows, ntp_micro=-(-ntp_rank // ntp_rows),
        )


def _static_items(cfg: RunConfig, params: float, dp: int, what_if: WhatIf) -> list[tuple[str, float]]:
    """What a GPU holds for the whole run: weights, the EMA teacher, gradients, the optimizer state."""
    m = cfg.model
    w_bytes = 2 if m.params_dtype == "bf16" else 4
    opt_bytes = 12 if m.params_dtype == "bf16" else 8
    sharded = what_if.distributed_optimizer or cfg.parallel.distributed_optimizer
    shards = dp if sharded else 1
    return [
        (f"weights ({m.params_dtype})", params * w_bytes),
        ("EMA teacher (fp32)", params * 4.0),
        ("gradients (fp32 main grads)", params * 4.0),
        (
            f"optimizer (fp32 master + Adam m, v; {'sharded over DP=' + str(dp) if sharded else 'not sharded'})",
            params * opt_bytes / shards,
        ),
    ]


class _StagePlanner:
    """The working memory of each phase of a step on pipeline stage `s` (layers `stage_kinds`)."""

    def __init__(self, cfg: RunConfig, work: _RankWork, s: int, stage_kinds: str) -> None:
        self.cfg, self.work, self.s, self.stage_kinds = cfg, work, s, stage_kinds
        self.m, self.tp, self.pp = cfg.model, cfg.parallel.tensor_model_parallel_size, cfg.parallel.pipeline_model_parallel_size
        self.last = s == self.pp - 1
        self.dims = _dims(cfg.model)
        self.n_attn = sum(k in "*T" for k in stage_kinds)
        self.n_mamba = stage_kinds.count("M")

    def teacher_phase(self) -> Phase:
        """1. teacher scoring."""
        w, c = self.work, self.cfg.data.max_context
        teacher_tokens = w.windows * (c + 1)
        return Phase(
            "teacher scoring (S_ema)",
            [("teacher working set (fp32)", teacher_tokens * inference_bytes_per_token(self.m, self.tp, self.stage_kinds, 4))]
            + ([("teacher logits (fp32)", teacher_tokens * w.V / self.tp * LOGIT_BYTES_TEACHER)] if self.last else []),
            note=f"{w.windows} windows x {c + 1} tokens per forward",
            hint="Fewer windows per forward: more data-parallel replicas (sbatch --nodes) or a larger "
            "data.positions_per_document.",
        )

    def rollout_phase(self) -> Phase:
        """2. rollout."""
        w, r, dims, tp, c = self.work, self.cfg.rlp, self.dims, self.tp, self.cfg.data.max_context
        kv_layer = 2 * w.R * w.positions * (dims["kv_heads"] // tp) * dims["head_dim"] * w.w_bytes
        ssm_layer = w.R * ((dims["conv_dim"] // tp) * 4 + dims["ssm_per_row"] // tp) * w.w_bytes
        n_attn, n_mamba = self.n_attn, self.n_mamba
        if r.rollout_mode == "recompute":
            cache, copy, prefill_tokens = 0.0, 0.0, w.R * w.positions
        else:
            cache = n_attn * kv_layer + n_mamba * ssm_layer
            copy = max(kv_layer / 2 if n_attn else 0.0, ssm_layer if n_mamba else 0.0)
            # `rows` prefills one context at a time; `shared_prefill` a chunk's contexts at once.
            prefill_tokens = {"rows": 1, "shared_prefill": w.roll_contexts}.get(r.rollout_mode, w.R) * (c + 1)
        sampling = w.R * w.V * SAMPLING_BYTES_PER_ROW_AND_VOCAB
        prefill = prefill_tokens * inference_bytes_per_token(self.m, tp, self.stage_kinds, w.w_bytes)
        items = []
        if n_attn:
            items.append((f"KV cache ({n_attn} attention layers)", n_attn * kv_layer if cache else 0.0))
        if n_mamba:
            items.append((f"Mamba conv+SSM states ({n_mamba} layers)", n_mamba * ssm_layer if cache else 0.0))
        if prefill >= sampling + copy:
            items.append(("prefill working set", prefill))
        else:
            items += [("sampling buffers (full-vocab fp32)", sampling), ("cache row copy", copy)]
        return Phase(
            "rollout",
            items,
            note=f"{w.R} rows (= {w.roll_contexts} contexts x G={r.group_size}) x {w.positions} positions",
            hint="Fewer rows per rank: more data-parallel replicas (sbatch --nodes) cut rlp.contexts_per_step / DP; "
            "a larger TP shards the KV and Mamba states (not the full-vocabulary sampling buffers).",
        )

    def training(self, rows: int, seq: int, microbatches: int, what: str, hint: str, scored: int = 0) -> Phase:
        """3./4. a training microbatch. `scored`: tokens per row that get logits (0: all; RLP rows: the
        thought and x_t only)."""
        m, tp, p = self.m, self.tp, self.cfg.parallel
        tokens = rows * seq
        inflight = min(self.pp - self.s, microbatches)
        layer_bytes = sum(training_bytes_per_token(k, m, tp, p.sequence_parallel) for k in self.stage_kinds)
        items = [(f"activations ({len(self.stage_kinds)} layers, {inflight} microbatch(es) in flight)",
                  tokens * layer_bytes * inflight)]
        if self.last:
            split = tp if p.sequence_parallel else 1
            items.append(("final norm + output layer inputs", tokens * 2 * self.dims["h"] * 2 / split))
            items.append(("logits + loss (bf16 + fp32 copies)", rows * (scored or seq) * self.work.V / tp * LOGIT_BYTES_TRAIN))
        return Phase(what, items, note=f"microbatch {rows} rows x {seq} tokens, {microbatches} microbatch(es)",
                     hint=hint)

    def rlp_training_phase(self) -> Phase:
        w, r = self.work, self.cfg.rlp
        return self.training(
            w.train_rows, w.width, w.train_micro, "RLP training microbatch",
            f"A smaller microbatch: rlp.micro_batch_rows (now {r.micro_batch_rows}; 0 means whole groups "
            f"of G={r.group_size} rows of {w.width} tokens), or a larger TP.",
            # Packed rows make logits only where the loss reads them (nemo_rlp.training.packing.logits_at).
            scored=r.max_thought_len + 1 if r.pack_rows else 0,
        )

    def ntp_training_phase(self) -> Phase:
        t = self.cfg.trainer
        return self.training(
            self.work.ntp_rows, self.cfg.data.ntp_seq_len, self.work.ntp_micro, "NTP training microbatch",
            f"A smaller NTP microbatch: trainer.ntp_micro_batch_size (now {t.ntp_micro_batch_size}).",
        )


def _smallest_fitting_nodes(cfg: RunConfig, hardware: Hardware, counts: ParameterCounts, what_if: WhatIf,
                            max_nodes: int = 256) -> Optional[int]:
    """The fewest nodes (same TP/PP, GPU and node sizes) at which the plan fits; None if none up to
    the point where every rank has a single context."""
    from dataclasses import replace

    p = cfg.parallel
    replica = p.tensor_model_parallel_size * p.pipeline_model_parallel_size
    for nodes in range(1, max_nodes + 1):
        world = nodes * hardware.gpus_per_node
        if world % replica:
            continue
        dp = world // replica
        if dp > min(cfg.rlp.contexts_per_step, cfg.trainer.ntp_batch_size):
            return None
        trial = make_plan(cfg, replace(hardware, nodes=nodes), counts, what_if=what_if, search_nodes=False)
        if trial.fits:
            return nodes
    return None


def schedule_counts(cfg: RunConfig) -> tuple[int, int]:
    """(NTP steps, RLP steps) among `trainer.steps` under `trainer.schedule`."""
    from nemo_rlp.training.schedule import RLP, step_kind

    s, steps = cfg.trainer.schedule, cfg.trainer.steps
    warm = min(s.ntp_warmup_steps, steps)
    cycle = s.ntp_per_cycle + s.rlp_per_cycle
    full, rest = divmod(steps - warm, cycle)
    rlp = full * s.rlp_per_cycle + sum(step_kind(warm + full * cycle + i, s) == RLP for i in range(rest))
    return steps - rlp, rlp


# ------------------------------------------------------------------------------------------------
# FLOPs (module docstring): shared by the plan (worst-case token counts) and the training logs' MFU
# (the tokens a step actually ran; `nemo_rlp.training.metrics.throughput`)
# ------------------------------------------------------------------------------------------------

FORWARD_FLOPS_PER_PARAMETER = 2  # per token run forward only
TRAIN_FLOPS_PER_PARAMETER = 6  # per trained token: forward and backward


def model_flops(matmul_parameters: float, forward_tokens: float, trained_tokens: float) -> float:
    """FLOPs of `forward_tokens` forward-only and `trained_tokens` trained tokens through N
    `matmul_parameters` (the quadratic attention term left out)."""
    return matmul_parameters * (FORWARD_FLOPS_PER_PARAMETER * forward_tokens + TRAIN_FLOPS_PER_PARAMETER * trained_tokens)


def rollout_tokens(mode: str, group_size: int, prefix_lengths, thought_lengths) -> tuple[float, float]:
    """(prefill tokens, decoding steps x rows) of one rollout batch in `rlp.rollout_mode` `mode`:
    `prefix_lengths` per context (its context and the start marker), `thought_lengths` per row (G
    rows per context, in order). Every row decodes its thought and one more step (S_pred)."""
    import numpy as np

    prefix = np.asarray(prefix_lengths, dtype=np.float64)
    thought = np.asarray(thought_lengths, dtype=np.float64)
    if mode in ("shared_prefill", "rows"):
        return float(prefix.sum()), float((thought + 1).sum())
    if mode == "cache":
        return float(group_size * prefix.sum()), float((thought + 1).sum())
    # recompute: every decoding step runs the whole prefix again, sum over i = 0..len of (prefix + i)
    per_row = np.repeat(prefix, group_size)
    return float(((thought + 1) * per_row + thought * (thought + 1) / 2).sum()), 0.0


def extra_forward_tokens(r, trained_tokens: float) -> float:
    """Forward-only tokens an RLP update spends beside its training forward: θ_old's log-probs of the
    rows trained after the first update (several minibatches, `recompute`; S_pred comes from the
    rollout whatever the microbatches) and the KL reference's forward (`rlp.kl_beta` > 0)."""
    later_rows = 1 - 1 / r.num_minibatches
    return trained_tokens * ((r.logprob_source == "recompute") * later_rows + (r.kl_beta > 0))


def local_matmul_parameters(model, post_process: bool = True) -> int:
    """N of the module docstring for the shard of the model one rank holds (its tensor-parallel
    shard of its pipeline stage): all parameters but the input embedding, which multiplies only when
    it is also the output layer (tied, and this stage the last: no `output_layer.weight` of its own)."""
    names = dict(model.named_parameters())
    total = sum(p.numel() for p in names.values())
    embedding = next((p.numel() for n, p in names.items() if n.endswith("embedding.word_embeddings.weight")), 0)
    own_output = any(n.endswith("output_layer.weight") for n in names)
    return total - (0 if post_process and not own_output else embedding)


@dataclass(frozen=True)
class StepTokens:
    """Tokens through the model in one RLP step and one NTP step (all replicas), by what they cost:
    forward-only (teacher scoring, rollout prefill, decoding, extra forwards) and trained (fwd + bwd)."""

    teacher: int
    prefill: int
    decode: int
    extra_forward: float
    trained: int
    ntp: int

    @property
    def rlp_forward_only(self) -> float:
        return self.teacher + self.prefill + self.decode + self.extra_forward

    def rlp_flops(self, n: float) -> float:
        """2N per forward-only token, 6N per trained token (:func:`model_flops`)."""
        return model_flops(n, self.rlp_forward_only, self.trained)

    def ntp_flops(self, n: float) -> float:
        return model_flops(n, 0, self.ntp)


def step_tokens(cfg: RunConfig) -> StepTokens:
    """The token counts behind the plan's FLOPs (module docstring), upper bounds: every context at
    data.max_context tokens, every thought at rlp.max_thought_len."""
    r, d, t = cfg.rlp, cfg.data, cfg.trainer
    B, G, L, c = r.contexts_per_step, r.group_size, r.max_thought_len, d.max_context
    prefill, decode = (int(x) for x in rollout_tokens(r.rollout_mode, G, [c + 1] * B, [L] * (B * G)))
    trained = B * G * (c + L + 2)
    return StepTokens(
        teacher=-(-B // d.positions_per_document) * (c + 1),
        prefill=prefill,
        decode=decode,
        extra_forward=extra_forward_tokens(r, trained),
        trained=trained,
        ntp=t.ntp_batch_size * d.ntp_seq_len,
    )


def compute_matched_cpt(cfg: RunConfig) -> tuple[RunConfig, list[str]]:
    """The compute-matched continued-pretraining (CPT) baseline of an RLP run: the same NTP warm-up and
    interleaved NTP steps, and every RLP step replaced by as many NTP steps as its FLOPs buy
    (:func:`step_tokens`: rollouts, teacher scoring and RLP training, at their upper bounds, so the
    baseline gets at least the compute RLP spent). Returns the NTP-only config and the arithmetic."""
    s = cfg.trainer.schedule
    if s.rlp_per_cycle == 0:
        raise ConfigError("trainer.schedule.compute_matched_cpt=true needs the RLP run's schedule "
                          "(rlp_per_cycle >= 1) to match; this one has no RLP step")
    ntp_steps, rlp_steps = schedule_counts(cfg)
    tok = step_tokens(cfg)
    ratio = tok.rlp_flops(1.0) / tok.ntp_flops(1.0)
    extra = math.ceil(rlp_steps * ratio)
    steps = ntp_steps + extra
    schedule = dataclasses.replace(s, ntp_per_cycle=1, rlp_per_cycle=0, compute_matched_cpt=False)
    out = dataclasses.replace(cfg, trainer=dataclasses.replace(cfg.trainer, steps=steps, schedule=schedule))
    r = cfg.rlp
    lines = [
        "compute-matched CPT: every RLP step of the configured run becomes NTP steps of the same FLOPs "
        "(N = matrix-multiply parameters; 2N per forward-only token, 6N per trained token):",
        f"  RLP step = 2N x (teacher {tok.teacher} + prefill {tok.prefill} + decoding {tok.decode} + extra "
        f"{tok.extra_forward:g}) + 6N x trained {tok.trained} = {tok.rlp_flops(1.0):,.0f} N",
        f"  NTP step = 6N x {tok.ntp} tokens ({cfg.trainer.ntp_batch_size} x {cfg.data.ntp_seq_len}) "
        f"= {tok.ntp_flops(1.0):,.0f} N",
        f"  one RLP step = {ratio:.3f} NTP steps; {rlp_steps} RLP steps -> {extra} NTP steps",
        f"  steps: {ntp_steps} NTP (warm-up {min(s.ntp_warmup_steps, cfg.trainer.steps)} + interleaved) + {extra} "
        f"= {steps}, all NTP",
        f"  (by tokens instead, the paper's T_flop = n*l_seq*bs*iters + T_inp: G*L*B = {r.group_size}*"
        f"{r.max_thought_len}*{r.contexts_per_step} thought + B*c = {r.contexts_per_step * cfg.data.max_context} "
        f"context tokens per RLP step, {rlp_steps * (r.group_size * r.max_thought_len * r.contexts_per_step + r.contexts_per_step * cfg.data.max_context) / tok.ntp:.0f} "
        "NTP steps: FLOP matching gives the baseline more)",
    ]
    return out, lines


def _tokens_and_flops(plan: Plan) -> None:
    cfg, n = plan.cfg, plan.counts.matmul
    r, d, t = cfg.rlp, cfg.data, cfg.trainer
    B, G, L, c = r.contexts_per_step, r.group_size, r.max_thought_len, d.max_context
    tok = step_tokens(cfg)
    teacher, prefill, decode, extra_forward, trained, ntp = (
        tok.teacher, tok.prefill, tok.decode, tok.extra_forward, tok.trained, tok.ntp)
    plan.tokens = {
        "thought tokens sampled (B*G*L)": B * G * L,
        "teacher-scored tokens": teacher,
        "rollout prefill tokens": prefill,
        "rollout decoding steps x rows": decode,
        "trained tokens (B*G*(c+L+2))": trained,
        "NTP step tokens": ntp,
    }
    rlp_flops = model_flops(n, teacher + prefill + decode + extra_forward, trained)
    plan.flops = {
        "RLP step: forward-only (2N x teacher, prefill, decoding tokens)": model_flops(n, teacher + prefill + decode + extra_forward, 0),
        "RLP step: training (6N x trained tokens)": model_flops(n, 0, trained),
        "RLP step total": rlp_flops,
        "NTP step (6N x tokens)": model_flops(n, 0, ntp),
    }
    ntp_steps, rlp_steps = schedule_counts(cfg)
    context_tokens = B * c * rlp_steps
    ntp_tokens = ntp * ntp_steps
    plan.run = {
        "steps (NTP / RLP)": (ntp_steps, rlp_steps),
        "run FLOPs": rlp_flops * rlp_steps + model_flops(n, 0, ntp) * ntp_steps,
        "n*l_seq*bs*iters (G*L*B*RLP steps)": G * L * B * rlp_steps,
        "T_inp: RLP contexts (B*c*RLP steps, upper bound)": context_tokens,
        "T_inp: NTP tokens": ntp_tokens,
        "T_flop": G * L * B * rlp_steps + context_tokens + ntp_tokens,
    }


# ------------------------------------------------------------------------------------------------
# Printing
# ------------------------------------------------------------------------------------------------


def _si(x: float) -> str:
    for unit, scale in (("Z", 1e21), ("E", 1e18), ("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.2f}{unit}"
    return f"{x:.0f}"


def format_plan(plan: Plan) -> str:
    cfg, hw, counts = plan.cfg, plan.hardware, plan.counts
    m, r, d = cfg.model, cfg.rlp, cfg.data
    lines = []
    title = f"plan: {plan.experiment or '(base config)'}  model={m.name} ({m.arch}, {m.num_layers} layers)"
    lines.append(title)
    if plan.what_if.active():
        lines.append("WHAT-IF (not the config as it is): " + ", ".join(plan.what_if.active()))
    lines.append(
        f"layout: {hw.nodes} node(s) x {hw.gpus_per_node} GPUs = {hw.world_size}; TP={plan.tp} PP={plan.pp} "
        f"-> DP={plan.dp} model replicas of {plan.tp * plan.pp} GPUs; {hw.gpu_memory_gib:g} GiB per GPU; "
        f"sequence parallel {'on' if cfg.parallel.sequence_parallel else 'off'}, distributed optimizer "
        f"{'on' if cfg.parallel.distributed_optimizer or plan.what_if.distributed_optimizer else 'off'}"
    )
    published = plan.published
    deviation = f"; published {published / 1e9:.2f}B, {100 * (counts.total / published - 1):+.2f}%" if published else ""
    lines.append(f"parameters: {counts.total:,} ({counts.total / 1e9:.3f}B{deviation}); vocabulary {counts.vocab_size:,}")
    lines.append(
        f"RLP step: B={r.contexts_per_step} contexts ({plan.contexts_per_rank} per DP rank), G={r.group_size}, "
        f"L={r.max_thought_len}, context <= {d.max_context}, T={r.temperature}, tau={r.ema_decay}, "
        f"lr={cfg.trainer.lr:g}, KL beta={r.kl_beta:g}, micro_batch_contexts={r.micro_batch_contexts}"
    )
    lines.append("")
    for stage in plan.stages:
        where = f" (pipeline stage {stage.stage})" if plan.pp > 1 else ""
        lines.append(f"memory per GPU{where}, GiB; {stage.params:,} parameters on this GPU")
        rows: list[tuple[str, str]] = [(f"  {name}", f"{b / GiB:8.2f}") for name, b in stage.static]
        rows.append(("  static total", f"{stage.static_bytes / GiB:8.2f}"))
        largest = stage.largest_phase
        for phase in stage.phases:
            mark = "  <- largest" if phase is largest else ""
            rows.append((f"  phase: {phase.name} [{phase.note}]", f"{phase.bytes / GiB:8.2f}{mark}"))
            rows += [(f"      {name}", f"{b / GiB:8.2f}") for name, b in phase.items]
        rows.append(("  runtime reserve (CUDA context, NCCL, TE workspaces, fragmentation)", f"{stage.reserve / GiB:8.2f}"))
        verdict = "fits" if stage.peak <= hw.gpu_memory_gib * GiB else "DOES NOT FIT"
        rows.append((f"  peak = static + largest phase + reserve", f"{stage.peak / GiB:8.2f}  of {hw.gpu_memory_gib:g}: {verdict}"))
        width = max(len(a) for a, _ in rows)
        lines += [f"{a:<{width}}  {b}" for a, b in rows]
        lines.append("")
    tokens = [(f"  {k}", _si(v)) for k, v in plan.tokens.items()]
    flops = [(f"  {k}", f"{_si(v)}FLOP ({_si(v / hw.world_size)}FLOP per GPU)") for k, v in plan.flops.items()]
    ntp_steps, rlp_steps = plan.run["steps (NTP / RLP)"]
    run = [
        ("  steps (trainer.steps; NTP / RLP)", f"{ntp_steps + rlp_steps} ({ntp_steps} / {rlp_steps})"),
        ("  run FLOPs", f"{_si(plan.run['run FLOPs'])}FLOP"),
    ] + [(f"  {k}", _si(v)) for k, v in plan.run.items() if k not in ("steps (NTP / RLP)", "run FLOPs")]
    width = max(len(a) for a, _ in tokens + flops + run)
    for heading, rows in (
        ("tokens per step (all replicas; worst case: full contexts, every thought runs to L)", tokens),
        ("FLOPs per step (all replicas; attention's quadratic term left out)", flops),
        ("compute-matched CPT baseline over the run: T_flop = n*l_seq*bs*iters + T_inp tokens", run),
    ):
        lines.append(heading)
        lines += [f"{a:<{width}}  {b}" for a, b in rows]
    lines.append("")
    lines.append("fits" if plan.fits else plan.refusal())
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# Time per RLP step (`python -m nemo_rlp.plan ... --time h100|h200`)
# ------------------------------------------------------------------------------------------------
#
# Seconds per phase of one RLP step on one model replica (TP x PP GPUs; replicas run in parallel),
# next to the roofline floor of the same work (peak FLOP/s or HBM bandwidth, whichever binds, no
# overhead). Symbols as in the module docstring; N the multiplying parameters, W = P_replica *
# weight bytes, kv = bytes of one cached position over all attention layers, st = bytes of one row's
# Mamba states over all Mamba layers, all divided by TP per GPU.
#
# The schedule is not assumed: `nemo_rlp.rollout.schedule.replay_step` replays the sampler's own
# rules (checked against `sample_thoughts`' counters, tests/unit/test_rollout_schedule.py) on this
# replica's contexts: lengths drawn from the configured distribution (`data.rlp_positions=uniform`:
# uniform in [min_context, max_context]; `marked`: all c), thoughts all L (`--thoughts full`, the
# worst case the memory plan also takes) or truncated-geometric with a quarter at L (`geometric`, the
# bench's mixed workload), in chunks of `rlp.rollout_batch_contexts`. It gives decode steps, rows
# computed and live, context tokens fed through decode, attended positions, cache cells copied.
# The host work per decode step is measured on the real engine (`measure_host_work`: aten ops per
# layer and per step, host syncs per step, on the tiny model of the same architecture on CPU).
#
# Phases (seconds per step):
# - rollout prefill: 2N * prefill tokens + attention 2 * s^2 * q * attention layers per context of
#   s tokens, / TP, at PREFILL_EFFICIENCY of peak.
# - rollout decode: per the whole schedule, max(FLOPs / peak, bytes / (HBM * DECODE_BW_EFFICIENCY))
#   with FLOPs = 2N * rows computed / TP and bytes = decode steps * W / TP (weights read every step)
#   + attended positions * kv + rows computed * 2 * st (states read and written) + rows computed *
#   sampling bytes: V * SAMPLING_BYTES_PER_ROW_AND_VOCAB for the lockstep path (full-vocabulary fp32
#   sampling on every TP rank), V * 4 (the noise, drawn whole on every rank) + V / TP * (that - 4)
#   for `rows` (sampling on the rank's vocabulary shard); plus, with TP
#   > 1, decode steps * all-reduces per step * TP_ALLREDUCE_S (two per attention+MLP, one per Mamba
#   layer: latency-bound at decode sizes).
# - cache traffic: 2 * (compaction cells * kv + compaction rows * st) (read and write), plus for the
#   lockstep path 2 * re-rotated keys * kv / 2 (megatron's static cache keeps keys before RoPE and
#   rotates the whole cached prefix every step), / (HBM * DECODE_BW_EFFICIENCY).
# - host overhead: per decode step, host = ops * LAUNCH_S + syncs * SYNC_S with ops = ops_per_layer *
#   layers + ops_per_step. With >= 1 sync per step the host waits for the device every step and its
#   time adds up (exposed = host); with fewer, host and device overlap (exposed = max(0, host -
#   device step)). The decode is host-bound when the host time per step exceeds the device's.
# - teacher scoring: 2N * teacher tokens (+ attention), training: 6N * trained tokens (+ 3x the
#   attention term, + a forward when θ_old's scores are recomputed first), NTP: this step's share
#   (ntp_per_cycle / rlp_per_cycle) of 6N * NTP tokens of the replica; all / (TP * PP) at
#   TRAIN_EFFICIENCY or PREFILL_EFFICIENCY of peak.
# - optimizer + EMA: OPTIMIZER_BYTES_PER_PARAM per parameter on the GPU at HBM bandwidth, plus the
#   data-parallel gradient all-reduce 2 * (DP - 1) / DP * P_gpu * 4 bytes at the inter-node bandwidth.
# Floors: the same work at peak with no efficiency loss, no host and no cache copies; the decode floor
# reads the weights once per step of the `rows` schedule and only each live row's own positions.
# Not modelled: pipeline bubbles, NCCL contention with compute, stragglers, checkpointing.


@dataclass(frozen=True)
class Accelerator:
    name: str
    flops: float  # dense bf16 FLOP/s
    hbm: float  # bytes/s
    inter_node: float  # bytes/s per GPU (InfiniBand)


ACCELERATORS = {
    "h100": Accelerator("H100 SXM", 989e12, 3.35e12, 50e9),
    "h200": Accelerator("H200 SXM", 989e12, 4.8e12, 50e9),
}
PREFILL_EFFICIENCY = 0.5  # achieved fraction of peak FLOP/s in a large forward (prefill, teacher)
TRAIN_EFFICIENCY = 0.4  # achieved fraction of peak FLOP/s in training (forward + backward)
DECODE_BW_EFFICIENCY = 0.7  # achieved fraction of HBM bandwidth in decode kernels
LAUNCH_S = 6e-6  # host time per eager aten op (Python, dispatcher, kernel launch)
SYNC_S = 30e-6  # one device-to-host read once the device has drained
TP_ALLREDUCE_S = 10e-6  # one small all-reduce inside an NVLink node
OPTIMIZER_BYTES_PER_PARAM = 30 + 10  # Adam (grad 4, master 8, m 8, v 8, bf16 weight 2) + EMA (10)


@dataclass
class StepTime:
    accelerator: Accelerator
    mode: str
    chunk: int
    schedule: object  # nemo_rlp.rollout.schedule.Schedule of this replica's step
    host_ops_per_step: float
    syncs_per_step: float
    phases: list[tuple[str, float, float]]  # (phase, seconds, floor seconds)
    device_step_s: float  # device time of one decode step (mean)
    host_step_s: float  # host time of one decode step
    recommended_chunk: Optional[int] = None

    @property
    def host_bound(self) -> bool:
        return self.host_step_s > self.device_step_s


def _rollout_lengths(cfg: RunConfig, contexts: int, thoughts: str, seed: int = 0):
    import numpy as np

    rng = np.random.default_rng(seed)
    d, r = cfg.data, cfg.rlp
    if d.rlp_positions == "uniform":
        context_lens = rng.integers(d.min_context, d.max_context + 1, contexts)
    else:
        context_lens = np.full(contexts, d.max_context)
    rows = contexts * r.group_size
    L = r.max_thought_len
    if thoughts == "full":
        return context_lens, np.full(rows, L)
    p = 1.0 - 0.25 ** (1.0 / (L - 1))  # a quarter reach L (bench/rollout.py's mixed workload)
    return context_lens, np.minimum(rng.geometric(p, rows), L)


def _allreduces_per_step(kinds: str, tp: int) -> int:
    """Tensor-parallel all-reduces of one decode step: attention and MLP outputs, Mamba out_proj,
    and the logits' vocabulary gather."""
    if tp == 1:
        return 0
    return 2 * kinds.count("T") + kinds.count("*") + kinds.count("-") + kinds.count("M") + 1


def plan_step_time(plan: Plan, accelerator: str, thoughts: str = "full", host_work=None) -> StepTime:
    """Seconds per phase of one RLP step of `plan` (formulas above). `host_work` (a
    `schedule.HostWork`) is measured on the tiny model of the same architecture when not given."""
    from nemo_rlp.rollout.schedule import measure_host_work, replay_step

    cfg, acc = plan.cfg, ACCELERATORS[accelerator]
    m, r = cfg.model, cfg.rlp
    if r.rollout_mode not in ("rows", "shared_prefill"):
        raise ConfigError(f"--time models rlp.rollout_mode=rows or shared_prefill, not {r.rollout_mode!r}")
    b, G, L, tp = plan.contexts_per_rank, r.group_size, r.max_thought_len, plan.tp
    chunk = min(b, plan.what_if.rollout_chunk_contexts or r.rollout_batch_contexts or b)
    context_lens, thought_lens = _rollout_lengths(cfg, b, thoughts)
    sched = replay_step(r.rollout_mode, context_lens, thought_lens, G, L, chunk)
    ideal = replay_step("rows", context_lens, thought_lens, G, L, chunk)
    host_work = host_work or measure_host_work(m.arch, r.rollout_mode)
    kinds, dims, w = layer_kinds(m), _dims(m), (2 if m.params_dtype == "bf16" else 4)
    N, V, n_attn = plan.counts.matmul, plan.counts.vocab_size, sum(k in "*T" for k in kinds)
    kv = n_attn * 2 * dims["kv"] * w / tp  # one cached position, all attention layers, per GPU
    states = kinds.count("M") * (dims["conv_dim"] * 4 + dims["ssm_per_row"]) * w / tp
    weights = plan.counts.total * w / tp
    attn_flops = 2 * dims["q"] * n_attn  # x s^2 for a causal forward over s tokens
    bw = acc.hbm * DECODE_BW_EFFICIENCY

    prefill = (2 * N * sched.prefill_tokens + attn_flops * sched.prefill_square) / tp
    prefill_floor = (2 * N * ideal.prefill_tokens + attn_flops * ideal.prefill_square) / tp / acc.flops
    decode_flops = (2 * N * sched.row_steps + 2 * attn_flops * sched.attended_cells) / tp
    # Lockstep: every TP rank samples on the full-vocabulary fp32 logits; rows: on its V/TP shard
    # (nemo_rlp.rollout.vocab_shard), but each rank still draws the whole vocabulary's noise.
    sampling = V * SAMPLING_BYTES_PER_ROW_AND_VOCAB if r.rollout_mode == "shared_prefill" \
        else V * 4 + V / tp * (SAMPLING_BYTES_PER_ROW_AND_VOCAB - 4)
    decode_bytes = (sched.decode_steps * weights + sched.attended_cells * kv + sched.row_steps * 2 * states
                    + sched.row_steps * sampling)
    decode = max(decode_flops / acc.flops, decode_bytes / bw)
    decode += sched.decode_steps * _allreduces_per_step(kinds, tp) * TP_ALLREDUCE_S
    useful_rows = int((thought_lens + 1).sum())
    own_cells = float(((thought_lens + 1) * (context_lens.repeat(G) + 1) + thought_lens * (thought_lens + 1) / 2).sum())
    decode_floor = max((2 * N * useful_rows + 2 * attn_flops * own_cells) / tp / acc.flops,
                       (ideal.decode_steps * weights + own_cells * kv + useful_rows * (2 * states + 4 * V)) / acc.hbm)
    cache = (2 * (sched.compaction_cells * kv + sched.compaction_rows * states) + sched.rope_cells * kv) / bw

    host_step = (host_work.ops_per_layer * len(kinds) + host_work.ops_per_step) * LAUNCH_S \
        + host_work.syncs_per_step * SYNC_S
    device_step = (decode + cache) / max(1, sched.decode_steps)
    exposed = host_step if host_work.syncs_per_step >= 1 else max(0.0, host_step - device_step)
    training = _training_phases(plan, acc)
    phases = [
        ("rollout prefill", prefill / (acc.flops * PREFILL_EFFICIENCY), prefill_floor),
        ("rollout decode", decode, decode_floor),
        ("rollout cache traffic (compaction, RoPE over the prefix)", cache, 0.0),
        ("rollout host overhead (exposed)", exposed * sched.decode_steps, 0.0),
    ] + training
    return StepTime(acc, r.rollout_mode, chunk, sched, host_work.ops_per_layer * len(kinds) + host_work.ops_per_step,
                    host_work.syncs_per_step, phases, device_step, host_step, _largest_fitting_chunk(plan))


def _training_phases(plan: Plan, acc: Accelerator) -> list[tuple[str, float, float]]:
    """Teacher scoring, RLP training, NTP (this step's share) and optimizer + EMA, per replica."""
    cfg = plan.cfg
    m, r, d, t = cfg.model, cfg.rlp, cfg.data, cfg.trainer
    kinds, dims = layer_kinds(m), _dims(m)
    N, gpus = plan.counts.matmul, plan.tp * plan.pp
    attn_flops = 2 * dims["q"] * sum(k in "*T" for k in kinds)
    b, G, L, c = plan.contexts_per_rank, r.group_size, r.max_thought_len, d.max_context
    windows = -(-b // d.positions_per_document)
    teacher = 2 * N * windows * (c + 1) + attn_flops * windows * (c + 1) ** 2
    width, rows = c + L + 2, b * G
    train = 6 * N * rows * width + 3 * attn_flops * rows * width**2
    scores_first = r.logprob_source == "recompute" and (
        r.num_minibatches > 1 or plan.what_if.train_microbatch_rows is not None or r.micro_batch_rows > 0)
    forward_only = (scores_first + (r.kl_beta > 0)) * train / 3
    share = t.schedule.ntp_per_cycle / max(1, t.schedule.rlp_per_cycle)
    ntp_rows = -(-t.ntp_batch_size // plan.dp)
    ntp = share * (6 * N * ntp_rows * d.ntp_seq_len + 3 * attn_flops * ntp_rows * d.ntp_seq_len**2)
    params = max(stage.params for stage in plan.stages)
    optimizer_bytes = params * OPTIMIZER_BYTES_PER_PARAM * (1 + share)
    allreduce = 2 * (plan.dp - 1) / plan.dp * params * 4 * (1 + share) / acc.inter_node
    return [
        ("teacher scoring (S_ema)", teacher / gpus / (acc.flops * PREFILL_EFFICIENCY), teacher / gpus / acc.flops),
        ("RLP training", (train + forward_only) / gpus / (acc.flops * TRAIN_EFFICIENCY), (train + forward_only) / gpus / acc.flops),
        (f"NTP ({share:g} step(s) per RLP step)", ntp / gpus / (acc.flops * TRAIN_EFFICIENCY), ntp / gpus / acc.flops),
        ("optimizer + EMA + DP all-reduce", optimizer_bytes / (acc.hbm * DECODE_BW_EFFICIENCY) + allreduce,
         optimizer_bytes / acc.hbm + allreduce),
    ]


def _largest_fitting_chunk(plan: Plan) -> Optional[int]:
    """The most contexts per rollout chunk (halving from all of a rank's) whose memory plan fits."""
    import dataclasses

    k = plan.contexts_per_rank
    while k >= 1:
        what_if = dataclasses.replace(plan.what_if, rollout_chunk_contexts=k)
        if make_plan(plan.cfg, plan.hardware, plan.counts, plan.experiment, what_if, search_nodes=False).fits:
            return k
        k //= 2
    return None


def format_step_time(plan: Plan, st: StepTime, thoughts: str) -> str:
    s = st.schedule
    lines = [
        f"time per RLP step on {st.accelerator.name} (one replica of TP={plan.tp} x PP={plan.pp} GPUs; "
        f"DP={plan.dp} replicas in parallel): rlp.rollout_mode={st.mode}, {st.chunk} contexts per rollout chunk, "
        f"thoughts {thoughts}",
        f"  schedule (replayed from the sampler's rules): {s.decode_steps} decode steps, "
        f"{s.row_steps / max(1, s.decode_steps):.0f} rows per step, occupancy {s.mean_occupancy:.2f}, "
        f"{s.context_tokens_decoded:,} context tokens through decode, {s.generated_tokens:,} thought tokens",
        f"  host per decode step (measured on CPU): {st.host_ops_per_step:,.0f} aten ops, "
        f"{st.syncs_per_step:.2f} host syncs -> {st.host_step_s * 1e3:.2f} ms host vs "
        f"{st.device_step_s * 1e3:.2f} ms device",
    ]
    width = max(len(name) for name, _, _ in st.phases) + 2
    lines.append(f"  {'phase':<{width}} {'seconds':>9} {'floor':>9} {'x floor':>8}")
    for name, seconds, floor in st.phases:
        ratio = f"{seconds / floor:7.1f}x" if floor > 0 else "       -"
        lines.append(f"  {name:<{width}} {seconds:9.2f} {floor:9.2f} {ratio}")
    total, floor_total = sum(p[1] for p in st.phases), sum(p[2] for p in st.phases)
    lines.append(f"  {'total':<{width}} {total:9.2f} {floor_total:9.2f} {total / floor_total:7.1f}x")
    top = max(st.phases, key=lambda p: p[1])
    lines.append(f"  dominant phase: {top[0]} ({100 * top[1] / total:.0f}% of the step)")
    if st.host_bound:
        advice = (f"; the memory plan fits rlp.rollout_batch_contexts={st.recommended_chunk} "
                  f"({-(-plan.contexts_per_rank // st.recommended_chunk)} chunk(s) per step)"
                  if st.recommended_chunk and st.recommended_chunk > st.chunk else "")
        advice = advice or "; CUDA graphs (megatron's dynamic engine on GPU) would remove most of the host work"
        lines.append(f"  WARNING: the decode is host-bound ({st.host_step_s * 1e3:.2f} ms host > "
                     f"{st.device_step_s * 1e3:.2f} ms device per step) at {st.chunk} contexts per chunk" + advice)
    elif st.recommended_chunk and st.recommended_chunk > st.chunk:
        lines.append(f"  note: the memory plan fits rlp.rollout_batch_contexts={st.recommended_chunk}")
    return "\n".join(lines)
