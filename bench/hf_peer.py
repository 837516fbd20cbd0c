"""The peer a user would write instead of our sampler: Hugging Face `transformers` `generate()` with
`num_return_sequences=G` and its KV cache, on a Llama config matched to a GPT `ModelConfig`, with our
weights copied in (and the logits checked equal). Bench-only: `pip install -e .[bench]`.
"""

from __future__ import annotations

import torch

from nemo_rlp.config import ModelConfig


def llama_config(cfg: ModelConfig, vocab_size: int):
    from transformers import LlamaConfig

    if cfg.arch != "gpt" or cfg.position_embedding_type != "rope" or not cfg.gated_linear_unit \
            or cfg.activation != "silu" or cfg.normalization != "RMSNorm" or cfg.qk_layernorm or cfg.add_bias_linear:
        raise ValueError(f"model {cfg.name} has no Llama equivalent (needs RoPE, SwiGLU, RMSNorm, no biases)")
    return LlamaConfig(
        vocab_size=vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.ffn_hidden_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_query_groups or cfg.num_attention_heads,
        head_dim=cfg.kv_channels or cfg.hidden_size // cfg.num_attention_heads,
        max_position_embeddings=cfg.max_sequence_length, rms_norm_eps=cfg.layernorm_epsilon,
        rope_theta=float(cfg.rotary_base), tie_word_embeddings=cfg.share_embeddings_and_output_weights,
        attention_bias=False, mlp_bias=False, torch_dtype=torch.float32,
        bos_token_id=None, eos_token_id=None, pad_token_id=0,
    )


@torch.no_grad()
def llama_from_gpt(gpt: torch.nn.Module, cfg: ModelConfig, vocab_size: int):
    """A `LlamaForCausalLM` holding the weights of a TP=1 megatron GPTModel (local spec)."""
    from transformers import LlamaForCausalLM

    hf_cfg = llama_config(cfg, vocab_size)
    model = LlamaForCausalLM(hf_cfg).eval()
    heads, groups, dim = hf_cfg.num_attention_heads, hf_cfg.num_key_value_heads, hf_cfg.head_dim
    model.model.embed_tokens.weight.copy_(gpt.embedding.word_embeddings.weight)
    for ours, theirs in zip(gpt.decoder.layers, model.model.layers):
        theirs.input_layernorm.weight.copy_(ours.input_layernorm.weight)
        # megatron interleaves q, k, v per query group: [q (heads/groups), k, v] x groups.
        qkv = ours.self_attention.linear_qkv.weight.view(groups, heads // groups + 2, dim, -1)
        theirs.self_attn.q_proj.weight.copy_(qkv[:, :-2].reshape(heads * dim, -1))
        theirs.self_attn.k_proj.weight.copy_(qkv[:, -2].reshape(groups * dim, -1))
        theirs.self_attn.v_proj.weight.copy_(qkv[:, -1].reshape(groups * dim, -1))
        theirs.self_attn.o_proj.weight.copy_(ours.self_attention.linear_proj.weight)
        theirs.post_attention_layernorm.weight.copy_(ours.pre_mlp_layernorm.weight)
        gate, up = ours.mlp.linear_fc1.weight.chunk(2, dim=0)  # megatron's GLU: act(first) * second
        theirs.mlp.gate_proj.weight.copy_(gate)
        theirs.mlp.up_proj.weight.copy_(up)
        theirs.mlp.down_proj.weight.copy_(ours.mlp.linear_fc2.weight)
    model.model.norm.weight.copy_(gpt.decoder.final_layernorm.weight)
    if not cfg.share_embeddings_and_output_weights:
        model.lm_head.weight.copy_(gpt.output_layer.weight)
    return model


class ForcedThoughtLengths:
    """A logits processor that suppresses the end marker until each row's cap, then forces it: the
    same lengths our sampler gets from `thought_caps` with the end marker suppressed. Also counts
    decode steps and live rows (rows whose end marker has not been generated)."""

    def __init__(self, caps: torch.Tensor, prompt_width: int, end: int):
        self.caps, self.prompt_width, self.end = caps, prompt_width, end
        self.steps = 0
        self.row_steps = 0
        self.live_row_steps = 0

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        u = input_ids.shape[1] - self.prompt_width  # tokens generated so far
        self.steps += 1
        self.row_steps += scores.shape[0]
        self.live_row_steps += int((self.caps >= u).sum())
        scores = scores.clone()
        scores[:, self.end] = float("-inf")
        forced = self.caps == u
        scores[forced] = float("-inf")
        scores[forced, self.end] = 0.0
        return scores


def generate(model, prefixes: list[list[int]], caps: torch.Tensor, group: int, temperature: float,
             start: int, end: int, pad: int) -> ForcedThoughtLengths:
    """G thoughts per context through `generate()`: contexts left-padded into one batch (as
    `generate` wants), the start marker appended, sampling at `temperature`, thoughts forced to
    `caps` tokens plus the end marker. Returns the processor with its counters."""
    from transformers import LogitsProcessorList

    prompts = [list(p) + [start] for p in prefixes]
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    forcing = ForcedThoughtLengths(caps, width, end)
    model.generate(
        input_ids=ids, attention_mask=mask, do_sample=True, temperature=temperature, top_k=0, top_p=1.0,
        num_return_sequences=group, max_new_tokens=int(caps.max()) + 1, eos_token_id=end, pad_token_id=pad,
        logits_processor=LogitsProcessorList([forcing]), use_cache=True,
    )
    return forcing
