"""Checkpoints to and from Hugging Face folders: load a checkpoint's policy (or its EMA teacher) into
our model on one process, write it as a Hugging Face model, and load a Hugging Face model's weights
into ours.

Two ways to convert, chosen by what is importable:

- **Megatron-Bridge** (`megatron.bridge.AutoBridge`, in the NVIDIA NeMo container, on a GPU): the
  conversion the project relies on at scale, for every family Bridge knows (Nemotron-H included).
  It maps Transformer Engine layer names, so it needs the model built with TE layers, and its
  `save_hf_pretrained` needs the Hugging Face model the run started from (`hf_base`: its config,
  tokenizer and any custom code are copied from there).
- **the dependency-free conversion** of the architecture (`ArchitectureSpec.hf_conversion`; the GPT
  family's is `nemo_rlp.models.gpt.hf_conversion`: Qwen3 and Llama): anywhere, on CPU too. The
  Hugging Face config is made from our model config, the tokenizer from the run's `tokenizer.json`
  (or copied from a Hugging Face tokenizer folder), and the files are written by `transformers`
  (`save_pretrained`), so the folder is what `from_pretrained` expects of that version.

Why Bridge is not always used: `from megatron.bridge import AutoBridge` fails without Transformer
Engine (megatron-bridge 0.3.1 imports `transformer_engine.pytorch` in `peft/lora_layers.py` at import
time), and `pip install megatron-bridge` fails on a machine without CUDA (it requires
`transformer-engine[core_cu13,pytorch]` and builds `mamba-ssm` from source, whose setup imports torch
and CUDA).

Which checkpoints: a training checkpoint (`step_XXXXXXX/`, or a run's checkpoint folder, whose latest
complete one is taken; the model config is its `config.json`) or an import (`recipes/import_checkpoint.py`'s
output: `dist/` + `import.json`). The policy is the "model" part of `dist/`; the EMA teacher the
"ema_teacher" part (keys prefixed `ema_teacher.`, fp32), which only training checkpoints and imports
made with --with-ema-teacher hold.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from nemo_rlp.config import ConfigError, ModelConfig, ParallelConfig
from nemo_rlp.data.bundled import BUNDLED_TOKENIZER
from nemo_rlp.models import build_model, build_teacher_model
from nemo_rlp.models.spec import get_architecture
from nemo_rlp.parallel import distributed
from nemo_rlp.training.checkpoint import CONFIG_FILE, DIST_DIR, resolve_checkpoint
from nemo_rlp.training.policy import TEACHER_PREFIX

log = logging.getLogger("nemo_rlp")

IMPORT_FILE = "import.json"  # recipes/import_checkpoint.py's record of an import
EMBEDDING = "embedding.word_embeddings.weight"
_HF_DTYPES = {"fp32": "float32", "bf16": "bfloat16"}


@dataclass(frozen=True)
class TokenizerSource:
    """Where the exported folder's tokenizer comes from: a Hugging Face tokenizer folder (copied with
    `AutoTokenizer`), else a `tokenizer.json` wrapped with the run's end-of-document and pad tokens."""

    folder: Optional[Path] = None
    file: Optional[Path] = None
    eod: str = "<|endoftext|>"
    pad: Optional[str] = None
    think_end: str = "</think>"


@dataclass(frozen=True)
class CheckpointSource:
    """A checkpoint to export: its `dist/`, the model config it was saved with, its vocabulary rows
    (read from `dist/`'s metadata, so whatever TP padded it to), and its tokenizer."""

    dist: Path
    model: ModelConfig
    vocab_size: int
    tokenizer: TokenizerSource
    has_teacher: bool


def checkpoint_source(path: str | Path) -> CheckpointSource:
    """A training checkpoint, a run's checkpoint folder (its latest complete checkpoint) or an import."""
    from megatron.core import dist_checkpointing

    path = Path(path)
    if (path / IMPORT_FILE).is_file():
        record = json.loads((path / IMPORT_FILE).read_text())
        model = _model_config(record["model"])
        # The Hugging Face folder it was imported from holds the tokenizer (None: --tokenizer must say).
        source = Path(record.get("source", ""))
        tokenizer = TokenizerSource(folder=source if (source / "tokenizer_config.json").is_file() else None)
    else:
        if not path.exists():
            raise ConfigError(f"checkpoint {path}: no such directory; pass a step_XXXXXXX checkpoint, a run's "
                              "checkpoint folder, or an import's output folder")
        path = resolve_checkpoint(path)
        saved = json.loads((path / CONFIG_FILE).read_text())
        model = _model_config(saved["model"])
        data, rlp = saved.get("data", {}), saved.get("rlp", {})
        tokenizer = TokenizerSource(file=Path(data.get("tokenizer") or BUNDLED_TOKENIZER),
                                    eod=data.get("eod_token", "<|endoftext|>"), pad=data.get("pad_token"),
                                    think_end=rlp.get("think_end", "</think>"))
    dist = path / DIST_DIR
    if not dist.is_dir():
        raise ConfigError(f"checkpoint {path}: no {DIST_DIR}/ in it (the tensors); is it a complete checkpoint?")
    metadata = dist_checkpointing.load_tensors_metadata(str(dist))
    if EMBEDDING not in metadata:
        raise ConfigError(f"checkpoint {dist}: no {EMBEDDING} tensor; only GPT-style checkpoints with an "
                          "embedding can be exported")
    return CheckpointSource(dist=dist, model=model, vocab_size=int(metadata[EMBEDDING].global_shape[0]),
                            tokenizer=tokenizer, has_teacher=TEACHER_PREFIX + EMBEDDING in metadata)


def _model_config(saved: dict) -> ModelConfig:
    """The saved model config, its keys this version knows (a key added since takes its default)."""
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    return ModelConfig(**{k: v for k, v in saved.items() if k in known})


class SingleProcess:
    """megatron's parallel state for one process (TP = PP = 1), started here unless a caller already
    has one (a test, a trainer in the same process); what it starts it ends."""

    def __enter__(self) -> torch.device:
        self.started = not torch.distributed.is_initialized()
        if self.started:
            layout = distributed.initialize(ParallelConfig(), seed=0)
        else:
            from megatron.core import parallel_state

            if parallel_state.get_tensor_model_parallel_world_size() * \
                    parallel_state.get_pipeline_model_parallel_world_size() != 1:
                raise ConfigError("the Hugging Face conversion runs in one process (TP = PP = 1); run it without "
                                  "torchrun: the checkpoint is loaded whole and resharded by megatron")
            layout = None
        return layout.device if layout else torch.device("cuda" if torch.cuda.is_available() else "cpu")

    def __exit__(self, *exc) -> None:
        if self.started:
            distributed.destroy()


def load_model(source: CheckpointSource, device: torch.device, teacher: bool = False) -> torch.nn.Module:
    """The checkpoint's policy (or, `teacher`, its EMA teacher in fp32) in our model, TP = PP = 1."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.utils import add_prefix_for_sharding

    if teacher and not source.has_teacher:
        raise ConfigError(f"checkpoint {source.dist.parent} holds no EMA teacher (ema_teacher.*): export the "
                          "policy, or an import made with --with-ema-teacher")
    model = (build_teacher_model if teacher else build_model)(source.model, source.vocab_size, 1, device)
    sharded = model.sharded_state_dict()
    if teacher:
        add_prefix_for_sharding(sharded, TEACHER_PREFIX)
    part = "ema_teacher" if teacher else "model"
    loaded = dist_checkpointing.load({part: sharded}, str(source.dist))
    model.load_state_dict(loaded[part])
    return model.eval()


def conversion(model_cfg: ModelConfig):
    """The architecture's dependency-free Hugging Face conversion, or a clear error."""
    module = get_architecture(model_cfg.arch).hf_conversion
    if module is None:
        raise ConfigError(f"model.arch={model_cfg.arch!r} has no dependency-free Hugging Face conversion; convert "
                          "it with Megatron-Bridge in the NeMo container (recipes/export_checkpoint.py --hf-base ...)")
    module.check_convertible(model_cfg)
    return module


def bridge_available() -> bool:
    """Whether Megatron-Bridge imports here (it needs Transformer Engine, hence CUDA)."""
    try:
        from megatron.bridge import AutoBridge  # noqa: F401
    except Exception:  # ImportError, or TE failing to load its CUDA libraries
        return False
    return True


def save_with_bridge(model: torch.nn.Module, hf_base: Path, out: Path) -> None:
    """Megatron-Bridge's export: `AutoBridge.from_hf_pretrained(hf_base).save_hf_pretrained([model], out)`."""
    from megatron.bridge import AutoBridge

    bridge = AutoBridge.from_hf_pretrained(str(hf_base))
    bridge.save_hf_pretrained([model], str(out))


def save_hf_folder(model: torch.nn.Module, model_cfg: ModelConfig, out: Path, tokenizer: TokenizerSource,
                   vocab_size: Optional[int] = None, dtype: Optional[str] = None) -> dict[str, Any]:
    """The dependency-free export: config.json, safetensors and the tokenizer files in `out`, written
    by transformers. `vocab_size`: the Hugging Face vocabulary (None: all of the model's rows);
    `dtype`: "fp32" or "bf16" (None: the model's). Returns the config written."""
    import transformers

    module = conversion(model_cfg)
    hf_tokenizer = _hf_tokenizer(tokenizer)
    state = {k: v.detach().to("cpu") for k, v in model.state_dict().items() if torch.is_tensor(v)}
    tensors = module.to_hf(state, model_cfg, vocab_size)
    rows = tensors["model.embed_tokens.weight"].shape[0]
    if len(hf_tokenizer) > rows:
        raise ConfigError(f"the tokenizer has {len(hf_tokenizer)} tokens but the exported vocabulary {rows} rows")
    dtype = dtype or ("bf16" if next(iter(tensors.values())).dtype == torch.bfloat16 else "fp32")
    fields = module.hf_config(model_cfg, rows, _HF_DTYPES[dtype])
    for role in ("bos", "eos", "pad"):
        fields[f"{role}_token_id"] = getattr(hf_tokenizer, f"{role}_token_id")
    config = transformers.AutoConfig.for_model(**fields)
    with torch.device("meta"):
        hf_model = transformers.AutoModelForCausalLM.from_config(config)
    torch_dtype = torch.bfloat16 if dtype == "bf16" else torch.float32
    result = hf_model.load_state_dict({k: v.to(torch_dtype) for k, v in tensors.items()}, strict=False, assign=True)
    allowed_missing = {"lm_head.weight"} if config.tie_word_embeddings else set()
    if set(result.missing_keys) - allowed_missing or result.unexpected_keys:
        raise ValueError(f"{config.architectures[0]} does not take the converted tensors: missing "
                         f"{sorted(set(result.missing_keys) - allowed_missing)[:6]}, unexpected {result.unexpected_keys[:6]}")
    hf_model.tie_weights()
    out.mkdir(parents=True, exist_ok=True)
    hf_model.save_pretrained(out, safe_serialization=True)
    hf_tokenizer.save_pretrained(out)
    return fields


def _hf_tokenizer(source: TokenizerSource):
    """A transformers tokenizer for the exported folder (see `TokenizerSource`)."""
    import transformers

    if source.folder is not None:
        return transformers.AutoTokenizer.from_pretrained(str(source.folder))
    if source.file is None or not Path(source.file).is_file():
        raise ConfigError(f"no tokenizer for the export (tokenizer file {source.file} not found); pass --tokenizer "
                          "with a tokenizer.json or a Hugging Face tokenizer folder")
    return transformers.PreTrainedTokenizerFast(tokenizer_file=str(source.file), eos_token=source.eod,
                                                pad_token=source.pad or source.eod)


def export_checkpoint(path: str | Path, out: str | Path, teacher: bool = False, hf_base: Optional[str | Path] = None,
                      tokenizer: Optional[str | Path] = None, dtype: Optional[str] = None,
                      use_bridge: Optional[bool] = None) -> dict[str, Any]:
    """A checkpoint's policy (or EMA teacher) as a Hugging Face folder `out`. Megatron-Bridge when it
    imports and `hf_base` is given (`use_bridge`: force one way: True fails without Bridge), the
    dependency-free conversion otherwise. Returns a record of what was written (also out/export.json)."""
    source = checkpoint_source(path)
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"--out {out} is not empty; pick a new folder")
    if use_bridge is None:
        use_bridge = hf_base is not None and bridge_available()
    if use_bridge and (hf_base is None or not bridge_available()):
        raise ConfigError("the Megatron-Bridge export needs megatron.bridge importable (the NeMo container, a GPU) "
                          "and --hf-base (the Hugging Face model the run started from)")
    token_source = _token_source(source.tokenizer, tokenizer, hf_base)
    with SingleProcess() as device:
        model = load_model(source, device, teacher)
        vocab = _base_vocab(hf_base)
        if use_bridge:
            save_with_bridge(model, Path(hf_base), out)
            fields = json.loads((out / "config.json").read_text())
        else:
            fields = save_hf_folder(model, source.model, out, token_source, vocab, dtype)
    record = {"checkpoint": str(source.dist.parent.resolve()), "weights": "ema_teacher" if teacher else "policy",
              "converter": "megatron-bridge" if use_bridge else "nemo_rlp (dependency-free)",
              "architecture": fields.get("architectures"), "vocab_size": fields.get("vocab_size"),
              "think_end_token": token_source.think_end}
    (out / "export.json").write_text(json.dumps(record, indent=2))
    log.info("exported %s (%s) to %s with %s", record["checkpoint"], record["weights"], out, record["converter"])
    return record


def _token_source(found: TokenizerSource, override: Optional[str | Path], hf_base: Optional[str | Path]) -> TokenizerSource:
    """The checkpoint's tokenizer, unless `override` (a tokenizer.json or a folder) or `hf_base` names one."""
    chosen = Path(override) if override else (Path(hf_base) if hf_base else None)
    if chosen is None:
        return found
    if chosen.is_dir():
        return TokenizerSource(folder=chosen, eod=found.eod, pad=found.pad, think_end=found.think_end)
    return TokenizerSource(file=chosen, eod=found.eod, pad=found.pad, think_end=found.think_end)


def _base_vocab(hf_base: Optional[str | Path]) -> Optional[int]:
    """The Hugging Face base model's vocabulary (the export drops our padding rows beyond it)."""
    if hf_base is None:
        return None
    config = Path(hf_base) / "config.json"
    return json.loads(config.read_text()).get("vocab_size") if config.is_file() else None


# --------------------------------------------------------------------------------------------------
# Hugging Face -> ours
# --------------------------------------------------------------------------------------------------

# (Megatron-Bridge provider attribute, our model config field): the architecture settings both hold.
_PROVIDER_FIELDS = (
    ("num_layers", "num_layers"), ("hidden_size", "hidden_size"), ("ffn_hidden_size", "ffn_hidden_size"),
    ("num_attention_heads", "num_attention_heads"), ("num_query_groups", "num_query_groups"),
    ("kv_channels", "kv_channels"), ("vocab_size", "vocab_size"), ("seq_length", "max_sequence_length"),
    ("position_embedding_type", "position_embedding_type"), ("rotary_base", "rotary_base"),
    ("normalization", "normalization"), ("layernorm_epsilon", "layernorm_epsilon"),
    ("gated_linear_unit", "gated_linear_unit"), ("qk_layernorm", "qk_layernorm"),
    ("add_bias_linear", "add_bias_linear"),
    ("share_embeddings_and_output_weights", "share_embeddings_and_output_weights"),
    ("hybrid_override_pattern", "hybrid_override_pattern"), ("mamba_num_heads", "mamba_num_heads"),
    ("mamba_head_dim", "mamba_head_dim"), ("mamba_state_dim", "mamba_state_dim"),
    ("mamba_num_groups", "mamba_num_groups"),
)


def provider_overrides(provider: Any) -> list[str]:
    """Hydra overrides (`++model.KEY=VALUE`) that give our model config the architecture settings of
    Megatron-Bridge's provider (`AutoBridge.to_megatron_provider(load_weights=False)`), so that an
    import builds the model Bridge would: Bridge's reading of the Hugging Face config, not ours."""
    out = []
    for attr, key in _PROVIDER_FIELDS:
        value = getattr(provider, attr, None)
        if value is None:
            continue
        if key == "rotary_base" and float(value).is_integer():
            value = int(value)
        out.append(f"++model.{key}={_hydra_value(value)}")
    return out


def _hydra_value(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, str):
        return json.dumps(value)  # a quoted string: Hydra reads patterns such as "M-M*" verbatim
    return repr(value) if isinstance(value, float) else str(value)



def read_hf_tensors(folder: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of a Hugging Face folder's safetensors (one file, or the shards its index names)."""
    from safetensors.torch import load_file

    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    files = (sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file()
             else ["model.safetensors"])
    tensors: dict[str, torch.Tensor] = {}
    for name in files:
        if not (folder / name).is_file():
            raise ConfigError(f"--hf {folder}: {name} not found; a Hugging Face folder with safetensors weights is needed")
        tensors.update(load_file(str(folder / name)))
    return tensors


def load_hf_weights(model: torch.nn.Module, model_cfg: ModelConfig, folder: str | Path) -> None:
    """Load a Hugging Face folder's weights into `model` (one process, TP = PP = 1) with the
    dependency-free conversion; every parameter must come from the checkpoint."""
    module = conversion(model_cfg)
    target = {k: v for k, v in model.state_dict().items() if torch.is_tensor(v)}
    state = module.from_hf(read_hf_tensors(folder), model_cfg, target)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("_extra_state")]
    if missing or unexpected:
        raise ValueError(f"loading {folder}: missing {missing[:6]}, unexpected {unexpected[:6]}")
