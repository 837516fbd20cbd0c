"""Pipeline parallelism outside megatron's training schedules: one pipelined forward, and broadcasts
from the last stage (the only one that sees logits) to the other stages of the same model replica.

Training runs through megatron's forward-backward schedules (`nemo_rlp.training.steps`). Rollouts
and no-grad scoring run step by step and use `forward` here, built on megatron's inference p2p
helpers, so every stage of a replica ends a step with the same values and runs the same sampler.
"""

from __future__ import annotations

from typing import Any, Optional

import torch


def size() -> int:
    from megatron.core import parallel_state

    return parallel_state.get_pipeline_model_parallel_world_size()


def is_first_stage() -> bool:
    from megatron.core import parallel_state

    return parallel_state.is_pipeline_first_stage(ignore_virtual=True)


def is_last_stage() -> bool:
    from megatron.core import parallel_state

    return parallel_state.is_pipeline_last_stage(ignore_virtual=True)


def forward(module: torch.nn.Module, language_model: torch.nn.Module, tokens: torch.Tensor,
            positions: torch.Tensor, **kwargs: Any) -> Optional[torch.Tensor]:
    """Run this stage: receive the previous stage's hidden states [s, b, h], run, and send ours on.
    Returns the model's output on the last stage and None on the others."""
    if size() == 1:
        return module(tokens, positions, None, **kwargs)
    from megatron.core.inference.communication_utils import (
        recv_from_prev_pipeline_rank_,
        send_to_next_pipeline_rank,
    )

    config = language_model.config
    if not is_first_stage():
        hidden = torch.empty(
            (tokens.shape[1], tokens.shape[0], config.hidden_size),
            dtype=config.pipeline_dtype or config.params_dtype,
            device=tokens.device,
        )
        recv_from_prev_pipeline_rank_(hidden)
        language_model.set_input_tensor(hidden)
    output = module(tokens, positions, None, **kwargs)
    if not is_last_stage():
        send_to_next_pipeline_rank(output.contiguous())
        return None
    return output


def is_first_stage_or_single() -> bool:
    return size() == 1 or is_first_stage()


def is_last_stage_or_single() -> bool:
    return size() == 1 or is_last_stage()


def send_hidden(hidden: torch.Tensor) -> None:
    """Send this stage's hidden states [s, b, h] to the next stage (megatron's inference p2p)."""
    from megatron.core.inference.communication_utils import send_to_next_pipeline_rank

    send_to_next_pipeline_rank(hidden.contiguous())


def recv_hidden(shape, dtype: torch.dtype, device) -> torch.Tensor:
    """The previous stage's hidden states, shaped `shape`."""
    from megatron.core.inference.communication_utils import recv_from_prev_pipeline_rank_

    hidden = torch.empty(tuple(shape), dtype=dtype, device=device)
    recv_from_prev_pipeline_rank_(hidden)
    return hidden


def broadcast_from_last_stage(tensor: Optional[torch.Tensor], shape, dtype: torch.dtype) -> torch.Tensor:
    """The last stage's `tensor` on every stage of this replica (others pass None)."""
    if size() == 1:
        return tensor
    from megatron.core import parallel_state

    if not is_last_stage():
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else "cpu"
        tensor = torch.empty(tuple(shape), dtype=dtype, device=device)
    else:
        tensor = tensor.contiguous()
    torch.distributed.broadcast(
        tensor,
        src=parallel_state.get_pipeline_model_parallel_last_rank(),
        group=parallel_state.get_pipeline_model_parallel_group(),
    )
    return tensor


def broadcast_object_from_last_stage(obj: Any) -> Any:
    """A picklable object (e.g. a metrics dict) from the last stage to every stage of this replica."""
    if size() == 1:
        return obj
    from megatron.core import parallel_state

    holder = [obj if is_last_stage() else None]
    torch.distributed.broadcast_object_list(
        holder,
        src=parallel_state.get_pipeline_model_parallel_last_rank(),
        group=parallel_state.get_pipeline_model_parallel_group(),
    )
    return holder[0]
