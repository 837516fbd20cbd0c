"""parallel.distributed_optimizer: megatron's DistributedOptimizer shards the fp32 master weights and
Adam moments over data-parallel ranks. megatron-core requires torch.cuda parameters for it
(distrib_optimizer.py:420 in 0.16.1), so the equality run is a `gpu` test; on CPU the option is
refused at start-up with the key named (the CPU test below).

Not run in this project's CI (no GPU); the GPU test has not been run yet.
"""

from __future__ import annotations

import pytest
import torch

from nemo_rlp.config import ConfigError, ParallelConfig, load_config


def _layout():
    from nemo_rlp.parallel.distributed import ParallelLayout

    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    return ParallelLayout(world_size=1, rank=0, tensor_parallel=1, pipeline_parallel=1, data_parallel=1, device=device)


def test_distributed_optimizer_is_refused_on_cpu_naming_the_key():
    if torch.cuda.is_available():
        pytest.skip("CPU-only check")
    from nemo_rlp.parallel import distributed
    from nemo_rlp.training.policy import PolicyWithTeacher

    distributed.initialize(ParallelConfig(), 0)
    cfg = load_config(["model=tiny_gpt", "parallel.distributed_optimizer=true"])
    with pytest.raises(ConfigError, match=r"parallel\.distributed_optimizer"):
        PolicyWithTeacher(cfg, 256, _layout())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_distributed_optimizer_step_equals_the_replicated_optimizer():
    """One NTP step with and without the distributed optimizer (DP=1: the same update)."""
    from nemo_rlp.parallel import distributed
    from nemo_rlp.training.policy import PolicyWithTeacher
    from nemo_rlp.training.steps import ntp_step

    distributed.initialize(ParallelConfig(), 0)
    tokens = torch.randint(4, 256, (4, 33), generator=torch.Generator().manual_seed(0)).cuda()
    weights = {}
    for sharded in (False, True):
        torch.manual_seed(0)
        cfg = load_config(["model=tiny_gpt", f"parallel.distributed_optimizer={str(sharded).lower()}",
                           "trainer.lr=1e-2", "trainer.adam_eps=1e-3"])
        model = PolicyWithTeacher(cfg, 256, _layout())
        ntp_step(model, tokens)
        weights[sharded] = {n: p.detach().float().clone() for n, p in model.language_model.named_parameters()}
    for name, value in weights[False].items():
        torch.testing.assert_close(weights[True][name], value, atol=1e-5, rtol=0, msg=name)
