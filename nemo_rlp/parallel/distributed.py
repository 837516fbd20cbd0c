"""Process groups: torch.distributed and megatron-core's parallel state, on CUDA or the CPU platform.

This is the one place that reads the launcher's environment (torchrun / srun set RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR, MASTER_PORT): it is the launch contract, not configuration.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch

from nemo_rlp.config import ConfigError, ParallelConfig
from nemo_rlp.parallel import cpu_platform


@dataclass(frozen=True)
class ParallelLayout:
    world_size: int
    rank: int
    tensor_parallel: int
    pipeline_parallel: int
    data_parallel: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def check_layout(cfg: ParallelConfig, world_size: int) -> int:
    """Return the data-parallel size, or fail naming the keys when the layout does not fit."""
    model_parallel = cfg.tensor_model_parallel_size * cfg.pipeline_model_parallel_size
    if world_size % model_parallel:
        raise ConfigError(
            f"parallel.tensor_model_parallel_size={cfg.tensor_model_parallel_size} x "
            f"parallel.pipeline_model_parallel_size={cfg.pipeline_model_parallel_size} = "
            f"{model_parallel} does not divide the world size {world_size}; launch a multiple of "
            f"{model_parallel} processes or change the sizes"
        )
    return world_size // model_parallel


def launch_rank() -> int:
    """This process's global rank as the launcher set it (0 without a launcher), readable before
    the process group exists."""
    return int(os.environ.get("RANK", "0"))


def initialize(cfg: ParallelConfig, seed: int) -> ParallelLayout:
    """Start torch.distributed and megatron-core's parallel state; seed megatron's RNG tracker.

    Works with no launcher too: one process, in a group of its own.
    """
    use_cuda = cpu_platform.cuda_available()
    if not use_cuda:
        cpu_platform.install()
    backend = cfg.backend if cfg.backend != "auto" else ("nccl" if use_cuda else "gloo")
    if backend == "nccl" and not use_cuda:
        raise ConfigError("parallel.backend='nccl' needs CUDA, which is not available; use 'gloo' or 'auto'")

    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = launch_rank()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    data_parallel = check_layout(cfg, world_size)

    if use_cuda:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")

    if not torch.distributed.is_initialized():
        timeout = datetime.timedelta(minutes=10)
        if "WORLD_SIZE" not in os.environ:
            # No launcher: a one-process group over an in-memory store. Nothing is written to the
            # environment, so processes this one starts cannot inherit a port it holds.
            torch.distributed.init_process_group(
                backend=backend, store=torch.distributed.HashStore(), rank=0, world_size=1, timeout=timeout
            )
        else:
            torch.distributed.init_process_group(
                backend=backend, rank=rank, world_size=world_size, timeout=timeout
            )

    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=cfg.tensor_model_parallel_size,
            pipeline_model_parallel_size=cfg.pipeline_model_parallel_size,
        )
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)
    return ParallelLayout(
        world_size=world_size,
        rank=rank,
        tensor_parallel=cfg.tensor_model_parallel_size,
        pipeline_parallel=cfg.pipeline_model_parallel_size,
        data_parallel=data_parallel,
        device=device,
    )


def data_parallel_rank() -> int:
    from megatron.core import parallel_state

    return parallel_state.get_data_parallel_rank()


def destroy() -> None:
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def data_parallel_sum(values: list[float]) -> list[float]:
    """Element-wise sum of `values` over the data-parallel ranks (e.g. the global count of thoughts
    from each rank's local count). float64 on the wire: exact for counts."""
    return _data_parallel_all_reduce(values, torch.distributed.ReduceOp.SUM)


def _data_parallel_all_reduce(values: list[float], op) -> list[float]:
    from megatron.core import parallel_state

    tensor = torch.tensor(values, dtype=torch.float64)
    group = parallel_state.get_data_parallel_group()
    if values and torch.distributed.get_world_size(group) > 1:
        if cpu_platform.cuda_available():
            tensor = tensor.cuda()
        torch.distributed.all_reduce(tensor, op=op, group=group)
    return [float(v) for v in tensor.cpu().tolist()]


def reduce_metrics(outputs: list[dict]) -> dict[str, float]:
    """Combine per-microbatch metrics ({"metrics": {name: scalar}, "units": n}) over microbatches and
    data-parallel ranks: a mean weighted by units, or the max for names ending in `_max`. Names
    starting with `_` are private to a loss and dropped. Only the last pipeline stage has outputs;
    every stage returns its result."""
    from nemo_rlp.parallel import pipeline

    metrics = _reduce_over_data_parallel(outputs) if pipeline.is_last_stage() else None
    return pipeline.broadcast_object_from_last_stage(metrics)


def _reduce_over_data_parallel(outputs: list[dict]) -> dict[str, float]:
    names = sorted({k for o in outputs for k in o["metrics"] if not k.startswith("_")})
    mean_names = [k for k in names if not k.endswith("_max")]
    max_names = [k for k in names if k.endswith("_max")]
    weights = [float(o["units"]) for o in outputs]
    # Weighted sums and the total weight in one all-reduce; maxima in another.
    *sums, total = data_parallel_sum(
        [sum(float(o["metrics"][k]) * w for o, w in zip(outputs, weights)) for k in mean_names] + [sum(weights)]
    )
    peaks = _data_parallel_all_reduce(
        [max(float(o["metrics"][k]) for o in outputs) for k in max_names], torch.distributed.ReduceOp.MAX
    )
    out = {k: v / max(total, 1.0) for k, v in zip(mean_names, sums)}
    out.update(zip(max_names, peaks))
    return out
