"""The run configuration: typed dataclasses, composed by Hydra from `nemo_rlp/conf/`, validated before any work.

Config is data. Every module receives the piece of this tree it needs; none reads the environment or
globals behind the config's back. `load_config` is the one way a run gets its config (the Hydra entry
point and the tests both use it), so a bad value is rejected the same way everywhere: a
`ConfigError` naming the key, the value and what is allowed, raised before megatron-core is imported.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import signal
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

# The allowed values of settings that other modules dispatch on are theirs, named once; these
# modules import neither torch nor megatron-core, so validation still runs before either is loaded.
from nemo_rlp.data.marked import POSITIONS
from nemo_rlp.data.megatron_ntp import NTP_DATASETS
from nemo_rlp.data.sources import FORMATS
from nemo_rlp.models.spec import architecture_names, get_architecture
from nemo_rlp.rollout.modes import GPU_MODES as GPU_ROLLOUT_MODES
from nemo_rlp.rollout.modes import MODES as ROLLOUT_MODES

CONF_DIR = Path(__file__).resolve().parent / "conf"


class ConfigError(ValueError):
    """A configuration value that cannot run. The message names the key, the value and the fix."""


@dataclass
class ModelConfig:
    """A megatron-core model. `arch` names a registered architecture (`nemo_rlp.models.spec`)."""

    name: str = "tiny_gpt"
    arch: str = "gpt"
    num_layers: int = 2
    hidden_size: int = 64
    ffn_hidden_size: Optional[int] = None  # None: 4 * hidden_size
    num_attention_heads: int = 4
    num_query_groups: Optional[int] = None  # None: multi-head attention
    kv_channels: Optional[int] = None
    # None: the tokenizer's vocabulary padded up to a multiple of `make_vocab_size_divisible_by * TP`.
    vocab_size: Optional[int] = None
    make_vocab_size_divisible_by: int = 128
    max_sequence_length: int = 512
    position_embedding_type: str = "rope"
    rotary_base: int = 10000
    normalization: str = "RMSNorm"
    gated_linear_unit: bool = True  # SwiGLU with `activation: silu`
    activation: str = "silu"
    qk_layernorm: bool = False
    add_bias_linear: bool = False
    share_embeddings_and_output_weights: bool = True
    init_method_std: float = 0.02
    params_dtype: str = "fp32"
    layernorm_epsilon: float = 1.0e-5
    # Hybrid Mamba-Transformer (arch: hybrid, megatron-core MambaModel): one symbol per layer,
    # 'M' Mamba-2 mixer, '*' self-attention, '-' MLP (e.g. Nemotron-H "M-M-M-M*-...").
    hybrid_override_pattern: Optional[str] = None
    mamba_num_heads: Optional[int] = None  # None: 2 * hidden_size / mamba_head_dim (megatron's)
    mamba_head_dim: int = 64
    mamba_state_dim: int = 128
    mamba_num_groups: int = 8
    mamba_chunk_size: int = 128  # the SSD scan's chunk length


@dataclass
class DataConfig:
    # None: the corpus and tokenizer bundled with the package (the embedded default).
    corpus: Optional[str] = None
    tokenizer: Optional[str] = None
    # The tokenizer's end-of-document token (separates documents in NTP batches), and its padding
    # token (null: the end-of-document token; pads only ever follow a row's last real token).
    eod_token: str = "<|endoftext|>"
    pad_token: Optional[str] = "<pad>"
    text_key: str = "text"
    ntp_seq_len: int = 128
    min_context: int = 8
    max_context: int = 128
    # "jsonl" ({text_key: ...} per line), "text" (one document per line), or "indexed": a Megatron
    # indexed dataset whose path prefix (PREFIX.bin + PREFIX.idx) is `corpus` (recipes/preprocess_data.py).
    format: str = "jsonl"
    # Instead of `corpus`: several sources of `format` mixed by weight, [[weight, path], ...]. The RLP
    # contexts weigh them by shares of documents (nemo_rlp.data.sources.BlendedDocuments); the NTP
    # batches of data.ntp_dataset=megatron by shares of tokens, as Megatron does.
    blend: Optional[list] = None
    # Where NTP batches come from (nemo_rlp.data.megatron_ntp): "megatron", megatron-core's GPTDataset
    # (a blend through BlendedMegatronDatasetBuilder) over indexed data whose documents end with the
    # end-of-document id (preprocess_data.py --append-eod); "ours", nemo_rlp's NTPBatcher over the
    # loaded documents; "auto", megatron for such indexed data, ours otherwise (JSONL and text, the demo).
    ntp_dataset: str = "auto"
    # megatron: samples the dataset is built for (null: one pass over the data, a size and an order
    # that do not depend on trainer.steps; past them the samples repeat), and where its indices are
    # cached (null: <output_dir>/ntp_dataset_cache).
    ntp_samples: Optional[int] = None
    ntp_cache_dir: Optional[str] = None
    # RLP positions drawn per document window; one EMA-teacher forward per window scores all of them.
    positions_per_document: int = 1
    # [low, high]: keep only RLP positions whose no-think log-prob lies in the band. None: off.
    logprob_band: Optional[list[float]] = None
    # Where RLP thinks: "uniform" (any position, the paper) or "marked": only positions a JSON-lines
    # corpus marks under `positions_key` (character offsets, nemo_rlp/data/marked.py), e.g. the
    # answers of the bundled demo corpus.
    rlp_positions: str = "uniform"
    positions_key: str = "answers"


@dataclass
class RLPConfig:
    """RLP's knobs; defaults are the paper's (docs/design.md section 1)."""

    group_size: int = 16  # G
    max_thought_len: int = 2048  # L, sampled tokens including a sampled end marker
    temperature: float = 0.7
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1.0: off
    ema_decay: float = 0.999  # tau
    # The clip range is left open in docs/design.md; 0.2 is the usual PPO/GRPO value.
    eps_low: float = 0.2
    eps_high: float = 0.2
    kl_beta: float = 0.0  # paper: a KL anchor (to the EMA teacher here) did not help
    contexts_per_step: int = 512  # B
    think_start: str = "<think>"
    think_end: str = "</think>"
    # How thoughts are decoded (nemo_rlp.rollout.sampler): `rows` (every context prefilled once at its
    # own length, per-row positions), the lockstep modes: one cached prefill per context shared by its
    # G thoughts (`shared_prefill`, the default), a cached prefill per thought, or no cache at all
    # (reference); `dynamic`: megatron's dynamic engine (GPU only, not yet run).
    rollout_mode: str = "shared_prefill"
    # Optimizer steps per rollout batch (the clipped surrogate's reason to exist); paper: 1.
    num_minibatches: int = 1
    # Contexts (each with its G thoughts) per microbatch of the training forward; 0: all at once.
    micro_batch_contexts: int = 0
    # > 0: training microbatches of this many thought rows instead, splitting groups anywhere (the
    # advantages are computed over whole groups first, from the rollout's S_pred: no extra forward).
    # For models whose G rows do not fit at once.
    micro_batch_rows: int = 0
    # Training microbatches run packed: rows laid end to end without padding (megatron's THD packed
    # sequences; nemo_rlp.training.packing). The same loss and gradients as padded rows.
    pack_rows: bool = True
    # Contexts rolled out at once (0: all of the rank's); bounds the KV/SSM cache to G times that.
    rollout_batch_contexts: int = 0
    # Document windows per EMA-teacher scoring forward (0: all at once).
    score_batch_windows: int = 0
    # Where θ_old's log-probs and S_pred come from: the training forward ("recompute", exact on the
    # first step and kernel-consistent) or the rollout pass ("sampler"); see training/steps.py.
    logprob_source: str = "recompute"
    # Multiplies the RLP gradients before clipping and the optimizer step; NTP gradients are left as
    # they are. NTP and RLP updates share one optimizer, so this sets RLP's weight in Adam's moments
    # (a learning-rate factor would not: Adam's momentum carries RLP gradients into the NTP updates
    # that follow at the full rate). 1.0: the paper's setting.
    grad_scale: float = 1.0
    # Log how much of the reward is the teacher's own probability of the start marker: S_ema is
    # log p̄(x_t), lowered by the mass p̄ puts on <think> where the corpus often thinks; the metric
    # reward_marker_term = -log(1 - p̄(<think> | x_<t)) is that part of the reward (one extra no-grad
    # teacher forward over the contexts; off in the at-scale recipes).
    log_marker_term: bool = False


@dataclass
class ScheduleConfig:
    """Which kind of batch each optimizer step takes: NTP warm-up, then cycles of NTP and RLP."""

    ntp_warmup_steps: int = 0
    ntp_per_cycle: int = 1
    rlp_per_cycle: int = 1
    # The compute-matched NTP-only baseline (CPT) of this schedule: every RLP step becomes NTP steps
    # of the same FLOPs (nemo_rlp.planning.compute_matched_cpt prints the arithmetic at start-up).
    compute_matched_cpt: bool = False


@dataclass
class TrainerConfig:
    steps: int = 1000
    seed: int = 1234
    lr: float = 1.0e-6  # paper: constant 1e-6
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1.0e-8
    clip_grad: float = 1.0
    ntp_batch_size: int = 8
    ntp_micro_batch_size: int = 0  # 0: the whole per-rank batch in one microbatch
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    # The learning-rate schedule (megatron-core's OptimizerParamScheduler), counted in optimizer
    # updates (an RLP step makes rlp.num_minibatches of them). Default: constant `lr` (paper).
    lr_decay_style: str = "constant"  # constant | linear | cosine | inverse-square-root
    lr_warmup_steps: int = 0  # linear warm-up from lr_warmup_init to lr
    lr_warmup_init: float = 0.0
    lr_decay_steps: Optional[int] = None  # None: every optimizer update of the run
    min_lr: float = 0.0
    # Over this share of the updates after the NTP warm-up (the last ones), the scheduled lr is annealed
    # linearly to 0, as pretraining runs end. A share, so that an RLP run and its compute-matched CPT
    # baseline (more, cheaper steps) anneal over the same share of their compute. 0: no anneal.
    lr_cooldown_fraction: float = 0.0
    # A step whose loss, rewards or gradients are not finite is skipped (no update, logged); this
    # many skipped steps in a row stop the run with an error.
    max_consecutive_skips: int = 10


@dataclass
class ParallelConfig:
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    # megatron's sequence parallelism (needs TP > 1): norms, residuals and dropout run on 1/TP of the
    # tokens, and each TP all-reduce becomes a reduce-scatter + all-gather pair that overlaps with the
    # linears (TE's userbuffers on GPU). Training only: rollouts and scoring switch it off, as
    # megatron's own inference does.
    sequence_parallel: bool = False
    # megatron's distributed optimizer: the fp32 master weights and Adam moments sharded over the
    # data-parallel ranks (gradients reduce-scattered, weights all-gathered). Needs CUDA: megatron
    # requires torch.cuda tensors (distrib_optimizer.py:420 in megatron-core 0.16.1).
    distributed_optimizer: bool = False
    # "auto": nccl when CUDA is available, else gloo.
    backend: str = "auto"


@dataclass
class WandbConfig:
    """Weights & Biases beside TensorBoard: the same scalars, from the main rank only
    (`nemo_rlp.training.metrics`). Needs the `wandb` extra (`pip install 'nemo-rlp[wandb]'`)."""

    enabled: bool = False
    project: str = "nemo-rlp"
    entity: Optional[str] = None  # None: the W&B default entity of the logged-in user
    name: Optional[str] = None  # None: the output directory's name (also every invocation's W&B group)
    # offline: no network; the run is written under `dir` and uploaded later with `wandb sync`.
    mode: str = "online"
    dir: Optional[str] = None  # None: the output directory (W&B writes <dir>/wandb/)


@dataclass
class LoggingConfig:
    # None: outputs/<model.name>-<hash of the config less volatile keys>, relative to the launch
    # directory: the same for every invocation of one run (checkpoints, metrics and report together).
    output_dir: Optional[str] = None
    metrics_file: str = "metrics.jsonl"
    tensorboard: bool = True
    log_every: int = 1
    # How many sampled thoughts to print (decoded) every `log_every` RLP steps; 0: none.
    show_thoughts: int = 1
    # At the end: <output_dir>/report/report.md, PNG plots and summary.json (nemo_rlp.training.report).
    report: bool = True
    # Dense peak TFLOP/s of one device in the training dtype (e.g. 989 for an H100 SXM in bf16):
    # the logs then carry MFU, the model FLOPs a device ran per second over this. None: no MFU.
    peak_tflops: Optional[float] = None
    wandb: WandbConfig = field(default_factory=WandbConfig)


WANDB_MODES = ("online", "offline", "disabled")


def validate_logging(lg: LoggingConfig) -> None:
    """The checks of the `logging` section that are not a plain range (`validate` calls it)."""
    if lg.peak_tflops is not None and not lg.peak_tflops > 0:
        _fail("logging.peak_tflops", lg.peak_tflops, "null (no MFU) or the device's peak TFLOP/s, > 0")
    w = lg.wandb
    if w.mode not in WANDB_MODES:
        _fail("logging.wandb.mode", w.mode, f"one of {', '.join(map(repr, WANDB_MODES))}")
    if w.enabled and not str(w.project or "").strip():
        _fail("logging.wandb.project", w.project, "a W&B project name")
    if w.enabled:
        import importlib.util

        if importlib.util.find_spec("wandb") is None:
            raise ConfigError(
                "logging.wandb.enabled=true needs the wandb package, which is not installed: "
                "pip install 'nemo-rlp[wandb]' (or pip install wandb), or set logging.wandb.enabled=false"
            )


@dataclass
class EvalConfig:
    """Held-out evaluation at marked positions, no thought vs a sampled thought
    (nemo_rlp.training.evaluate); at the end of the run and, optionally, after the NTP warm-up."""

    enabled: bool = False
    # A JSON-lines file with marked positions (nemo_rlp/data/marked.py). null: the held-out set
    # bundled with the demo corpus (only with the bundled corpus and tokenizer).
    corpus: Optional[str] = None
    num_positions: int = 0  # the first N marked positions of the file; 0: all of them
    thought_seeds: int = 3  # sampled thoughts per position (their mean per position gives the stderr)
    batch_contexts: int = 64  # contexts per forward / rollout batch
    after_warmup: bool = True  # also evaluate when the NTP warm-up ends (a baseline for RLP's effect)
    # Also every N steps (0: never), logged to the metrics as kind "eval": how the held-out figures move
    # during a run, not just where it ends (each costs one evaluation, ~30 s on the demo on 2 cores).
    every_steps: int = 0
    seed: int = 4321  # the thoughts' sampling noise: every evaluation of a run draws the same


SIGNAL_NAMES_UNCATCHABLE = ("SIGKILL", "SIGSTOP")


@dataclass
class CheckpointConfig:
    """Checkpoints (nemo_rlp.training.checkpoint) and preemption (nemo_rlp.training.preemption)."""

    # None: <output directory>/checkpoints (logging.output_dir, or its default), so that rerunning
    # the same command finds the same directory.
    dir: Optional[str] = None
    every_steps: int = 100  # 0: only at the end of the run and on a preemption signal
    keep_last: int = 2  # complete checkpoints kept; older ones are deleted after a save
    # Steps whose checkpoints are saved (whatever `every_steps` says) and never deleted by
    # `keep_last` (nor counted in it): branch points such as the end of the NTP warm-up, where a
    # baseline starts with `checkpoint.resume=<that step's directory>`. A step the run never reaches
    # (0, or beyond trainer.steps) keeps nothing.
    keep_steps: list[int] = field(default_factory=list)
    # auto: continue from the newest checkpoint in `dir` that passes its integrity check; never:
    # start fresh (the directory's checkpoints are moved to `dir`/superseded-<time>/); PATH: start
    # from that checkpoint (one checkpoint directory, always, whatever its name: a step_XXXXXXX
    # directory or a renamed copy; a directory of step_XXXXXXX ones: its newest, unless `dir`
    # already holds checkpoints of this run, as after a requeue).
    resume: str = "auto"
    # Start the policy from these weights when there is nothing to resume from: the output of
    # recipes/import_checkpoint.py, or any training checkpoint (its policy only; the optimizer,
    # data and counters start fresh, and the EMA teacher is seeded from these weights as always).
    init_weights: Optional[str] = None
    # Write the sharded tensors in a background process (megatron-core's async save); the next save,
    # the end of the run or a preemption waits for it.
    async_save: bool = False
    # A save (or the wait for an async one) that has not finished after this many seconds fails
    # loudly instead of hanging the run (nemo_rlp.training.checkpoint_writer); a writer process that
    # dies fails it at once.
    save_timeout_s: float = 1800.0
    # Signals that ask for a checkpoint at the next step boundary and an exit with the requeue
    # status (nemo_rlp.training.preemption.REQUEUE_EXIT_CODE); Slurm sends SIGTERM on preemption
    # and, with `--signal=USR1@SECONDS`, SIGUSR1 that long before the time limit; SIGINT is Ctrl-C.
    # A second one ends the process at once.
    signals: list[str] = field(default_factory=lambda: ["SIGTERM", "SIGUSR1", "SIGINT"])


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rlp: RLPConfig = field(default_factory=RLPConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


# ------------------------------------------------------------------------------------------------
# Keys and overrides: the command line's overrides are checked before Hydra composes them. Hydra
# answers an unknown key with exit status 1 and the hint "use +key=value", which then fails the
# schema check; check_overrides names the nearest valid key instead.
# ------------------------------------------------------------------------------------------------


def schema_keys(node: Any = RunConfig, prefix: str = "") -> list[str]:
    """Every dotted key of the config schema ('trainer.steps', 'trainer.schedule.ntp_per_cycle')."""
    keys = []
    for f in fields(node):
        default = f.default_factory() if callable(f.default_factory) else f.default  # type: ignore[misc]
        if is_dataclass(default):
            keys += schema_keys(type(default), f"{prefix}{f.name}.")
        else:
            keys.append(prefix + f.name)
    return keys


# conf/ folders that are not groups of the training config: recipes/evaluate.py's benchmark configs.
NOT_TRAINING_GROUPS = {"benchmark"}


def config_groups() -> set[str]:
    return {p.name for p in CONF_DIR.iterdir() if p.is_dir() and p.name not in NOT_TRAINING_GROUPS}


def nearest_key(key: str) -> Optional[str]:
    """The valid key a mistyped `key` most likely meant (None if nothing is close)."""
    keys = schema_keys()
    leaf = key.rsplit(".", 1)[-1]
    same_leaf = [k for k in keys if k.rsplit(".", 1)[-1] == leaf]
    if len(same_leaf) == 1:
        return same_leaf[0]
    close = difflib.get_close_matches(key, keys + sorted(config_groups()), n=1, cutoff=0.6)
    return close[0] if close else None


def check_overrides(arguments: list[str]) -> None:
    """Reject a `key=value` override whose key is in neither the schema nor the config groups,
    naming the nearest valid key. Overrides Hydra owns (`hydra.*`, `+key`, `~key`) and option
    flags are left to Hydra."""
    keys = set(schema_keys())
    groups = config_groups()
    for argument in arguments:
        if argument.startswith(("-", "+", "~")) or "=" not in argument:
            continue
        key = argument.split("=", 1)[0]
        if key.startswith("hydra.") or key == "hydra" or key in keys or key in groups:
            continue
        if any(k.startswith(key + ".") for k in keys):  # a whole section, e.g. trainer.schedule={...}
            continue
        suggestion = nearest_key(key)
        hint = f"did you mean {suggestion}?" if suggestion else "see nemo_rlp/config.py for the keys"
        raise ConfigError(f"{argument!r}: there is no config key {key!r}; {hint}")


# ------------------------------------------------------------------------------------------------
# Loading and validation
# ------------------------------------------------------------------------------------------------


def to_run_config(cfg: DictConfig | dict) -> RunConfig:
    """Merge a composed config onto the schema: unknown keys and wrong types fail here, by name."""
    try:
        merged = OmegaConf.merge(OmegaConf.structured(RunConfig), cfg)
        run = OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None) or "?"
        hint = ""
        if "not in" in _first_line(err):  # an unknown key: name the one it most likely meant
            suggestion = nearest_key(key)
            hint = f"; did you mean {suggestion}?" if suggestion else ""
        raise ConfigError(f"config key '{key}': {_first_line(err)}{hint}") from None
    assert isinstance(run, RunConfig)
    validate(run)
    return run


def load_config(overrides: list[str] | None = None, config_name: str = "config") -> RunConfig:
    """Compose `nemo_rlp/conf/<config_name>.yaml` with command-line style overrides, then validate."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        try:
            cfg = compose(config_name=config_name, overrides=list(overrides or []))
        except (HydraException, OmegaConfBaseException) as err:
            raise ConfigError(_first_line(err)) from None
    return to_run_config(cfg)


def _first_line(err: Exception) -> str:
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__


def _fail(key: str, value: Any, allowed: str) -> None:
    raise ConfigError(f"{key}={value!r} is not allowed: {allowed}")


def _one_of(values: tuple[str, ...]) -> str:
    """`'a', 'b' or 'c'`: a set of allowed values as the error messages write it."""
    quoted = [repr(v) for v in values]
    return quoted[0] if len(quoted) == 1 else ", ".join(quoted[:-1]) + " or " + quoted[-1]


LR_DECAY_STYLES = ("constant", "linear", "cosine", "inverse-square-root")
PARAMS_DTYPES = ("fp32", "bf16")
POSITION_EMBEDDINGS = ("rope", "learned_absolute", "none")
NORMALIZATIONS = ("RMSNorm", "LayerNorm")
ACTIVATIONS = ("silu", "gelu", "relu", "squared_relu")
LOGPROB_SOURCES = ("recompute", "sampler")
BACKENDS = ("auto", "gloo", "nccl")


def validate(cfg: RunConfig) -> None:
    """Reject every value that cannot run, before any work: each section on its own, then the checks
    that relate sections. Checks needing the world size or the tokenizer live with the code that
    knows them (`nemo_rlp.parallel`, `nemo_rlp.models`). The allowed values of a setting that another
    module dispatches on are that module's (the data formats, the rollout modes, the RLP positions)."""
    _validate_model(cfg.model)
    _validate_data(cfg.data)
    _validate_rlp(cfg.rlp)
    _validate_trainer(cfg.trainer)
    _validate_parallel(cfg.parallel)
    _validate_logging(cfg.logging)
    _validate_checkpoint(cfg.checkpoint)
    _validate_eval(cfg.eval)
    _validate_across_sections(cfg)


def _at_least_one(section: str, node: Any, keys: tuple[str, ...]) -> None:
    for key in keys:
        if getattr(node, key) < 1:
            _fail(f"{section}.{key}", getattr(node, key), "an integer >= 1")


def _validate_model(m: ModelConfig) -> None:
    if m.arch not in architecture_names():
        names = ", ".join(map(repr, architecture_names()))
        _fail("model.arch", m.arch, f"one of the registered architectures (nemo_rlp.models.spec): {names}")
    if not m.layernorm_epsilon > 0:
        _fail("model.layernorm_epsilon", m.layernorm_epsilon, "a float > 0")
    # The keys only this architecture reads are its own to check (nemo_rlp.models.spec).
    get_architecture(m.arch).validate(m, _fail)
    _at_least_one("model", m, ("num_layers", "hidden_size", "num_attention_heads", "max_sequence_length"))
    if m.hidden_size % m.num_attention_heads:
        _fail("model.hidden_size", m.hidden_size, f"a multiple of model.num_attention_heads={m.num_attention_heads}")
    if m.num_query_groups is not None and (m.num_query_groups < 1 or m.num_attention_heads % m.num_query_groups):
        _fail("model.num_query_groups", m.num_query_groups, "a divisor of model.num_attention_heads")
    if m.vocab_size is not None and m.vocab_size < 1:
        _fail("model.vocab_size", m.vocab_size, "null (from the tokenizer) or an integer >= 1")
    for key, allowed in (("params_dtype", PARAMS_DTYPES), ("position_embedding_type", POSITION_EMBEDDINGS),
                         ("normalization", NORMALIZATIONS), ("activation", ACTIVATIONS)):
        if getattr(m, key) not in allowed:
            _fail(f"model.{key}", getattr(m, key), _one_of(allowed))


def mamba_heads(m: ModelConfig) -> int:
    """The Mamba head count of a hybrid model: explicit, or 2 * hidden_size / mamba_head_dim."""
    return m.mamba_num_heads or 2 * m.hidden_size // m.mamba_head_dim


def _validate_data(d: DataConfig) -> None:
    if d.min_context < 1:
        _fail("data.min_context", d.min_context, "an integer >= 1 (x_t needs at least one token before it)")
    if d.max_context < d.min_context:
        _fail("data.max_context", d.max_context, f"an integer >= data.min_context={d.min_context}")
    _at_least_one("data", d, ("ntp_seq_len",))
    if d.tokenizer is not None and not Path(d.tokenizer).is_file():
        _fail("data.tokenizer", d.tokenizer, "an existing file (or null for the bundled one)")
    if d.format not in FORMATS:
        _fail("data.format", d.format, _one_of(FORMATS))
    if d.ntp_dataset not in NTP_DATASETS:
        _fail("data.ntp_dataset", d.ntp_dataset, _one_of(NTP_DATASETS))
    if d.ntp_dataset == "megatron" and d.format != "indexed":
        _fail("data.ntp_dataset", d.ntp_dataset, "'ours' or 'auto' for this data: megatron's GPTDataset reads "
              "indexed data (data.format=indexed)")
    if d.ntp_samples is not None and d.ntp_samples < 1:
        _fail("data.ntp_samples", d.ntp_samples, "null (one pass over the data) or an integer >= 1")
    _at_least_one("data", d, ("positions_per_document",))
    if d.logprob_band is not None and not (len(d.logprob_band) == 2 and d.logprob_band[0] < d.logprob_band[1]):
        _fail("data.logprob_band", d.logprob_band, "null (off) or [low, high] with low < high (log-probs, <= 0)")
    for key, path in _data_sources(d):
        _validate_source(key, path, d.format)
    if d.rlp_positions not in POSITIONS:
        _fail("data.rlp_positions", d.rlp_positions, _one_of(POSITIONS))
    if d.rlp_positions == "marked" and (d.format != "jsonl" or d.blend):
        _fail("data.rlp_positions", d.rlp_positions,
              "'uniform' with this data: marked positions need one JSON-lines corpus (data.format=jsonl, no blend)")


def _data_sources(d: DataConfig) -> list[tuple[str, str]]:
    """(key, path) of every corpus the data section names: `data.corpus`, or each `data.blend` entry."""
    sources = [("data.corpus", d.corpus)] if d.corpus is not None else []
    if d.blend is not None:
        if d.corpus is not None or not d.blend:
            _fail("data.blend", d.blend, "a non-empty list of [weight, path], with data.corpus null")
        for i, item in enumerate(d.blend):
            ok = isinstance(item, (list, tuple)) and len(item) == 2 and isinstance(item[1], str)
            if not (ok and isinstance(item[0], (int, float)) and not isinstance(item[0], bool) and item[0] > 0):
                _fail(f"data.blend[{i}]", item, "a [weight, path] pair with weight > 0")
            sources.append((f"data.blend[{i}]", item[1]))
    elif d.format != "jsonl" and d.corpus is None:
        _fail("data.corpus", d.corpus, f"a path for data.format={d.format!r} (only the bundled JSONL is built in)")
    return sources


def _validate_source(key: str, path: str, fmt: str) -> None:
    """A file for `jsonl` and `text`; for `indexed`, the path prefix of an existing PREFIX.bin + PREFIX.idx."""
    if fmt != "indexed":
        if not Path(path).is_file():
            bundled = " (or null for the bundled one)" if key == "data.corpus" else ""
            _fail(key, path, f"an existing file{bundled}")
        return
    stem, dot_suffix = path[:-4], path[-4:]
    if dot_suffix in (".bin", ".idx") and Path(stem + ".bin").is_file() and Path(stem + ".idx").is_file():
        _fail(key, path, f"the path prefix of an indexed dataset, without {dot_suffix}: {key}={stem}")
    for suffix in (".bin", ".idx"):
        if not Path(path + suffix).is_file():
            _fail(key, path, f"the path prefix of an indexed dataset, but {path}{suffix} does not exist "
                  "(build it with recipes/preprocess_data.py)")


def _validate_rlp(r: RLPConfig) -> None:
    if r.group_size < 2:
        _fail("rlp.group_size", r.group_size, "G >= 2 (the group-relative advantage divides by G-1)")
    if r.max_thought_len < 1:
        _fail("rlp.max_thought_len", r.max_thought_len, "an integer >= 1 (each thought has >= 1 token)")
    if not r.temperature > 0:
        _fail("rlp.temperature", r.temperature, "a float > 0 (paper: 0.7)")
    if r.top_k < 0:
        _fail("rlp.top_k", r.top_k, "an integer >= 0 (0 turns top-k off)")
    if not 0 < r.top_p <= 1:
        _fail("rlp.top_p", r.top_p, "a float in (0, 1] (1 turns top-p off)")
    if not 0 < r.ema_decay < 1:
        _fail("rlp.ema_decay", r.ema_decay, "a float in (0, 1) (paper: 0.999)")
    if not 0 <= r.eps_low < 1:
        _fail("rlp.eps_low", r.eps_low, "a float in [0, 1)")
    if r.eps_high < 0:
        _fail("rlp.eps_high", r.eps_high, "a float >= 0")
    if r.kl_beta < 0:
        _fail("rlp.kl_beta", r.kl_beta, "a float >= 0 (0 turns the KL term off)")
    _at_least_one("rlp", r, ("contexts_per_step",))
    if r.rollout_mode not in ROLLOUT_MODES + GPU_ROLLOUT_MODES:
        _fail("rlp.rollout_mode", r.rollout_mode, _one_of(ROLLOUT_MODES + GPU_ROLLOUT_MODES) + " (GPU)")
    if r.num_minibatches < 1:
        _fail("rlp.num_minibatches", r.num_minibatches, "an integer >= 1 (paper: 1)")
    if r.num_minibatches > r.contexts_per_step:
        _fail("rlp.num_minibatches", r.num_minibatches, f"<= rlp.contexts_per_step={r.contexts_per_step}")
    if r.micro_batch_contexts < 0:
        _fail("rlp.micro_batch_contexts", r.micro_batch_contexts, "an integer >= 0 (0: one microbatch)")
    for key in ("micro_batch_rows", "rollout_batch_contexts", "score_batch_windows"):
        if getattr(r, key) < 0:
            _fail(f"rlp.{key}", getattr(r, key), "an integer >= 0 (0: all at once)")
    if r.logprob_source not in LOGPROB_SOURCES:
        _fail("rlp.logprob_source", r.logprob_source, _one_of(LOGPROB_SOURCES))
    if r.think_start == r.think_end or not r.think_start or not r.think_end:
        _fail("rlp.think_end", r.think_end, "a non-empty marker different from rlp.think_start")
    if not (r.grad_scale > 0 and math.isfinite(r.grad_scale)):
        _fail("rlp.grad_scale", r.grad_scale, "a finite number > 0 (1.0: RLP gradients as they are)")


def _validate_trainer(t: TrainerConfig) -> None:
    _at_least_one("trainer", t, ("steps",))
    if not t.lr > 0:
        _fail("trainer.lr", t.lr, "a float > 0")
    if t.weight_decay < 0:
        _fail("trainer.weight_decay", t.weight_decay, "a float >= 0")
    for key in ("adam_beta1", "adam_beta2"):
        if not 0 <= getattr(t, key) < 1:
            _fail(f"trainer.{key}", getattr(t, key), "a float in [0, 1)")
    if not t.adam_eps > 0:
        _fail("trainer.adam_eps", t.adam_eps, "a float > 0")
    if t.lr_decay_style not in LR_DECAY_STYLES:
        _fail("trainer.lr_decay_style", t.lr_decay_style, "one of " + ", ".join(map(repr, LR_DECAY_STYLES)))
    if t.lr_warmup_steps < 0:
        _fail("trainer.lr_warmup_steps", t.lr_warmup_steps, "an integer >= 0 (0: no warm-up)")
    if not 0 <= t.lr_warmup_init <= t.lr:
        _fail("trainer.lr_warmup_init", t.lr_warmup_init, f"a float in [0, trainer.lr={t.lr}]")
    if not 0.0 <= t.lr_cooldown_fraction <= 1.0:
        _fail("trainer.lr_cooldown_fraction", t.lr_cooldown_fraction,
              "a float in [0, 1]: the share of the updates after the warm-up over which lr anneals to 0")
    if not 0 <= t.min_lr <= t.lr:
        _fail("trainer.min_lr", t.min_lr, f"a float in [0, trainer.lr={t.lr}]")
    if t.lr_decay_steps is not None and t.lr_decay_steps < 1:
        _fail("trainer.lr_decay_steps", t.lr_decay_steps, "null (every optimizer update of the run) or an integer >= 1")
    _at_least_one("trainer", t, ("max_consecutive_skips",))
    if t.clip_grad < 0:
        _fail("trainer.clip_grad", t.clip_grad, "a float >= 0 (0 turns clipping off)")
    _at_least_one("trainer", t, ("ntp_batch_size",))
    if t.ntp_micro_batch_size < 0:
        _fail("trainer.ntp_micro_batch_size", t.ntp_micro_batch_size, "an integer >= 0 (0: one microbatch)")
    s = t.schedule
    if s.ntp_warmup_steps < 0:
        _fail("trainer.schedule.ntp_warmup_steps", s.ntp_warmup_steps, "an integer >= 0")
    if s.ntp_per_cycle < 0 or s.rlp_per_cycle < 0 or s.ntp_per_cycle + s.rlp_per_cycle < 1:
        _fail("trainer.schedule.rlp_per_cycle", s.rlp_per_cycle,
              f"an integer >= 0 with ntp_per_cycle + rlp_per_cycle >= 1 (ntp_per_cycle={s.ntp_per_cycle})")


def _validate_parallel(p: ParallelConfig) -> None:
    _at_least_one("parallel", p, ("tensor_model_parallel_size", "pipeline_model_parallel_size"))
    if p.backend not in BACKENDS:
        _fail("parallel.backend", p.backend, _one_of(BACKENDS))
    if p.sequence_parallel and p.tensor_model_parallel_size < 2:
        _fail("parallel.sequence_parallel", p.sequence_parallel,
              "false with parallel.tensor_model_parallel_size=1 (it splits sequences over TP ranks)")


def _validate_logging(lg: LoggingConfig) -> None:
    _at_least_one("logging", lg, ("log_every",))
    if lg.show_thoughts < 0:
        _fail("logging.show_thoughts", lg.show_thoughts, "an integer >= 0")
    validate_logging(lg)


def _validate_checkpoint(c: CheckpointConfig) -> None:
    if c.every_steps < 0:
        _fail("checkpoint.every_steps", c.every_steps, "an integer >= 0 (0: only at the end and on a signal)")
    _at_least_one("checkpoint", c, ("keep_last",))
    if any(step < 0 for step in c.keep_steps):
        _fail("checkpoint.keep_steps", c.keep_steps, "a list of steps >= 0 (e.g. [2000]; [] keeps none)")
    if not c.save_timeout_s > 0:
        _fail("checkpoint.save_timeout_s", c.save_timeout_s, "a number of seconds > 0")
    if c.dir is not None and not str(c.dir).strip():
        _fail("checkpoint.dir", c.dir, "null (the default directory) or a non-empty path")
    if c.init_weights is not None and not (Path(c.init_weights) / "dist").is_dir():
        _fail("checkpoint.init_weights", c.init_weights,
              "a directory holding dist/ (recipes/import_checkpoint.py --out, or a step_XXXXXXX checkpoint)")
    if c.resume not in ("auto", "never") and not Path(c.resume).is_dir():
        _fail("checkpoint.resume", c.resume, "'auto', 'never' or the path of an existing checkpoint directory")
    for i, name in enumerate(c.signals):
        if not isinstance(name, str) or name not in signal.Signals.__members__ or name in SIGNAL_NAMES_UNCATCHABLE:
            _fail(f"checkpoint.signals[{i}]", name,
                  "the name of a catchable signal, e.g. 'SIGTERM' or 'SIGUSR1' (not SIGKILL or SIGSTOP)")
    if len(set(c.signals)) != len(c.signals):
        _fail("checkpoint.signals", c.signals, "each signal at most once")


def _validate_eval(e: EvalConfig) -> None:
    if e.num_positions < 0:
        _fail("eval.num_positions", e.num_positions, "an integer >= 0 (0: every marked position of eval.corpus)")
    if e.batch_contexts < 1 or e.thought_seeds < 1:
        _fail("eval.batch_contexts / eval.thought_seeds", (e.batch_contexts, e.thought_seeds), "integers >= 1")
    if e.every_steps < 0:
        _fail("eval.every_steps", e.every_steps, "an integer >= 0 (0: only after the warm-up and at the end)")


def _validate_across_sections(cfg: RunConfig) -> None:
    """What no section can check alone: row lengths against the model, the learning-rate horizon,
    the model's shapes against the parallel layout, the held-out set against the data."""
    m, d, r, t, p = cfg.model, cfg.data, cfg.rlp, cfg.trainer, cfg.parallel
    # The longest RLP row: context, start marker, thought (an end marker is inserted when it hits L),
    # end marker, x_t.
    longest = d.max_context + 1 + r.max_thought_len + 1 + 1
    if m.max_sequence_length < max(longest, d.ntp_seq_len):
        _fail("model.max_sequence_length", m.max_sequence_length,
              f">= data.max_context + rlp.max_thought_len + 3 = {longest} and >= data.ntp_seq_len={d.ntp_seq_len}")
    if t.lr_warmup_steps >= lr_decay_steps(cfg):
        _fail("trainer.lr_warmup_steps", t.lr_warmup_steps,
              f"fewer than the decay horizon of {lr_decay_steps(cfg)} optimizer updates (trainer.lr_decay_steps, "
              "or by default every update of the run)")
    if m.num_layers % p.pipeline_model_parallel_size:
        _fail("parallel.pipeline_model_parallel_size", p.pipeline_model_parallel_size,
              f"a divisor of model.num_layers={m.num_layers} (each stage holds as many layers)")
    # The architecture returns the counts of its own the tensor-parallel size must divide (the hybrid
    # family: Mamba heads and groups).
    divided = {"num_attention_heads": m.num_attention_heads, **get_architecture(m.arch).validate(m, _fail)}
    for key, count in divided.items():
        if count % p.tensor_model_parallel_size:
            _fail("parallel.tensor_model_parallel_size", p.tensor_model_parallel_size, f"a divisor of model.{key}={count}")
    e = cfg.eval
    if e.enabled and e.corpus is None and (d.corpus is not None or d.blend or d.tokenizer is not None):
        _fail("eval.corpus", None, "a JSON-lines file with marked positions (nemo_rlp/data/marked.py): the bundled "
              "held-out set fits only the bundled corpus and tokenizer. Or turn the evaluation off: eval=none")


def optimizer_updates(cfg: RunConfig) -> int:
    """Optimizer updates in a whole run: one per NTP step, `rlp.num_minibatches` per RLP step."""
    s, steps = cfg.trainer.schedule, cfg.trainer.steps
    warmup = min(s.ntp_warmup_steps, steps)
    cycle = s.ntp_per_cycle + s.rlp_per_cycle
    full, rest = divmod(steps - warmup, cycle)
    rlp_steps = full * s.rlp_per_cycle + max(0, rest - s.ntp_per_cycle)
    return steps - rlp_steps + rlp_steps * cfg.rlp.num_minibatches


def lr_decay_steps(cfg: RunConfig) -> int:
    """The learning-rate schedule's horizon in optimizer updates."""
    t = cfg.trainer
    return t.lr_decay_steps if t.lr_decay_steps is not None else max(1, optimizer_updates(cfg))


def lr_cooldown_updates(cfg: RunConfig) -> tuple[int, int]:
    """(optimizer updates of the run, the last of them over which lr anneals to 0): the share
    `trainer.lr_cooldown_fraction` of the updates after the NTP warm-up (one update per warm-up step)."""
    total = optimizer_updates(cfg)
    after_warmup = max(0, total - min(cfg.trainer.schedule.ntp_warmup_steps, cfg.trainer.steps))
    return total, round(cfg.trainer.lr_cooldown_fraction * after_warmup)


def as_dict(cfg: RunConfig) -> dict:
    return dataclasses.asdict(cfg)
