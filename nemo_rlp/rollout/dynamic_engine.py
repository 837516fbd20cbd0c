"""GPU rollouts through megatron-core's `DynamicInferenceEngine` (rollout mode `dynamic`).

STATUS: WRITTEN AGAINST megatron-core 0.16.1's API, NEVER RUN. No GPU was lent to the session that
wrote it; tests/gpu/test_dynamic_rollout.py is its first check on a lent GPU. The CPU path and the
reference stay `rows` (nemo_rlp.models.row_cache), behind the same `sample_thoughts` call.

Why not on CPU: `Attention.forward` asserts flash-attn >= 2.7.3 for any dynamic-batching context
(transformer/attention.py:926), its KV append is a Triton kernel (contexts/fused_kv_append_kernel.py),
and the context sizes its paged KV buffer in GiB of device memory with CUDA-graph batch buckets.

What the engine gives on GPU: a paged (block) KV cache, chunked prefill of contexts of any length,
in-flight batching (a finished request frees its blocks; no cache copy), Mamba conv/SSM state per
request (`MambaInferenceStateConfig`), CUDA graphs for decode steps. What it does not give in 0.16.1:
prefix caching (no `prefix_caching` anywhere in megatron/core/inference), so the G thoughts of a
context each prefill it (chunked); our sampler's noise (the engine samples with its own RNG, so
TP ranks agree through the engine's broadcast, and the draws differ from `rows`); and S_pred, which
needs x_t scored after the end marker.

So: the engine samples the thoughts (prompt = context + <think>, stop at </think>, at most L tokens);
the rows are then laid out exactly as the CPU path lays them out, and the behaviour log-probs, S_pred
and the answer argmax come from one teacher-forced forward of the rows (`ModelHandle`), which is
exact by construction (the trainer's default `rlp.logprob_source=recompute` runs this forward anyway).
"""

from __future__ import annotations

import importlib.metadata
from typing import Optional, Sequence

import torch

from nemo_rlp.models.cache_ops import engine_steps
from nemo_rlp.models.spec import architecture_of
from nemo_rlp.rollout.thoughts import answer_argmax, layout_rows, row_buffers


def available() -> bool:
    """CUDA and flash-attn >= 2.7.3: what the dynamic engine's attention asserts."""
    if not torch.cuda.is_available():
        return False
    try:
        version = importlib.metadata.version("flash-attn")
    except importlib.metadata.PackageNotFoundError:
        return False
    return tuple(int(v) for v in version.split(".")[:3] if v.isdigit()) >= (2, 7, 3)


class _TokenIds:
    """The engine wants a tokenizer; our prompts are token ids already. `eod` is the end marker."""

    def __init__(self, end: int):
        self.eod = end
        self.bos = None

    def tokenize(self, ids):
        return list(ids)

    def detokenize(self, ids, **_):
        return ""


def build_engine(handle, markers, max_requests: int, max_sequence: int, buffer_size_gb: float = 20.0, seed: int = 0):
    """megatron's dynamic engine over the handle's model (TE layer spec on GPU)."""
    from megatron.core.inference.contexts import DynamicInferenceContext
    from megatron.core.inference.engines import DynamicInferenceEngine
    from megatron.core.inference.model_inference_wrappers.gpt.gpt_inference_wrapper import GPTInferenceWrapper
    from megatron.core.inference.model_inference_wrappers.inference_wrapper_config import InferenceWrapperConfig
    from megatron.core.inference.text_generation_controllers.text_generation_controller import (
        TextGenerationController,
    )

    model = handle.language_model
    config = model.config
    wrapper_config = InferenceWrapperConfig(
        hidden_size=config.hidden_size, params_dtype=config.params_dtype, inference_batch_times_seqlen_threshold=-1,
        padded_vocab_size=model.vocab_size, inference_max_requests=max_requests, inference_max_seq_length=max_sequence,
    )
    context = DynamicInferenceContext(
        params_dtype=config.params_dtype, num_layers=config.num_layers,
        kv_channels=config.kv_channels, num_attention_heads=config.num_query_groups or config.num_attention_heads,
        max_sequence_length=max_sequence, buffer_size_gb=buffer_size_gb, max_requests=max_requests,
        tensor_model_parallel_size=config.tensor_model_parallel_size,
        pipeline_model_parallel_size=config.pipeline_model_parallel_size,
        # Recurrent (Mamba) state shapes per request, None for attention-only models: the architecture's.
        mamba_inference_state_config=architecture_of(model).cache.dynamic_state(model),
        materialize_only_last_token_logits=True,
    )
    wrapper = GPTInferenceWrapper(model, wrapper_config, context)  # MambaModel goes through the same wrapper
    controller = TextGenerationController(wrapper, tokenizer=_TokenIds(markers.think_end))
    with engine_steps():  # the engine sets InferenceMode when built (0.18 on): off again after
        return DynamicInferenceEngine(controller, context, enable_cuda_graph=True, random_seed=seed)


def sample_thoughts_dynamic(handle, prefixes: Sequence[Sequence[int]], targets: Sequence[int], params, markers,
                            generator: torch.Generator, device: torch.device,
                            thought_caps: Optional[Sequence[int]] = None, stats=None, engine=None):
    """`sample_thoughts` through the dynamic engine: the same `ThoughtBatch` layout and fields."""
    from megatron.core.inference.sampling_params import SamplingParams as EngineSampling

    G, L = params.group_size, params.max_thought_len
    prompts, prompt_len, max_positions, tokens, target, caps = row_buffers(
        prefixes, targets, params, markers, device, thought_caps)
    seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator))
    engine = engine or build_engine(handle, markers, len(prompts) * G, max_positions + 1, seed=seed)
    for row, cap in enumerate(caps.tolist()):
        engine.add_request(row, prompts[row // G], EngineSampling(
            temperature=params.temperature, top_k=params.top_k, top_p=0.0 if params.top_p >= 1.0 else params.top_p,
            num_tokens_to_generate=cap, termination_id=markers.think_end))
    generated = {}
    with engine_steps():  # InferenceMode on for the engine's steps, off for the scoring below (0.18 on)
        while engine.has_unfinished_requests():
            for record in engine.step_modern()["finished_request_records"]:
                request = record.merge() if hasattr(record, "merge") else record
                generated[request.request_id] = list(request.generated_tokens)
    thought_len = torch.zeros(len(caps), dtype=torch.long, device=device)
    end_sampled = torch.zeros(len(caps), dtype=torch.bool, device=device)
    for row, sampled in generated.items():
        start = int(prompt_len[row])
        ended = bool(sampled) and sampled[-1] == markers.think_end
        thought = sampled if ended else sampled + [markers.think_end]  # inserted at the cap, as on CPU
        tokens[row, start : start + len(thought)] = torch.tensor(thought, device=device)
        thought_len[row], end_sampled[row] = len(sampled), ended
    close_pos = prompt_len + thought_len - end_sampled.long()
    return _score_rows(handle, tokens, prompt_len, thought_len, end_sampled, close_pos, target, G, markers)


def _score_rows(handle, tokens, prompt_len, thought_len, end_sampled, close_pos, target, G, markers):
    """Behaviour log-probs, S_pred and the answer argmax from one teacher-forced forward of the rows."""
    behaviour = torch.zeros(tokens.shape[0], max(1, int(thought_len.max())), device=tokens.device)
    batch = layout_rows(tokens, prompt_len, thought_len, end_sampled, close_pos, target, behaviour,
                        torch.zeros(tokens.shape[0], device=tokens.device), G, markers)
    with torch.no_grad():
        logprobs = handle.token_logprobs(batch.tokens)  # [rows, width - 1]
        logits = handle.next_token_logits(batch.tokens, batch.answer_index)  # predicts x_t
    index, mask = batch.thought_token_index()
    batch.behaviour_logprobs = torch.where(mask, logprobs.gather(1, index - 1), 0.0)
    batch.s_pred = torch.log_softmax(logits, dim=-1).gather(1, batch.tokens.gather(1, batch.answer_index[:, None]))[:, 0]
    batch.predicted = answer_argmax(logits, markers)
    return batch
