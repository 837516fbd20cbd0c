"""Import a Hugging Face checkpoint as the policy's megatron-core distributed checkpoint.

    python recipes/import_checkpoint.py --hf /ckpt/Qwen3-1.7B-Base --model qwen3_1p7b --out /ckpt/rlp/qwen3_1p7b
    python recipes/import_checkpoint.py --hf /ckpt/Nemotron-Nano-12B-v2-Base --model nemotron_nano_12b_v2 \\
        --out /ckpt/rlp/nemotron_nano_12b_v2 --trust-remote-code
    torchrun --nproc-per-node 8 recipes/import_checkpoint.py ... parallel.tensor_model_parallel_size=8

Further arguments are Hydra overrides of the model (`model.*`) and the layout (`parallel.*`), as for
the trainer. The model is this project's own (`nemo_rlp.models.build_model`), so the checkpoint's keys
are exactly those of the model the trainer builds. Its architecture settings (layers, widths, heads,
vocabulary, RoPE base, norms, tied embeddings ...) are not taken from nemo_rlp/conf/model/NAME.yaml but
from the Hugging Face checkpoint: through Megatron-Bridge's provider
(`AutoBridge.to_megatron_provider(load_weights=False)`) when Bridge is used, through the same mapping
of config.json fields otherwise; NAME gives the rest (the family, the dtype). Overrides on the command
line still win, and must agree with the Hugging Face config (checked field by field).

Two converters (`--converter`, default `auto`: Bridge when it imports, else the fallback):
- `bridge`: Megatron-Bridge, in the NVIDIA NeMo container on a GPU: the model is built with Transformer
  Engine layers, `AutoBridge.from_hf_pretrained(HF).load_hf_weights([model])` maps and shards the
  tensors over tensor-parallel ranks. Every parameter is set to NaN first; one that still holds a NaN
  afterwards (no mapping) fails the import by name, so a partly random checkpoint is never written.
- `fallback`: the dependency-free conversion of the model family (`nemo_rlp.models.gpt.hf_conversion`:
  Qwen3 and Llama), anywhere, CPU included, in one process (the checkpoint is written with global
  shapes, so it loads into any layout). It exists because Megatron-Bridge cannot be imported without
  Transformer Engine, i.e. without CUDA (nemo_rlp/training/hf_checkpoint.py says exactly why). The
  hybrid family has no fallback.

Output, in OUT/:
    dist/         megatron-core dist_checkpointing of {"model": model.sharded_state_dict()}: the keys
                  of the "model" part of a training checkpoint (`nemo_rlp.training.checkpoint`),
                  saved with global shapes, so it loads into any TP x PP layout. With
                  --with-ema-teacher it also holds {"ema_teacher": ...} (keys prefixed
                  "ema_teacher.", as in a training checkpoint): the EMA seed φ = θ in fp32.
    import.json   the source, the converter, the model config, the layout of the import, versions,
                  the parameter count.

The EMA teacher needs nothing else: the trainer seeds φ ← θ at the first RLP batch, from the weights
the policy was loaded with (docs/design.md section 1, step 9); --with-ema-teacher writes that seed out
for a loader that wants it explicitly (it costs 4 bytes per parameter on disk).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from pathlib import Path

# Runnable from a checkout without installing the package.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from nemo_rlp.config import ConfigError, ModelConfig, as_dict, load_config  # noqa: E402
from nemo_rlp.recipe_logging import setup_recipe_logging  # noqa: E402

log = logging.getLogger("nemo_rlp.import")

# The container that carries Megatron-Bridge: the Dockerfile's base image (tests check they agree).
NEMO_IMAGE = "nvcr.io/nvidia/nemo:26.06.00"
TEACHER_PREFIX = "ema_teacher."  # nemo_rlp.training.policy.TEACHER_PREFIX

# Hugging Face config keys and the model-config fields they must equal (when the HF config has them).
_HF_FIELDS = (
    ("hidden_size", "hidden_size"),
    ("num_hidden_layers", "num_layers"),
    ("num_attention_heads", "num_attention_heads"),
    ("num_key_value_heads", "num_query_groups"),
    ("head_dim", "kv_channels"),
    ("intermediate_size", "ffn_hidden_size"),
    ("vocab_size", "vocab_size"),
    ("tie_word_embeddings", "share_embeddings_and_output_weights"),
    ("rope_theta", "rotary_base"),
    # Nemotron-H (hybrid)
    ("hybrid_override_pattern", "hybrid_override_pattern"),
    ("mamba_num_heads", "mamba_num_heads"),
    ("mamba_head_dim", "mamba_head_dim"),
    ("ssm_state_size", "mamba_state_dim"),
    ("n_groups", "mamba_num_groups"),
)


def check_hf_config(hf_config: dict, model: ModelConfig) -> None:
    """Fail, naming every field, when the Hugging Face config does not describe `model`."""
    wrong = []
    for hf_key, ours in _HF_FIELDS:
        if hf_key not in hf_config or hf_config[hf_key] is None:
            continue
        theirs, mine = hf_config[hf_key], getattr(model, ours)
        if mine is None or (ours == "rotary_base" and model.position_embedding_type != "rope"):
            continue
        same = math.isclose(float(theirs), float(mine)) if isinstance(theirs, float) else theirs == mine
        if not same:
            wrong.append(f"{hf_key}={theirs!r} but model.{ours}={mine!r}")
    if wrong:
        raise ConfigError(
            f"the Hugging Face config does not describe model {model.name!r}: " + "; ".join(wrong)
            + ". Pick the matching --model, or override the model fields (model.KEY=VALUE)"
        )


def _bridge_missing(err: str) -> SystemExit:
    return SystemExit(
        "this import needs Megatron-Bridge (the megatron.bridge package), which does not import here "
        f"({err}). It ships in the NVIDIA NeMo container: run the import there, e.g. "
        f"srun --container-image={NEMO_IMAGE} --container-mounts=... python recipes/import_checkpoint.py ... "
        "(or in the image built from ./Dockerfile)."
    )


def _auto_bridge():
    try:
        from megatron.bridge import AutoBridge
    except Exception as err:  # ImportError, or Transformer Engine failing to find CUDA
        raise _bridge_missing(str(err)) from None
    return AutoBridge


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hf", required=True, help="a Hugging Face checkpoint directory (config.json + safetensors)")
    parser.add_argument("--model", required=True, help="a name in nemo_rlp/conf/model/ (e.g. qwen3_1p7b, nemotron_nano_12b_v2)")
    parser.add_argument("--out", required=True, help="output directory (must not hold a checkpoint already)")
    parser.add_argument("--converter", choices=("auto", "bridge", "fallback"), default="auto",
                        help="Megatron-Bridge, the dependency-free conversion, or Bridge when it imports (default)")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="let transformers run the checkpoint's own modeling code (Nemotron-H needs it)")
    parser.add_argument("--with-ema-teacher", action="store_true", help="also write the EMA seed (fp32 copy)")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of model.* and parallel.*")
    return parser


def _config(args, hf_config: dict, derived: list[str]):
    """The run config: --model, the architecture settings derived from the checkpoint, the command
    line's overrides; checked against the Hugging Face config."""
    cfg = load_config([f"model={args.model}", *derived, *args.overrides])
    check_hf_config(hf_config, cfg.model)
    return cfg


def _prepare(args):
    """Everything that can fail before any work: (config, Hugging Face config, converter)."""
    from nemo_rlp.models.spec import get_architecture
    from nemo_rlp.training.hf_checkpoint import bridge_available

    hf_dir, out = Path(args.hf), Path(args.out)
    config_file = hf_dir / "config.json"
    if not config_file.is_file():
        raise ConfigError(f"--hf {hf_dir}: no config.json there; pass a Hugging Face checkpoint directory")
    hf_config = json.loads(config_file.read_text())
    conversion = get_architecture(load_config([f"model={args.model}"]).model.arch).hf_conversion
    converter = args.converter
    if converter == "auto":
        converter = "bridge" if conversion is None or bridge_available() else "fallback"
    if converter == "fallback" and conversion is None:
        raise ConfigError(f"--converter fallback: model {args.model!r} has no dependency-free conversion; "
                          "use Megatron-Bridge (--converter bridge, in the NeMo container)")
    try:
        derived = conversion.model_overrides(hf_config) if conversion is not None else []
    except ValueError as err:
        if converter == "fallback":
            raise ConfigError(str(err)) from None
        derived = []  # Bridge reads this checkpoint; its provider gives the settings below
    cfg = _config(args, hf_config, derived)
    if (out / "dist").exists() and any((out / "dist").iterdir()):
        raise ConfigError(f"--out {out}: {out / 'dist'} already holds a checkpoint; pick an empty directory")
    return cfg, hf_config, converter


def _load_with_bridge(args, hf_config, layout):
    """The model built from Bridge's provider settings, its weights loaded by Bridge."""
    import torch

    from nemo_rlp.models import build_model
    from nemo_rlp.models.vocab import padded_vocab_size
    from nemo_rlp.training.hf_checkpoint import provider_overrides

    AutoBridge = _auto_bridge()
    if not torch.cuda.is_available():
        raise SystemExit(
            "the Megatron-Bridge import needs a GPU: it builds the model with Transformer Engine layers, whose "
            f"parameter names Megatron-Bridge maps (run it in {NEMO_IMAGE} on a GPU node)"
        )
    base = load_config([f"model={args.model}", *args.overrides]).model
    dtype = torch.bfloat16 if base.params_dtype == "bf16" else torch.float32
    bridge = AutoBridge.from_hf_pretrained(str(args.hf), trust_remote_code=args.trust_remote_code, torch_dtype=dtype)
    provider = bridge.to_megatron_provider(load_weights=False)
    cfg = _config(args, hf_config, provider_overrides(provider))
    tp = layout.tensor_parallel
    vocab = padded_vocab_size(cfg.model, int(hf_config.get("vocab_size") or 0), tp)
    model = build_model(cfg.model, vocab, tp, layout.device)
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(float("nan"))
    log.info("loading %s through Megatron-Bridge into %s (TP=%d, PP=%d)", args.hf, cfg.model.name, tp,
             layout.pipeline_parallel)
    bridge.load_hf_weights([model])
    missing = [name for name, p in model.named_parameters() if torch.isnan(p).any()]
    flag = torch.tensor([len(missing)], device=layout.device)
    torch.distributed.all_reduce(flag)
    if int(flag.item()):
        shown = ", ".join(missing[:8]) + (" ..." if len(missing) > 8 else "")
        raise SystemExit(
            f"Megatron-Bridge left {int(flag.item())} parameter shard(s) unloaded (no mapping from the Hugging "
            f"Face checkpoint){': ' + shown if missing else ' on other ranks'}; nothing was written"
        )
    return cfg, model, vocab


def _load_with_fallback(cfg, hf_dir: Path, layout):
    """The model built from the settings derived from config.json, loaded by the dependency-free
    conversion, in one process."""
    from nemo_rlp.models import build_model
    from nemo_rlp.models.vocab import padded_vocab_size
    from nemo_rlp.training.hf_checkpoint import load_hf_weights

    if layout.world_size != 1:
        raise SystemExit("the fallback import runs in one process (the checkpoint it writes loads into any layout); "
                         "run it without torchrun")
    vocab = padded_vocab_size(cfg.model, cfg.model.vocab_size or 0, 1)
    model = build_model(cfg.model, vocab, 1, layout.device)
    log.info("loading %s with the dependency-free conversion into %s", hf_dir, cfg.model.name)
    load_hf_weights(model, cfg.model, hf_dir)
    return model, vocab


def _save(args, cfg, model, vocab, hf_config, converter, layout) -> None:
    import torch
    from megatron.core import dist_checkpointing

    from nemo_rlp.models import build_teacher_model

    out = Path(args.out)
    state = {"model": model.sharded_state_dict()}
    if args.with_ema_teacher:
        from megatron.core.dist_checkpointing.utils import add_prefix_for_sharding

        from nemo_rlp.ema import EMATeacher

        teacher = EMATeacher(build_teacher_model(cfg.model, vocab, layout.tensor_parallel, layout.device))
        teacher.maybe_seed(model)
        teacher_state = teacher.teacher.sharded_state_dict()
        add_prefix_for_sharding(teacher_state, TEACHER_PREFIX)
        state["ema_teacher"] = teacher_state
    if layout.is_main:
        (out / "dist").mkdir(parents=True, exist_ok=True)
    torch.distributed.barrier()
    dist_checkpointing.save(state, str(out / "dist"))

    count = torch.tensor([sum(p.numel() for p in model.parameters())], device=layout.device, dtype=torch.float64)
    if layout.is_main:
        (out / "import.json").write_text(json.dumps({
            "source": str(Path(args.hf).resolve()),
            "architectures": hf_config.get("architectures"),
            "converter": converter,
            "model": as_dict(cfg)["model"],
            "vocab_size": vocab,
            "layout_at_import": {"tensor_parallel": layout.tensor_parallel, "pipeline_parallel": layout.pipeline_parallel},
            "parameters_on_rank0": int(count.item()),
            "dtype": cfg.model.params_dtype,
            "ema_teacher": "written (fp32, prefix ema_teacher.)" if args.with_ema_teacher
            else "not written: the trainer seeds it from the policy at the first RLP batch",
            "versions": {k: _version(k) for k in ("megatron-core", "megatron-bridge", "torch", "transformers")},
        }, indent=2))
        log.info("wrote %s (dist/ + import.json)", out)


def _version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    setup_recipe_logging()
    try:
        cfg, hf_config, converter = _prepare(args)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    if converter == "bridge":
        _auto_bridge()  # fail with the container's name before starting any process group

    from nemo_rlp.parallel import distributed

    layout = distributed.initialize(cfg.parallel, cfg.trainer.seed)
    try:
        if converter == "bridge":
            cfg, model, vocab = _load_with_bridge(args, hf_config, layout)
        else:
            model, vocab = _load_with_fallback(cfg, Path(args.hf), layout)
        _save(args, cfg, model, vocab, hf_config, converter, layout)
    except ConfigError as err:  # Bridge's provider settings against the command line's overrides
        print(f"config error: {err}", file=sys.stderr)
        return 2
    finally:
        distributed.destroy()
    return 0


if __name__ == "__main__":
    sys.exit(main())
