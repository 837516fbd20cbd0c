"""megatron-core hybrid model provider: hybrid Mamba-Transformer models (Nemotron-H class).

megatron-core's `HybridModel` from 0.18 (where `MambaModel` became a deprecated alias), its
`MambaModel` before: `HYBRID_API_BY_VERSION` says which, and how the layer norm is built.

The provider of the hybrid family (`nemo_rlp.models.hybrid`, which declares the rest of the
architecture): a `ModelConfig` with `arch: hybrid` in, a (possibly tensor-parallel) `MambaModel` out. The layer
pattern (`hybrid_override_pattern`) has one symbol per layer: 'M' a Mamba-2 mixer layer, '*' a
self-attention layer, '-' an MLP layer.

Layer specs:
- GPU with Transformer Engine: megatron's `mamba_stack_spec` (TE linears with fused norms), with the
  configured SSD chunk size and QK norms.
- Otherwise (CPU): a local spec of megatron-core modules only (ColumnParallelLinear /
  RowParallelLinear, torch SDPA core attention (`nemo_rlp.models.attention`), torch norms). megatron's `MambaStack` hard-codes a TE
  final norm (mamba_block.py:166 in megatron-core 0.16.1), so the local spec uses `LocalMambaStack`,
  which builds the same stack with a torch RMSNorm/LayerNorm as its final norm. Like megatron's
  ModelOpt spec (`remap_te_layernorm`), the local spec maps its separate norms onto the TE names in
  the distributed checkpoint (`norm.` -> `mixer.in_proj.layer_norm_`, ...), so CPU and GPU
  checkpoints share keys (the keys are tested on CPU; a CPU -> TE load has not been run here).

The Mamba mixer's fused kernels (mamba-ssm, causal-conv1d, Triton) are replaced by the pure-torch
ones in `nemo_rlp.models.mamba_cpu_kernels` when they are not usable; `build_hybrid` installs them.
(megatron and `nemo_rlp.models.attention`, which imports megatron, are imported inside functions: the
package is imported, and the config validated, before megatron-core is.)

Initialisation is independent of the tensor-parallel layout, as for the GPT provider. Embeddings,
attention, MLP and the mixer's out-projection honour `use_cpu_initialization` (full weights from one
seed, then sharded). The mixer's own parameters do not: conv1d, dt_bias and A_log are drawn per TP
rank from the model-parallel RNG (mamba_mixer.py:293-342), and its in-projection's output rows are
[z, x, B, C, dt] *per rank*, so a contiguous split of one full weight means different things at
different TP sizes. `_layout_independent_mixer_init` therefore redraws, for every mixer, the full
(TP=1) in_proj, conv1d, dt_bias and A_log from one generator with megatron's distributions and
defaults, and keeps this rank's slice of each part. D and the gated norm start at ones anyway.
"""

from __future__ import annotations

import copy
import functools
import importlib
import math
from dataclasses import dataclass

import torch

from nemo_rlp.models import mamba_cpu_kernels
from nemo_rlp.models.hybrid import mixer_fixes
from nemo_rlp.models.common import pipeline_stage, transformer_config
from nemo_rlp.models.spec import ModelConfigLike


def hybrid_transformer_config(cfg: ModelConfigLike, tensor_parallel: int, sequence_parallel: bool = False):
    return transformer_config(
        cfg,
        tensor_parallel,
        sequence_parallel=sequence_parallel,
        is_hybrid_model=True,
        mamba_num_heads=cfg.mamba_num_heads,
        mamba_head_dim=cfg.mamba_head_dim,
        mamba_state_dim=cfg.mamba_state_dim,
        mamba_num_groups=cfg.mamba_num_groups,
    )


@dataclass(frozen=True)
class HybridApi:
    """Where the installed megatron-core keeps the hybrid model, and how it is called."""

    model: str  # "module:Class" of the model
    stack: str  # the stack the local spec subclasses
    stack_submodules: str
    te_stack_spec: str  # megatron's Transformer Engine stack spec
    spec_keyword: str  # the model's keyword for the stack spec
    pattern_keyword: str  # the model's keyword for the layer pattern
    norm_called_directly: bool  # MambaLayer calls `submodules.norm(...)` itself, not build_module
    layer_passes_eps: bool  # ... and passes it the config's eps


# megatron-core 0.18 renamed MambaModel / MambaStack to HybridModel / HybridStack (the old names stay
# as deprecated aliases, MambaModel logging a warning) and the pattern keyword to
# `hybrid_layer_pattern`; 0.17 builds the Mamba layer's norm by calling `submodules.norm(config,
# hidden_size)`, 0.19 also passes it `eps=config.layernorm_epsilon` (0.16: build_module, no eps).
# (first version, first version not covered, HybridApi); `rows_for` picks.
_MAMBA_NAMES = dict(
    model="megatron.core.models.mamba:MambaModel",
    stack="megatron.core.ssm.mamba_block:MambaStack",
    stack_submodules="megatron.core.ssm.mamba_block:MambaStackSubmodules",
    te_stack_spec="megatron.core.models.mamba.mamba_layer_specs:mamba_stack_spec",
    spec_keyword="mamba_stack_spec",
    pattern_keyword="hybrid_override_pattern",
)
_HYBRID_NAMES = dict(
    model="megatron.core.models.hybrid.hybrid_model:HybridModel",
    stack="megatron.core.models.hybrid.hybrid_block:HybridStack",
    stack_submodules="megatron.core.models.hybrid.hybrid_block:HybridStackSubmodules",
    te_stack_spec="megatron.core.models.hybrid.hybrid_layer_specs:hybrid_stack_spec",
    spec_keyword="hybrid_stack_spec",
    pattern_keyword="hybrid_layer_pattern",
)
HYBRID_API_BY_VERSION = (
    ("0.16", "0.17", HybridApi(**_MAMBA_NAMES, norm_called_directly=False, layer_passes_eps=False)),
    ("0.17", "0.18", HybridApi(**_MAMBA_NAMES, norm_called_directly=True, layer_passes_eps=False)),
    ("0.18", "0.19", HybridApi(**_HYBRID_NAMES, norm_called_directly=True, layer_passes_eps=False)),
    ("0.19", "0.20", HybridApi(**_HYBRID_NAMES, norm_called_directly=True, layer_passes_eps=True)),
)


def hybrid_api(version: str | None = None) -> HybridApi:
    from nemo_rlp.megatron_version import rows_for

    rows = rows_for(HYBRID_API_BY_VERSION, version)
    if not rows:
        from nemo_rlp.megatron_version import installed_version

        raise RuntimeError(f"megatron-core {version or installed_version()} is not supported by the hybrid provider")
    return rows[0]


def _load(path: str):
    module, name = path.split(":")
    return getattr(importlib.import_module(module), name)


@functools.lru_cache(maxsize=None)
def _local_mamba_stack_class():
    from nemo_rlp.models.norms import TorchNorm

    stack = _load(hybrid_api().stack)

    class LocalMambaStack(stack):
        """megatron's MambaStack / HybridStack with a torch final norm instead of the hard-coded TENorm."""

        def __init__(self, config, submodules, *args, post_layer_norm: bool = True, **kwargs):
            super().__init__(config, submodules, *args, post_layer_norm=False, **kwargs)
            self.post_layer_norm = post_layer_norm
            if self.post_process and self.post_layer_norm:
                self.final_norm = TorchNorm(
                    config=self.config, hidden_size=self.config.hidden_size, eps=self.config.layernorm_epsilon
                )

    return LocalMambaStack


def _mamba_layer_norm(norm, eps: float):
    """The Mamba layer's norm as the installed megatron-core builds it (`HybridApi`)."""
    from megatron.core.transformer.spec_utils import ModuleSpec

    api = hybrid_api()
    if api.layer_passes_eps:
        return norm
    if api.norm_called_directly:
        return functools.partial(norm, eps=eps)
    # MambaLayer builds its norm without an eps (mamba_layer.py:85 in 0.16.1): pass the config's.
    return ModuleSpec(module=norm, params={"eps": eps})


def local_stack_spec(cfg: ModelConfigLike, config=None):
    """The hybrid stack spec from megatron-core modules only (runs on CPU)."""
    from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
    from megatron.core.ssm.mamba_layer import MambaLayer, MambaLayerSubmodules
    from megatron.core.ssm.mamba_mixer import MambaMixer, MambaMixerSubmodules
    from megatron.core.ssm.mlp_layer import MLPLayer
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.identity_op import IdentityOp
    from megatron.core.transformer.mlp import MLP, MLPSubmodules
    from megatron.core.transformer.spec_utils import ModuleSpec
    from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

    from nemo_rlp.models.attention import SDPAttention
    from nemo_rlp.models.norms import TorchNorm

    # torch norms that allow sequence parallelism (megatron's WrappedTorchNorm refuses it)
    norm = TorchNorm
    qk_norm = norm if cfg.qk_layernorm else IdentityOp
    stack_submodules = _load(hybrid_api().stack_submodules)
    return ModuleSpec(
        module=_local_mamba_stack_class(),
        submodules=stack_submodules(
            mamba_layer=ModuleSpec(
                module=MambaLayer,
                submodules=MambaLayerSubmodules(
                    norm=_mamba_layer_norm(norm, cfg.layernorm_epsilon),
                    mixer=ModuleSpec(
                        module=MambaMixer,
                        params={"chunk_size": cfg.mamba_chunk_size},
                        submodules=MambaMixerSubmodules(in_proj=ColumnParallelLinear, out_proj=RowParallelLinear),
                    ),
                    mamba_bda=get_bias_dropout_add,
                    sharded_state_dict_keys_map={"norm.": "mixer.in_proj.layer_norm_"},
                ),
            ),
            attention_layer=ModuleSpec(
                module=TransformerLayer,
                submodules=TransformerLayerSubmodules(
                    input_layernorm=norm,
                    self_attention=ModuleSpec(
                        module=SelfAttention,
                        params={"attn_mask_type": AttnMaskType.causal},
                        submodules=SelfAttentionSubmodules(
                            linear_qkv=ColumnParallelLinear,
                            # torch SDPA, not megatron's score-materialising DotProductAttention.
                            core_attention=SDPAttention,
                            linear_proj=RowParallelLinear,
                            q_layernorm=qk_norm,
                            k_layernorm=qk_norm,
                        ),
                    ),
                    self_attn_bda=get_bias_dropout_add,
                    sharded_state_dict_keys_map={"input_layernorm.": "self_attention.linear_qkv.layer_norm_"},
                ),
            ),
            mlp_layer=ModuleSpec(
                module=MLPLayer,
                submodules=TransformerLayerSubmodules(
                    pre_mlp_layernorm=norm,
                    mlp=ModuleSpec(
                        module=MLP,
                        submodules=MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear),
                    ),
                    mlp_bda=get_bias_dropout_add,
                    sharded_state_dict_keys_map={"pre_mlp_layernorm.": "mlp.linear_fc1.layer_norm_"},
                ),
            ),
        ),
    )


def te_stack_spec(cfg: ModelConfigLike, config=None):
    """megatron's Transformer Engine hybrid spec, with the configured chunk size and QK norms."""
    from megatron.core.extensions.transformer_engine import TENorm

    spec = copy.deepcopy(_load(hybrid_api().te_stack_spec))
    mixer = spec.submodules.mamba_layer.submodules.mixer
    mixer.params = dict(mixer.params or {}, chunk_size=cfg.mamba_chunk_size)
    if cfg.qk_layernorm:
        attention = spec.submodules.attention_layer.submodules.self_attention.submodules
        attention.q_layernorm = TENorm
        attention.k_layernorm = TENorm
    return spec


def build_hybrid(cfg: ModelConfigLike, vocab_size: int, tensor_parallel: int, device: torch.device,
                 sequence_parallel: bool, layer_spec):
    """Build the MambaModel for this rank's shard. `vocab_size` is the padded model vocabulary;
    `layer_spec(cfg, config)` the stack spec `build_model` chose (`te_stack_spec` or
    `local_stack_spec`)."""
    # Before megatron's mamba modules are imported: the mixer module needs triton otherwise.
    mamba_cpu_kernels.install()
    # megatron-core 0.17-0.19 decode static batches of more than one row on row 0's states.
    mixer_fixes.install()
    api = hybrid_api()
    first, last, _ = pipeline_stage()
    config = hybrid_transformer_config(cfg, tensor_parallel, sequence_parallel)
    model = _load(api.model)(
        pre_process=first,
        post_process=last,
        config=config,
        vocab_size=vocab_size,
        max_sequence_length=cfg.max_sequence_length,
        **{api.spec_keyword: layer_spec(cfg, config), api.pattern_keyword: cfg.hybrid_override_pattern},
        share_embeddings_and_output_weights=cfg.share_embeddings_and_output_weights,
        position_embedding_type=cfg.position_embedding_type,
        rotary_base=cfg.rotary_base,
        # Logits stay sharded over the vocabulary, as for the GPT provider (nemo_rlp.models.handle).
        parallel_output=True,
    )
    _layout_independent_mixer_init(model)
    return model.to(device)


# megatron's MambaMixer defaults (mamba_mixer.py:144-171); the specs here do not override them.
_DT_MIN, _DT_MAX, _DT_INIT_FLOOR, _A_INIT_RANGE = 0.001, 0.1, 1e-4, (1.0, 16.0)


@torch.no_grad()
def _layout_independent_mixer_init(model: torch.nn.Module) -> None:
    """Redraw each mixer's in_proj, conv1d, dt_bias and A_log as one full (TP=1) tensor and keep
    this rank's slice of every part, so the weights do not depend on the TP layout.

    The generator is seeded from the global torch RNG, which is identical on every rank (megatron's
    per-rank draws go through the model-parallel RNG tracker, which restores the global state).
    """
    from megatron.core.ssm.mamba_mixer import MambaMixer

    mixers = [m for m in model.modules() if isinstance(m, MambaMixer)]
    if not mixers or not model.config.perform_initialization or any(p.is_meta for p in model.parameters()):
        return
    generator = torch.Generator().manual_seed(int(torch.randint(0, 2**62, (1,)).item()))

    def uniform(*shape, low, high):
        return torch.rand(*shape, generator=generator, dtype=torch.float32) * (high - low) + low

    for mixer in mixers:
        tp, rank = mixer.pg_collection.tp.size(), mixer.pg_collection.tp.rank()

        def keep_rank_slice(full: torch.Tensor, sizes: list[int]) -> torch.Tensor:
            return torch.cat([part.chunk(tp, dim=0)[rank] for part in full.split(sizes, dim=0)], dim=0)

        d_inner, group_state, heads = mixer.d_inner, mixer.ngroups * mixer.d_state, mixer.nheads
        in_sizes = [d_inner, d_inner, group_state, group_state, heads]  # z, x, B, C, dt
        weight = torch.randn(sum(in_sizes), mixer.d_model, generator=generator) * mixer.config.init_method_std
        mixer.in_proj.weight.copy_(keep_rank_slice(weight, in_sizes))

        conv_sizes = [d_inner, group_state, group_state]  # x, B, C
        width = mixer.d_conv
        # nn.Conv1d's kaiming_uniform(a=sqrt(5)) and bias init: U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
        bound = mixer.conv_init if mixer.conv_init is not None else 1.0 / math.sqrt(width)
        conv_weight = uniform(sum(conv_sizes), 1, width, low=-bound, high=bound)
        conv1d_weight, conv1d_bias = conv1d_parameters(mixer)
        conv1d_weight.copy_(keep_rank_slice(conv_weight, conv_sizes))
        if conv1d_bias is not None:
            b = 1.0 / math.sqrt(width)
            conv1d_bias.copy_(keep_rank_slice(uniform(sum(conv_sizes), low=-b, high=b), conv_sizes))

        # softplus(dt_bias) log-uniform in [dt_min, dt_max]; A log-initialised uniform in A_init_range.
        log_dt = uniform(heads, low=math.log(_DT_MIN), high=math.log(_DT_MAX))
        dt = torch.exp(log_dt).clamp(min=_DT_INIT_FLOOR)
        inv_dt = dt + torch.log(-torch.expm1(-dt))
        mixer.dt_bias.copy_(inv_dt.chunk(tp)[rank])
        A = uniform(heads, low=_A_INIT_RANGE[0], high=_A_INIT_RANGE[1])
        mixer.A_log.copy_(torch.log(A).chunk(tp)[rank])


# The mixer's depthwise conv: an nn.Conv1d `conv1d` up to megatron-core 0.18, the bare parameters
# `conv1d_weight` / `conv1d_bias` from 0.19 (the same shapes, (channels, 1, width) and (channels,);
# megatron maps them to the old checkpoint keys `conv1d.weight` / `conv1d.bias` in its sharded state
# dict). (first version, first version not covered, (weight attribute path, bias attribute path))
CONV1D_NAMES_BY_VERSION = (
    ("0.16", "0.19", ("conv1d.weight", "conv1d.bias")),
    ("0.19", "0.20", ("conv1d_weight", "conv1d_bias")),
)


def conv1d_names(version: str | None = None) -> tuple[str, str]:
    """The mixer-relative names of the conv's weight and bias in the installed megatron-core."""
    from nemo_rlp.megatron_version import rows_for

    return rows_for(CONV1D_NAMES_BY_VERSION, version)[0]


def conv1d_parameters(mixer: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A MambaMixer's conv weight (channels, 1, width) and bias (channels,) or None."""

    def get(path: str):
        obj = mixer
        for part in path.split("."):
            obj = getattr(obj, part, None)
        return obj

    weight_name, bias_name = conv1d_names()
    return get(weight_name), get(bias_name)
