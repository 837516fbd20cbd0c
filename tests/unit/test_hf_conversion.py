"""Hugging Face <-> our GPTModel without Megatron-Bridge (nemo_rlp/models/gpt/hf_conversion.py,
nemo_rlp/training/hf_checkpoint.py, recipes/import_checkpoint.py and recipes/export_checkpoint.py on
CPU).

The round trip the project promises: a random tiny Qwen3 made here by transformers (no hub) is
imported as our checkpoint, computes the same logits in our megatron-core model as in transformers,
and exported back it is the same checkpoint, tensor for tensor. Megatron-Bridge's own export is the
`gpu` test in tests/gpu/test_export_checkpoint.py.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
import transformers

from nemo_rlp.config import load_config
from nemo_rlp.data.bundled import BUNDLED_TOKENIZER
from nemo_rlp.models import build_model
from nemo_rlp.models.gpt import hf_conversion
from nemo_rlp.training import hf_checkpoint

REPO = Path(__file__).resolve().parents[2]

# Qwen3-shaped and tiny: GQA (4 query heads over 2 KV groups of head_dim 16). Qwen3's head_dim need not
# be hidden / heads: one case below uses 32.
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            head_dim=16, max_position_embeddings=256, rope_theta=1000000.0, rms_norm_eps=1e-6)


def _recipe(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "recipes" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _hf_model(arch: str, vocab: int, tied: bool, **changes) -> transformers.PreTrainedModel:
    """A random model of `arch` (`Qwen3ForCausalLM` / `LlamaForCausalLM`) with informative norms (not
    all ones), so that a missing, swapped or transposed norm shows in the logits."""
    torch.manual_seed(0)
    fields = {**TINY, "vocab_size": vocab, "tie_word_embeddings": tied, **changes}
    if arch == hf_conversion.QWEN3:
        model = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**fields))
    else:
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**fields))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model.float().eval()


def _tokens(vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 40), generator=torch.Generator().manual_seed(1))


def _ours(model, tokens):
    positions = torch.arange(tokens.shape[1]).expand_as(tokens)
    with torch.no_grad():
        return model(tokens, positions, None).float()


@pytest.fixture
def single_process():
    with hf_checkpoint.SingleProcess() as device:
        yield device


@pytest.mark.parametrize("arch,tied,padded,changes", [
    (hf_conversion.QWEN3, False, False, {}),
    (hf_conversion.QWEN3, True, True, {"head_dim": 32}),
    (hf_conversion.LLAMA, True, False, {"head_dim": None, "rope_theta": 10000.0}),
])
def test_state_dicts_convert_both_ways_with_the_same_logits(single_process, arch, tied, padded, changes):
    """HF tensors -> ours (logits equal, fp32) -> HF tensors (identical), for Qwen3 and Llama, tied or
    not, head_dim apart from hidden / heads, and a padded vocabulary (our 384 rows for HF's 300)."""
    hf = _hf_model(arch, 300, tied, **changes)
    overrides = hf_conversion.model_overrides(hf.config.to_dict())
    cfg = load_config(["model=tiny_gpt", *overrides, *(["++model.vocab_size=384"] if padded else [])]).model
    assert cfg.qk_layernorm == (arch == hf_conversion.QWEN3) and cfg.share_embeddings_and_output_weights == tied
    ours = build_model(cfg, cfg.vocab_size, 1, single_process).eval()
    target = {k: v for k, v in ours.state_dict().items() if torch.is_tensor(v)}
    ours.load_state_dict(hf_conversion.from_hf(hf.state_dict(), cfg, target), strict=False)

    tokens = _tokens(300)
    with torch.no_grad():
        theirs = hf(tokens).logits
    mine = _ours(ours, tokens)
    assert mine.shape[-1] == (384 if padded else 300)
    assert (mine[..., :300] - theirs).abs().max().item() < 1e-4

    back = hf_conversion.to_hf(ours.state_dict(), cfg, vocab_size=300)
    expected = {k: v for k, v in hf.state_dict().items() if not (tied and k == "lm_head.weight")}
    assert back.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(back[name], tensor), name
    assert hf_conversion.hf_config(cfg, 300)["architectures"] == [arch]


def test_what_cannot_be_converted_fails_by_name():
    cfg = load_config(["model=tiny_gpt"]).model
    with pytest.raises(ValueError, match=r"model.add_bias_linear=True"):
        hf_conversion.check_convertible(load_config(["model=tiny_gpt", "++model.add_bias_linear=true"]).model)
    with pytest.raises(ValueError, match=r"model.arch='hybrid'"):
        hf_conversion.check_convertible(load_config(["model=tiny_hybrid"]).model)
    config = {**TINY, "architectures": ["Qwen3ForCausalLM"], "vocab_size": 300}
    with pytest.raises(ValueError, match=r"rope_scaling=.*Megatron-Bridge"):
        hf_conversion.model_overrides({**config, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}})
    with pytest.raises(ValueError, match=r"MistralForCausalLM"):
        hf_conversion.model_overrides({**config, "architectures": ["MistralForCausalLM"]})
    with pytest.raises(ValueError, match=r"missing model.layers.1.self_attn.q_proj.weight"):
        hf = _hf_model(hf_conversion.QWEN3, 300, False).state_dict()
        del hf["model.layers.1.self_attn.q_proj.weight"]
        target = {"decoder.layers.1.self_attention.linear_qkv.weight": torch.zeros(128, 64)}
        hf_conversion.from_hf(hf, load_config(["model=tiny_gpt", *hf_conversion.model_overrides(
            {**config, "vocab_size": 300})]).model, target)
    assert hf_conversion.architecture(cfg) == hf_conversion.LLAMA  # tiny_gpt has no QK norms


def test_bridge_provider_settings_become_model_overrides():
    """The Bridge import's model settings come from its provider; a stand-in provider shows the mapping."""
    from types import SimpleNamespace

    provider = SimpleNamespace(num_layers=2, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4,
                               num_query_groups=2, kv_channels=16, vocab_size=512, seq_length=256,
                               position_embedding_type="rope", rotary_base=1000000.0, normalization="RMSNorm",
                               layernorm_epsilon=1e-6, gated_linear_unit=True, qk_layernorm=True,
                               add_bias_linear=False, share_embeddings_and_output_weights=False)
    cfg = load_config(["model=qwen3_1p7b", *hf_checkpoint.provider_overrides(provider)]).model
    assert (cfg.num_layers, cfg.hidden_size, cfg.kv_channels, cfg.vocab_size, cfg.max_sequence_length) == (2, 64, 16, 512, 256)
    assert cfg.rotary_base == 1000000 and cfg.layernorm_epsilon == 1e-6 and not cfg.share_embeddings_and_output_weights


@pytest.mark.timeout(300)
def test_qwen3_round_trip_through_the_recipes(tmp_path):
    """HF -> recipes/import_checkpoint.py (the fallback, on CPU) -> our model: the same logits as
    transformers -> recipes/export_checkpoint.py -> HF: the same tensors, config and logits; the EMA
    teacher written by the import exports to the same model."""
    hf = _hf_model(hf_conversion.QWEN3, 1024, tied=False)  # the bundled tokenizer's 1024 tokens
    hf_dir = tmp_path / "hf"
    hf.save_pretrained(hf_dir, safe_serialization=True)
    transformers.PreTrainedTokenizerFast(tokenizer_file=str(BUNDLED_TOKENIZER), eos_token="<|endoftext|>",
                                         pad_token="<pad>").save_pretrained(hf_dir)

    imported = tmp_path / "imported"
    assert _recipe("import_checkpoint").main(
        ["--hf", str(hf_dir), "--model", "qwen3_1p7b", "--out", str(imported), "--with-ema-teacher",
         "--converter", "fallback", "model.params_dtype=fp32"]) == 0
    record = json.loads((imported / "import.json").read_text())
    assert record["converter"] == "fallback" and record["model"]["num_layers"] == 2 and record["vocab_size"] == 1024
    assert record["parameters_on_rank0"] == sum(p.numel() for p in hf.parameters())

    tokens = _tokens(1024)
    with torch.no_grad():
        theirs = hf(tokens).logits
    with hf_checkpoint.SingleProcess() as device:
        ours = hf_checkpoint.load_model(hf_checkpoint.checkpoint_source(imported), device)
        assert (_ours(ours, tokens) - theirs).abs().max().item() < 1e-4

    export = _recipe("export_checkpoint")
    assert export.main(["--checkpoint", str(imported), "--out", str(tmp_path / "back")]) == 0
    assert export.main(["--checkpoint", str(imported), "--out", str(tmp_path / "teacher"), "--ema-teacher"]) == 0
    for folder in ("back", "teacher"):
        again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / folder, torch_dtype=torch.float32).eval()
        assert type(again).__name__ == "Qwen3ForCausalLM"
        assert again.state_dict().keys() == hf.state_dict().keys()
        for name, tensor in hf.state_dict().items():
            assert torch.equal(again.state_dict()[name], tensor), (folder, name)
        with torch.no_grad():
            assert torch.equal(again(tokens).logits, theirs)
        for key in ("rope_theta", "rms_norm_eps", "head_dim", "num_key_value_heads", "tie_word_embeddings"):
            assert getattr(again.config, key) == getattr(hf.config, key), key
        assert transformers.AutoTokenizer.from_pretrained(tmp_path / folder).eos_token == "<|endoftext|>"
    assert json.loads((tmp_path / "teacher" / "export.json").read_text())["weights"] == "ema_teacher"
    # A folder that is not empty is refused before any work.
    assert export.main(["--checkpoint", str(imported), "--out", str(tmp_path / "back")]) == 2
