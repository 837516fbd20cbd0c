"""recipes/export_checkpoint.py on a GPU: Megatron-Bridge's `save_hf_pretrained`, and the dependency-free
conversion on a model built with Transformer Engine layers (fused norm names).

Both run where Megatron-Bridge and Transformer Engine are (the NeMo container). A tiny random Qwen3 made
here by transformers is imported, exported again, and must come back tensor for tensor. The CPU round
trip is tests/unit/test_hf_conversion.py.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TINY_QWEN3 = dict(
    vocab_size=1024, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, head_dim=64, max_position_embeddings=512, rope_theta=1000000.0, rms_norm_eps=1e-6,
    tie_word_embeddings=False,
)


def _recipe(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "recipes" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _tiny_qwen3(folder: Path):
    import torch
    import transformers

    from nemo_rlp.data.bundled import BUNDLED_TOKENIZER

    torch.manual_seed(0)
    model = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**TINY_QWEN3)).float()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    model.save_pretrained(folder, safe_serialization=True)
    transformers.PreTrainedTokenizerFast(tokenizer_file=str(BUNDLED_TOKENIZER), eos_token="<|endoftext|>",
                                         pad_token="<pad>").save_pretrained(folder)
    return model


def _same_tensors(folder: Path, reference) -> None:
    import torch
    import transformers

    again = transformers.AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch.float32)
    assert again.state_dict().keys() == reference.state_dict().keys()
    for name, tensor in reference.state_dict().items():
        assert torch.equal(again.state_dict()[name].cpu(), tensor.cpu()), name


@pytest.mark.gpu
@pytest.mark.parametrize("converter", ["bridge", "fallback"])
def test_export_round_trip_on_gpu(tmp_path, converter):
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    if converter == "bridge":
        pytest.importorskip("megatron.bridge")
    hf_dir = tmp_path / "hf"
    reference = _tiny_qwen3(hf_dir)
    imported = tmp_path / "imported"
    assert _recipe("import_checkpoint").main(
        ["--hf", str(hf_dir), "--model", "qwen3_1p7b", "--out", str(imported), "--converter", converter,
         "model.params_dtype=fp32"]) == 0
    out = tmp_path / "exported"
    assert _recipe("export_checkpoint").main(
        ["--checkpoint", str(imported), "--out", str(out), "--hf-base", str(hf_dir), "--converter", converter]) == 0
    assert json.loads((out / "export.json").read_text())["converter"].startswith(
        "megatron-bridge" if converter == "bridge" else "nemo_rlp")
    _same_tensors(out, reference)


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-m", "gpu or not gpu", "-v"]))
