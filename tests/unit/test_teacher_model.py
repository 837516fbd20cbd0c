"""The EMA teacher of a bf16 policy is an fp32 model that runs (nemo_rlp.models.build_teacher_model).

An fp32 cast of a bf16-config megatron model fails in its forward (megatron casts attention
probabilities and Mamba mixer inputs to the config's dtype); found while preparing the GPU check
(scripts/gpu_check.sh), since every bf16 run takes this path and no test had. Runs on CPU: the bf16
forward works there; only megatron's bf16 optimizer needs CUDA.
"""

from __future__ import annotations

import pytest
import torch

from nemo_rlp.config import load_config
from nemo_rlp.ema import EMATeacher
from nemo_rlp.models import build_model, build_teacher_model
from nemo_rlp.models.handle import ModelHandle
from nemo_rlp.parallel import distributed


@pytest.mark.parametrize("name", ["tiny_gpt", "tiny_hybrid"])
def test_the_teacher_of_a_bf16_policy_scores_in_fp32(name):
    cfg = load_config([f"model={name}", "model.params_dtype=bf16"])
    layout = distributed.initialize(cfg.parallel, seed=0)
    policy = build_model(cfg.model, 512, 1, layout.device)
    teacher = EMATeacher(build_teacher_model(cfg.model, 512, 1, layout.device))
    assert torch.bfloat16 in {p.dtype for p in policy.parameters()}  # megatron keeps a few (norms) in fp32
    assert {p.dtype for p in teacher.teacher.parameters()} == {torch.float32}
    assert teacher.teacher.config.params_dtype == torch.float32 and not teacher.teacher.config.bf16

    teacher.maybe_seed(policy)
    tokens = torch.randint(4, 512, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        scored = ModelHandle(teacher.teacher).token_logprobs(tokens)
        by_policy = ModelHandle(policy).token_logprobs(tokens)
    assert scored.dtype == torch.float32 and torch.isfinite(scored).all()
    # The same weights: bf16 arithmetic keeps the policy within a few hundredths of a nat.
    assert (scored - by_policy).abs().max() < 0.1
