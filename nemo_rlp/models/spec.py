"""The architecture registry: what each model family declares, in one place.

In the manner of torchtitan's `protocols/model_spec.py`: every architecture (`model.arch`) is one
`ArchitectureSpec`, declared by its own module (`nemo_rlp/models/gpt/`, `nemo_rlp/models/hybrid/`)
and registered here by name. Everything that differs between architectures is a field of the spec,
and the code that used to branch on the architecture asks the spec instead:

| field | asked by |
|---|---|
| `build` (the provider), `te_layer_spec` / `local_layer_spec` | `nemo_rlp.models.build_model` |
| `validate` (keys only this architecture reads) | `nemo_rlp.config.validate` |
| `layer_kinds`, `pipeline_stages`, `tp_local_parameters` | the planner, `nemo_rlp.planning` (docs/design.md section 5) |
| `cache` (`CacheOps`: the inference caches) | `ModelHandle.select_cache_rows`, the `rows` path (`nemo_rlp.models.row_cache`), the dynamic engine |
| `pack_alignment` | packed training rows, `nemo_rlp.training.packing` |
| `tiny_model` | the planner's host-work measurement, `nemo_rlp.rollout.schedule` |
| `hf_conversion` | the dependency-free Hugging Face import and export, `nemo_rlp.training.hf_checkpoint` |

So a new architecture is a new module that registers a spec, and nothing else (a test registers a
toy one: tests/unit/test_architecture_registry.py). The allowed values of `model.arch` are this
registry's names: config validation reads them from here, nowhere else keeps a list.

This module imports nothing of the package (config imports it to validate `model.arch`, and the
families import it to register); the built-in families are registered when `nemo_rlp.models` is
imported, which Python does before this module.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

# The run's `model` config (`nemo_rlp.config.ModelConfig`). Not imported: config imports this module.
ModelConfigLike = Any
# `config.validate`'s failure callback: fail(key, value, allowed) raises a ConfigError naming the key.
Fail = Callable[[str, Any, str], None]

# The attribute `nemo_rlp.models.build_model` sets on every model it builds: the architecture's name,
# so code holding only the module (the handle, packing) finds its spec.
ARCHITECTURE_ATTRIBUTE = "nemo_rlp_architecture"


@dataclass(frozen=True)
class CacheOps:
    """How an architecture's layers use the inference caches of a rollout (docs/design.md section 1,
    step 1: G thoughts share one prefill of the context through the cache).

    - `select_rows(language_model, cache, index) -> bytes moved`: make row i of megatron's
      `StaticInferenceContext` a copy of row index[i] (the lockstep `cache` and `shared_prefill`
      modes: repeat a prefilled context G times, drop finished rows);
    - `row_layers(language_model, hidden, row_cache) -> hidden`: run this pipeline stage's layers on
      a `nemo_rlp.models.row_cache.RowCache` (the `rows` mode), each layer on its own kind of state;
    - `dynamic_state(language_model)`: the per-request recurrent-state config megatron's dynamic
      engine needs (`MambaInferenceStateConfig`), or None for attention-only models.
    """

    select_rows: Callable[[Any, Any, Any], int]
    row_layers: Callable[[Any, Any, Any], Any]
    dynamic_state: Callable[[Any], Any] = lambda language_model: None


def even_pipeline_stages(kinds: str, pipeline_parallel: int) -> tuple[str, ...]:
    """megatron's default split: every stage holds num_layers / PP consecutive layers (config
    validation requires PP to divide num_layers)."""
    per_stage = len(kinds) // pipeline_parallel
    return tuple(kinds[s * per_stage : (s + 1) * per_stage] for s in range(pipeline_parallel))


def no_config_checks(cfg: ModelConfigLike, fail: Fail) -> dict[str, int]:
    return {}


@dataclass(frozen=True)
class ArchitectureSpec:
    """One architecture: its provider and everything the rest of the package asks of it.

    - `build(cfg, vocab_size, tensor_parallel, device, sequence_parallel, layer_spec) -> model`: this
      rank's shard (its pipeline stage's layers, its TP slice), its layers from
      `layer_spec(cfg, transformer_config)`;
    - `te_layer_spec`, `local_layer_spec`: `(cfg, transformer_config) -> megatron spec`: the
      Transformer Engine layer specs (None: the family has none) and the local ones (megatron-core
      modules with torch SDPA core attention and torch norms; they run on CPU). `build_model` passes
      the TE one when Transformer Engine is usable (`nemo_rlp.models.common.use_transformer_engine`,
      the one place that decides), the local one otherwise;
    - `layer_kinds(cfg) -> str`: one symbol per layer in the planner's alphabet: 'T' a transformer
      layer (attention + MLP), '*' attention only, '-' MLP only, 'M' a Mamba mixer;
    - `pipeline_stages(cfg, pipeline_parallel) -> tuple[str, ...]`: the layer kinds each stage holds
      (None: megatron's even split, `even_pipeline_stages`, which both built-in providers build);
      the planner plans each stage from it, so it must be the split `build` makes; the provider
      builds this rank's stage (`nemo_rlp.models.common.pipeline_stage`);
    - `validate(cfg, fail) -> {key: count}`: reject values of the keys only this architecture reads
      (calling `fail`), and return the counts that the tensor-parallel size must divide;
    - `tp_local_parameters`: suffixes of parameter names that megatron sizes per tensor-parallel rank
      without marking them `tensor_model_parallel` (the planner counts them as sharded);
    - `cache`: the inference-cache operations (`CacheOps`);
    - `pack_alignment(language_model) -> int`: where packed training rows must start for a packed row
      to compute exactly as the row alone (1: anywhere);
    - `tiny_model(depth) -> overrides`: `load_config` overrides of a tiny model of this architecture
      with `depth` times its smallest layer pattern (the planner measures host work on it), or None;
    - `hf_conversion`: the module that maps this architecture's full state dict to and from a Hugging
      Face checkpoint without Megatron-Bridge (`check_convertible`, `architecture`, `hf_config`,
      `model_overrides`, `to_hf`, `from_hf`, as `nemo_rlp.models.gpt.hf_conversion` defines them),
      or None: the family converts through Megatron-Bridge only.
    """

    name: str
    build: Callable[..., Any]
    local_layer_spec: Callable[[ModelConfigLike, Any], Any]
    layer_kinds: Callable[[ModelConfigLike], str]
    cache: CacheOps
    te_layer_spec: Optional[Callable[[ModelConfigLike, Any], Any]] = None
    validate: Callable[[ModelConfigLike, Fail], dict[str, int]] = no_config_checks
    pipeline_stages: Optional[Callable[[ModelConfigLike, int], tuple[str, ...]]] = None
    tp_local_parameters: tuple[str, ...] = ()
    pack_alignment: Callable[[Any], int] = lambda language_model: 1
    tiny_model: Optional[Callable[[int], list[str]]] = None
    hf_conversion: Optional[Any] = None

    def stages(self, cfg: ModelConfigLike, pipeline_parallel: int) -> tuple[str, ...]:
        """The layer kinds of each pipeline stage: the spec's split, or megatron's even one."""
        if self.pipeline_stages is not None:
            return self.pipeline_stages(cfg, pipeline_parallel)
        return even_pipeline_stages(self.layer_kinds(cfg), pipeline_parallel)


_REGISTRY: dict[str, ArchitectureSpec] = {}


def register_architecture(spec: ArchitectureSpec) -> ArchitectureSpec:
    """Add `spec` under `spec.name`; a name is registered once (unregister first to replace it)."""
    if spec.name in _REGISTRY:
        raise ValueError(f"architecture {spec.name!r} is already registered")
    _REGISTRY[spec.name] = spec
    return spec


def unregister_architecture(name: str) -> None:
    """Remove `name` (a test's toy architecture, in its teardown)."""
    _REGISTRY.pop(name, None)


def architecture_names() -> tuple[str, ...]:
    """The allowed values of `model.arch`, in registration order."""
    return tuple(_REGISTRY)


def get_architecture(name: str) -> ArchitectureSpec:
    if name not in _REGISTRY:
        allowed = ", ".join(repr(n) for n in _REGISTRY)
        raise KeyError(f"model.arch={name!r} is not a registered architecture: one of {allowed}")
    return _REGISTRY[name]


def architecture_of(language_model: Any) -> ArchitectureSpec:
    """The spec of a model built by `nemo_rlp.models.build_model` (unwrapped from DDP and the like)."""
    name = getattr(language_model, ARCHITECTURE_ATTRIBUTE, None)
    if name is None:
        raise ValueError(f"{type(language_model).__name__} was not built by nemo_rlp.models.build_model: "
                         "it names no architecture")
    return get_architecture(name)
