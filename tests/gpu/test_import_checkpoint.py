"""recipes/import_checkpoint.py: a Hugging Face checkpoint in, the policy's megatron-core distributed
checkpoint out, through Megatron-Bridge (its dependency-free fallback is tested on CPU in
tests/unit/test_hf_conversion.py).

The `gpu` test runs in the NeMo container on a GPU: it writes a small random Qwen3 checkpoint with
transformers, imports it, loads the distributed checkpoint into a freshly built (differently
initialised) model of this project, and compares its logits with the Hugging Face model's. The other
tests run anywhere: outside the container the recipe must say which container it needs, and a
Hugging Face config that does not describe the model must fail by field.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _recipe():
    spec = importlib.util.spec_from_file_location("import_checkpoint", REPO / "recipes" / "import_checkpoint.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# A Qwen3 small enough for a unit test, and the overrides that make nemo_rlp/conf/model/qwen3_1p7b.yaml match it.
TINY_QWEN3 = dict(
    vocab_size=1024, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, head_dim=64, max_position_embeddings=512, rope_theta=10000.0, rms_norm_eps=1e-6,
    tie_word_embeddings=True,
)
TINY_OVERRIDES = [
    "model.num_layers=2", "model.hidden_size=256", "model.ffn_hidden_size=512", "model.num_attention_heads=4",
    "model.num_query_groups=2", "model.kv_channels=64", "model.vocab_size=1024", "model.max_sequence_length=512",
    "model.params_dtype=fp32", "model.rotary_base=10000",  # transformers' default RoPE base, whatever its version
]


def test_hf_config_must_describe_the_model():
    from nemo_rlp.config import ConfigError, load_config

    recipe = _recipe()
    model = load_config(["model=qwen3_1p7b", *TINY_OVERRIDES]).model
    recipe.check_hf_config(TINY_QWEN3, model)
    with pytest.raises(ConfigError, match=r"hidden_size=128 but model.hidden_size=256; num_key_value_heads=4 but model.num_query_groups=2"):
        recipe.check_hf_config({**TINY_QWEN3, "num_key_value_heads": 4, "hidden_size": 128}, model)
    nemotron = load_config(["model=nemotron_nano_12b_v2"]).model
    hf = {"hidden_size": 5120, "num_hidden_layers": 62, "hybrid_override_pattern": nemotron.hybrid_override_pattern,
          "mamba_num_heads": 128, "mamba_head_dim": 80, "ssm_state_size": 128, "n_groups": 8,
          "tie_word_embeddings": False, "rope_theta": 12345.0}  # no RoPE in the model: rope_theta is not checked
    recipe.check_hf_config(hf, nemotron)
    with pytest.raises(ConfigError, match="ssm_state_size=64 but model.mamba_state_dim=128"):
        recipe.check_hf_config({**hf, "ssm_state_size": 64}, nemotron)


def test_without_megatron_bridge_the_recipe_names_the_container(tmp_path, capsys):
    """Where Megatron-Bridge does not import (no Transformer Engine: CPU), an import that needs it (the
    hybrid family, which has no dependency-free conversion, or --converter bridge) names the container."""
    if importlib.util.find_spec("megatron.bridge") is not None:
        pytest.skip("Megatron-Bridge is installed here")
    recipe = _recipe()
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps(TINY_QWEN3))
    with pytest.raises(SystemExit) as exit_info:
        recipe.main(["--hf", str(hf), "--model", "qwen3_1p7b", "--out", str(tmp_path / "out"), "--converter", "bridge",
                     *TINY_OVERRIDES])
    message = str(exit_info.value)
    assert "Megatron-Bridge" in message and recipe.NEMO_IMAGE in message
    assert not (tmp_path / "out").exists()
    (hf / "config.json").write_text(json.dumps({"hidden_size": 5120, "num_hidden_layers": 62}))
    with pytest.raises(SystemExit, match="Megatron-Bridge"):
        recipe.main(["--hf", str(hf), "--model", "nemotron_nano_12b_v2", "--out", str(tmp_path / "out")])
    assert recipe.main(["--hf", str(hf), "--model", "nemotron_nano_12b_v2", "--out", str(tmp_path / "out"),
                        "--converter", "fallback"]) == 2
    assert "no dependency-free conversion" in capsys.readouterr().err


def test_bad_arguments_fail_before_any_work(tmp_path, capsys):
    recipe = _recipe()
    assert recipe.main(["--hf", str(tmp_path), "--model", "qwen3_1p7b", "--out", str(tmp_path / "o")]) == 2
    assert "no config.json" in capsys.readouterr().err
    (tmp_path / "config.json").write_text(json.dumps({**TINY_QWEN3, "architectures": ["Qwen3ForCausalLM"],
                                                      "num_hidden_layers": 3}))
    assert recipe.main(["--hf", str(tmp_path), "--model", "qwen3_1p7b", "--out", str(tmp_path / "o"),
                        *TINY_OVERRIDES]) == 2
    assert "num_hidden_layers=3 but model.num_layers=2" in capsys.readouterr().err


@pytest.mark.gpu
def test_import_tiny_qwen3_matches_hugging_face_logits(tmp_path):
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    pytest.importorskip("megatron.bridge")
    transformers = pytest.importorskip("transformers")

    # 1. A random Qwen3 checkpoint in Hugging Face format.
    torch.manual_seed(0)
    hf_model = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**TINY_QWEN3)).float()
    # Norm weights start at one; make them informative so a missing or transposed norm shows.
    with torch.no_grad():
        for name, p in hf_model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    hf_dir = tmp_path / "hf"
    hf_model.save_pretrained(hf_dir, safe_serialization=True)

    # 2. Import it.
    out = tmp_path / "megatron"
    recipe = _recipe()
    assert recipe.main(["--hf", str(hf_dir), "--model", "qwen3_1p7b", "--out", str(out), "--with-ema-teacher",
                        "--converter", "bridge", *TINY_OVERRIDES]) == 0
    meta = json.loads((out / "import.json").read_text())
    assert meta["converter"] == "bridge" and meta["vocab_size"] == 1024 and meta["layout_at_import"]["tensor_parallel"] == 1
    assert meta["parameters_on_rank0"] == sum(p.numel() for p in hf_model.parameters())

    # 3. Load it into a fresh model of this project (another seed: every weight must come from disk).
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.utils import add_prefix_for_sharding

    from nemo_rlp.config import load_config
    from nemo_rlp.models import build_model
    from nemo_rlp.parallel import distributed

    cfg = load_config(["model=qwen3_1p7b", *TINY_OVERRIDES, "trainer.seed=99"])
    layout = distributed.initialize(cfg.parallel, cfg.trainer.seed)
    try:
        model = build_model(cfg.model, 1024, 1, layout.device).eval()
        teacher = build_model(cfg.model, 1024, 1, layout.device).float().eval()
        before = {k: v.clone() for k, v in model.state_dict().items() if torch.is_tensor(v)}
        teacher_state = teacher.sharded_state_dict()
        add_prefix_for_sharding(teacher_state, recipe.TEACHER_PREFIX)
        loaded = dist_checkpointing.load({"model": model.sharded_state_dict(), "ema_teacher": teacher_state}, str(out / "dist"))
        model.load_state_dict(loaded["model"])
        teacher.load_state_dict(loaded["ema_teacher"])
        changed = [k for k, v in model.state_dict().items() if torch.is_tensor(v) and k in before
                   and not torch.equal(v, before[k]) and not k.endswith("_extra_state")]
        assert changed, "loading changed nothing"

        # 4. Same logits as Hugging Face's, and the EMA seed equals the policy.
        tokens = torch.randint(0, 1024, (2, 48), generator=torch.Generator().manual_seed(1)).to(layout.device)
        positions = torch.arange(tokens.shape[1], device=layout.device).expand_as(tokens)
        with torch.no_grad():
            ours = model(tokens, positions, None).float()
            theirs = hf_model.to(layout.device).eval()(tokens).logits.float()
            seed = teacher(tokens, positions, None).float()
        assert ours.shape == theirs.shape == (2, 48, 1024)
        ours_lp, theirs_lp = ours.log_softmax(-1), theirs.log_softmax(-1)
        # fp32 weights; TF32 matmuls (Transformer Engine) allow a few 1e-3 of drift per layer.
        assert (ours_lp - theirs_lp).abs().max().item() < 2e-2, (ours_lp - theirs_lp).abs().max().item()
        assert (ours.argmax(-1) == theirs.argmax(-1)).float().mean().item() > 0.98
        assert torch.allclose(seed, ours, atol=1e-4)
    finally:
        distributed.destroy()


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-m", "gpu or not gpu", "-v"]))
