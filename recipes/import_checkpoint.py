"""Import a Hugging Face checkpoint as the policy's megatron-core distributed checkpoint, through
Megatron-Bridge, inside the NVIDIA NeMo container (on a GPU).

    python recipes/import_checkpoint.py --hf /ckpt/Qwen3-1.7B-Base --model qwen3_1p7b --out /ckpt/rlp/qwen3_1p7b
    python recipes/import_checkpoint.py --hf /ckpt/Nemotron-Nano-12B-v2-Base --model nemotron_nano_12b_v2 \\
        --out /ckpt/rlp/nemotron_nano_12b_v2 --trust-remote-code
    torchrun --nproc-per-node 8 recipes/import_checkpoint.py ... parallel.tensor_model_parallel_size=8

Further arguments are Hydra overrides of the model (`model.*`) and the layout (`parallel.*`), as for
the trainer. The model is this project's own (`nemo_rlp.models.build_model` on nemo_rlp/conf/model/NAME.yaml),
built on the GPU with Transformer Engine layers, so the checkpoint's keys are exactly those of the
model the trainer builds. Megatron-Bridge's `AutoBridge.from_hf_pretrained(HF).load_hf_weights([model])`
maps the Hugging Face tensors onto it and shards them over tensor-parallel ranks. Before that, every
parameter is set to NaN; afterwards a parameter that still holds a NaN (one the bridge has no mapping
for) fails the import by name, so a partly random checkpoint cannot be written. The Hugging Face
config is checked against the model config first, field by field.

Output, in OUT/:
    dist/         megatron-core dist_checkpointing of {"model": model.sharded_state_dict()}: the keys
                  of the "model" part of a training checkpoint (`nemo_rlp.training.checkpoint`),
                  saved with global shapes, so it loads into any TP x PP layout. With
                  --with-ema-teacher it also holds {"ema_teacher": ...} (keys prefixed
                  "ema_teacher.", as in a training checkpoint): the EMA seed φ = θ in fp32.
    import.json   the source, the model config, the layout of the import, versions, the parameter count.

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
import warnings
from pathlib import Path

# Runnable from a checkout without installing the package.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from nemo_rlp.config import ConfigError, ModelConfig, as_dict, load_config  # noqa: E402

log = logging.getLogger("nemo_rlp.import")

# The container that carries Megatron-Bridge: the Dockerfile's base image (tests check they agree).
NEMO_IMAGE = "nvcr.io/nvidia/nemo:26.04.00"
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


def _auto_bridge():
    try:
        from megatron.bridge import AutoBridge
    except ImportError as err:
        raise SystemExit(
            "recipes/import_checkpoint.py needs Megatron-Bridge (the megatron.bridge package), which is not "
            f"installed here ({err}). It ships in the NVIDIA NeMo container: run the import there, e.g. "
            f"srun --container-image={NEMO_IMAGE} --container-mounts=... python recipes/import_checkpoint.py ... "
            "(or in the image built from ./Dockerfile)."
        ) from None
    return AutoBridge


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hf", required=True, help="a Hugging Face checkpoint directory (config.json + safetensors)")
    parser.add_argument("--model", required=True, help="a name in nemo_rlp/conf/model/ (e.g. qwen3_1p7b, nemotron_nano_12b_v2)")
    parser.add_argument("--out", required=True, help="output directory (must not hold a checkpoint already)")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="let transformers run the checkpoint's own modeling code (Nemotron-H needs it)")
    parser.add_argument("--with-ema-teacher", action="store_true", help="also write the EMA seed (fp32 copy)")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of model.* and parallel.*")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    logging.getLogger("megatron").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*(Transformer Engine|Apex) .*not installed.*")

    hf_dir, out = Path(args.hf), Path(args.out)
    try:
        cfg = load_config([f"model={args.model}", *args.overrides])
        config_file = hf_dir / "config.json"
        if not config_file.is_file():
            raise ConfigError(f"--hf {hf_dir}: no config.json there; pass a Hugging Face checkpoint directory")
        hf_config = json.loads(config_file.read_text())
        check_hf_config(hf_config, cfg.model)
        if (out / "dist").exists() and any((out / "dist").iterdir()):
            raise ConfigError(f"--out {out}: {out / 'dist'} already holds a checkpoint; pick an empty directory")
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2

    AutoBridge = _auto_bridge()
    import torch

    if not torch.cuda.is_available():
        raise SystemExit(
            "recipes/import_checkpoint.py needs a GPU: it builds the model with Transformer Engine layers, whose "
            f"parameter names Megatron-Bridge maps (run it in {NEMO_IMAGE} on a GPU node)"
        )
    from megatron.core import dist_checkpointing

    from nemo_rlp.models import build_model, build_teacher_model
    from nemo_rlp.models.vocab import padded_vocab_size
    from nemo_rlp.parallel import distributed

    layout = distributed.initialize(cfg.parallel, cfg.trainer.seed)
    try:
        tp = layout.tensor_parallel
        vocab = padded_vocab_size(cfg.model, int(hf_config.get("vocab_size") or 0), tp)
        model = build_model(cfg.model, vocab, tp, layout.device)
        with torch.no_grad():
            for p in model.parameters():
                p.fill_(float("nan"))

        dtype = torch.bfloat16 if cfg.model.params_dtype == "bf16" else torch.float32
        log.info("loading %s through Megatron-Bridge into %s (TP=%d, PP=%d)", hf_dir, cfg.model.name, tp,
                 layout.pipeline_parallel)
        bridge = AutoBridge.from_hf_pretrained(str(hf_dir), trust_remote_code=args.trust_remote_code, torch_dtype=dtype)
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

        state = {"model": model.sharded_state_dict()}
        if args.with_ema_teacher:
            from megatron.core.dist_checkpointing.utils import add_prefix_for_sharding

            from nemo_rlp.ema import EMATeacher

            teacher = EMATeacher(build_teacher_model(cfg.model, vocab, tp, layout.device))
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
            from importlib.metadata import PackageNotFoundError, version

            def _version(package: str) -> str | None:
                try:
                    return version(package)
                except PackageNotFoundError:
                    return None

            (out / "import.json").write_text(json.dumps({
                "source": str(hf_dir.resolve()),
                "architectures": hf_config.get("architectures"),
                "model": as_dict(cfg)["model"],
                "vocab_size": vocab,
                "layout_at_import": {"tensor_parallel": tp, "pipeline_parallel": layout.pipeline_parallel},
                "parameters_on_rank0": int(count.item()),
                "dtype": cfg.model.params_dtype,
                "ema_teacher": "written (fp32, prefix ema_teacher.)" if args.with_ema_teacher
                else "not written: the trainer seeds it from the policy at the first RLP batch",
                "versions": {k: _version(k) for k in ("megatron-core", "megatron-bridge", "torch", "transformers")},
            }, indent=2))
            log.info("wrote %s (dist/ + import.json)", out)
    finally:
        distributed.destroy()
    return 0


if __name__ == "__main__":
    sys.exit(main())
