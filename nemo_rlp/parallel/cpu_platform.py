"""The CPU platform: what megatron-core needs to run on a machine without CUDA.

megatron-core is written for CUDA. Its local (non-Transformer-Engine) layer specs compute fine on
CPU with gloo, but a handful of spots name the CUDA device directly. `install()` patches exactly
those spots, and only when `torch.cuda.is_available()` is False; on a GPU it does nothing.

Supports megatron-core 0.16 through 0.19 (line numbers below are 0.16.1's unless a row says
otherwise). Which patches a release needs is the table `PATCHES_BY_VERSION`, keyed by the installed
version (`nemo_rlp.megatron_version`); `install()` warns once when the version is outside the
supported range, since a moved line can make a patch stop taking effect.
`tests/unit/test_cpu_platform.py` exercises every patch through the megatron-core code it fixes, so a
patch that stops working fails a test rather than a training run.

| patch                     | megatron-core spot (0.16.1)                                     | stand-in on CPU             |
|---------------------------|-----------------------------------------------------------------|-----------------------------|
| `current_device`          | `torch.cuda.current_device()` as an allocation device, in ~150  | returns `torch.device("cpu")` |
|                           | places (utils.py:631 GlobalMemoryBuffer, attention.py:430 KV    |                             |
|                           | cache, p2p_communication.py:313/321, mamba_mixer.py:303-360 ...)|                             |
| `cuda_device_literals`    | `device="cuda"` literals: schedules.py:596/983/2138 token       | a TorchFunctionMode that    |
|                           | counters, optimizer.py:473-485 and clip_grads.py:90-207         | maps a `device="cuda"`      |
|                           | buffers, rerun_state_machine.py:261                             | keyword to CPU              |
| `causal_masks`            | transformer/utils.py:35/40 (and its import in                   | the same masks on CPU       |
|                           | fusions/fused_softmax.py:8)                                     |                             |
| `rng_tracker`             | tensor_parallel/random.py:235 `CudaRNGStatesTracker.add` and    | a tracker over the CPU      |
|                           | `fork` read and set the CUDA generator                          | generator                   |
| `synchronize`             | `torch.cuda.synchronize()` (p2p_communication.py:242/398,       | no-op                       |
|                           | dist_checkpointing/strategies/filesystem_async.py:230)          |                             |
| `events`                  | `torch.cuda.Event` (text_generation_controller.py:1163, timers) | wall-clock event            |
| `tensor_cuda_pin_memory`  | `Tensor.cuda()` (language_module.py:244), `Tensor.pin_memory()` | `.cuda()` returns the       |
|                           | (distributed/param_and_grad_buffer.py:976) and the              | tensor, `.pin_memory()` a   |
|                           | `pin_memory=True` keyword (text_generation_controller.py:115,   | copy; the keyword is        |
|                           | rope_utils.py:63, via the mode above)                           | dropped                     |
| `mamba_kernels`           | ssm/mamba_mixer.py:22 imports megatron's Triton tensor ops, and | the pure-torch kernels of   |
|                           | the mixer calls mamba-ssm / causal-conv1d kernels               | `nemo_rlp.models.mamba_cpu_kernels` (installed from here so |
|                           |                                                                 | megatron's Mamba modules import right after `install()`)   |
| `streams`                 | `torch.cuda.current_stream()` (0.19 only:                       | a stream whose waits are    |
|                           | distributed/param_and_grad_buffer.py:632 `start_grad_sync`)     | no-ops                      |
| `clip_grads`              | optimizer/clip_grads.py:167 asserts `torch.cuda.FloatTensor`    | the same clipping without   |
|                           | grads (imported by name in optimizer/optimizer.py)              | the CUDA type assertion     |

Not patched, by design: the bf16 and distributed optimizers require CUDA tensors
(optimizer/optimizer.py:695, distrib_optimizer.py:431): on CPU the training code uses fp32 Adam.
`DynamicInferenceEngine` needs flash-attn and stays GPU-only. The Mamba kernels themselves are model
code and live in `nemo_rlp.models.mamba_cpu_kernels` (their docstring lists their call sites); this
module only installs them.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import time
from typing import Any, Callable

import torch
from torch.overrides import TorchFunctionMode

log = logging.getLogger(__name__)

_installed: dict[str, bool] = {}
_device_mode: "_CudaToCpuMode | None" = None


def cuda_available() -> bool:
    """True when the CUDA platform is usable; the single place that decides which platform runs."""
    return torch.cuda.is_available()


def is_installed() -> bool:
    return bool(_installed)


def install(force: bool = False) -> bool:
    """Apply every CPU patch once. Returns True when the CPU platform is (now) active.

    Does nothing on a machine with CUDA unless `force` is set (tests use `force` only on CPU).
    Safe to call more than once.
    """
    if cuda_available() and not force:
        return False
    if _installed:
        return True
    _warn_if_unchecked_version()
    for name in patches_for():
        _PATCHES[name]()
        _installed[name] = True
    log.info("CPU platform installed: %s", ", ".join(sorted(_installed)))
    return True


def _warn_if_unchecked_version() -> None:
    from nemo_rlp.megatron_version import warn_if_unsupported

    warn_if_unsupported("the nemo_rlp CPU platform")


# --------------------------------------------------------------------------------------------
# The patches. Each is small and touches one kind of CUDA-only spot.
# --------------------------------------------------------------------------------------------


def _patch_current_device() -> None:
    # On a CPU build torch.cuda.current_device() raises; megatron uses it as "the device to
    # allocate on", which on this platform is the CPU.
    torch.cuda.current_device = lambda: torch.device("cpu")


def _is_cuda_device(device: Any) -> bool:
    if isinstance(device, str):
        return device == "cuda" or device.startswith("cuda:")
    if isinstance(device, torch.device):
        return device.type == "cuda"
    return False


class _CudaToCpuMode(TorchFunctionMode):
    """Rewrites a `device="cuda"` keyword to CPU, and drops `pin_memory=True`, on every torch call.

    Torch function modes are per thread: megatron code run from another thread is redirected only
    inside `thread_context()` (the checkpoint write, `nemo_rlp.training.checkpoint_writer`).

    megatron-core has `device="cuda"` literals inside long functions (the forward-backward
    schedules, the optimizer's bookkeeping buffers); redirecting the keyword is far smaller than
    copying those functions.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        device = kwargs.get("device")
        if device is not None and _is_cuda_device(device):
            kwargs = dict(kwargs, device="cpu")
        if kwargs.get("pin_memory"):
            # Pinned memory needs an accelerator; on CPU it is plain memory.
            kwargs = dict(kwargs, pin_memory=False)
        return func(*args, **kwargs)


def _patch_cuda_device_literals() -> None:
    global _device_mode
    # Entered for the life of the process: the mode sits at the bottom of torch's mode stack.
    _device_mode = _CudaToCpuMode()
    _device_mode.__enter__()


def thread_context() -> contextlib.AbstractContextManager:
    """Enter in a new thread that runs megatron code: the CPU platform's device mode there too (a
    no-op context where the CPU platform is not installed)."""
    return _CudaToCpuMode() if _device_mode is not None else contextlib.nullcontext()


@contextlib.contextmanager
def device_mode_suspended():
    """Run a block without the device-literal mode: every torch call inside it skips the mode's
    Python hook (~24K calls per decode step of the tiny models). Only for code known to hold no
    `device="cuda"` literal (the `rows` rollout path, `nemo_rlp.models.row_cache`); a no-op when
    the mode is not installed or is not the innermost torch function mode."""
    from torch.overrides import _get_current_function_mode_stack, _pop_mode_temporarily

    stack = _get_current_function_mode_stack() if _device_mode is not None else []
    if not stack or stack[-1] is not _device_mode:
        yield
        return
    with _pop_mode_temporarily():
        yield


def _cpu_causal_mask(sq: int) -> torch.Tensor:
    return torch.triu(torch.ones(sq, sq), diagonal=1).bool()


def _cpu_sliding_window_causal_mask(sq: int, skv: int, window_size) -> torch.Tensor:
    m = torch.ones(sq, skv, dtype=torch.bool)
    mu = torch.triu(m, diagonal=skv - sq - window_size[0])
    ml = torch.tril(mu, diagonal=skv - sq + window_size[1])
    return ~ml


def _patch_causal_masks() -> None:
    # Also caught by the device-literal mode, but these run on every attention forward, so they
    # get a direct replacement (and keep working if the mode is ever removed).
    for module_name in ("megatron.core.transformer.utils", "megatron.core.fusions.fused_softmax"):
        module = importlib.import_module(module_name)
        module.get_default_causal_mask = _cpu_causal_mask
        module.get_sliding_window_causal_mask = _cpu_sliding_window_causal_mask


def _patch_rng_tracker() -> None:
    from megatron.core.tensor_parallel import random as mcore_random

    class CPURNGStatesTracker(mcore_random.CudaRNGStatesTracker):
        """megatron's tracker with the CPU default generator standing in for the CUDA one.

        Forking sets the CPU generator to the named state, so tensor-parallel-region randomness
        (initialisation without `use_cpu_initialization`, dropout inside TP regions) differs per
        TP rank exactly as megatron intends.
        """

        def add(self, name: str, seed: int) -> None:
            if seed in self.seeds_:
                raise Exception(f"seed {seed} already exists")
            self.seeds_.add(seed)
            if name in self.states_:
                raise Exception(f"rng state {name} already exists")
            generator = torch.Generator()
            generator.manual_seed(seed)
            self.states_[name] = generator.get_state()

        @contextlib.contextmanager
        def fork(self, name: str = mcore_random._MODEL_PARALLEL_RNG_TRACKER_NAME):
            if name not in self.states_:
                raise Exception(f"rng state {name} is not added")
            outer_state = torch.get_rng_state()
            torch.set_rng_state(self.states_[name])
            try:
                yield
            finally:
                self.states_[name] = torch.get_rng_state()
                torch.set_rng_state(outer_state)

    def cpu_initialize_rng_tracker(*args: Any, force_reset: bool = False, **kwargs: Any) -> None:
        if mcore_random._CUDA_RNG_STATE_TRACKER_INITIALIZED and not force_reset:
            return
        mcore_random._CUDA_RNG_STATE_TRACKER = CPURNGStatesTracker()
        mcore_random._CUDA_RNG_STATE_TRACKER_INITIALIZED = True

    mcore_random.initialize_rng_tracker = cpu_initialize_rng_tracker
    mcore_random.CPURNGStatesTracker = CPURNGStatesTracker
    # `model_parallel_cuda_manual_seed` also calls torch.cuda.manual_seed, which a CPU build only
    # queues (lazily) and never runs: harmless, left alone.


def _patch_synchronize() -> None:
    torch.cuda.synchronize = lambda device=None: None


class _WallClockEvent:
    """A stand-in for torch.cuda.Event: CPU work is synchronous, so wall-clock time is exact."""

    def __init__(self, enable_timing: bool = False, blocking: bool = False, interprocess: bool = False):
        self._time: float | None = None

    def record(self, stream: Any = None) -> None:
        self._time = time.perf_counter()

    def synchronize(self) -> None:
        pass

    def wait(self, stream: Any = None) -> None:
        pass

    def query(self) -> bool:
        return True

    def elapsed_time(self, end: "_WallClockEvent") -> float:
        if self._time is None or end._time is None:
            raise RuntimeError("elapsed_time needs both events recorded")
        return (end._time - self._time) * 1000.0


def _patch_events() -> None:
    torch.cuda.Event = _WallClockEvent


def _identity(self: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    return self


def _copy(self: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    # pin_memory() returns a new tensor; callers may free the original (offload_to_cpu does).
    return self.clone()


def _patch_tensor_cuda_pin_memory() -> None:
    torch.Tensor.cuda = _identity
    torch.Tensor.pin_memory = _copy


def _cpu_clip_grad_by_total_norm_fp32(
    parameters, max_norm, total_norm, use_decoupled_grad: bool = False
) -> None:
    """megatron's clip_grad_by_total_norm_fp32 (clip_grads.py:137) less its CUDA type assertion."""
    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    attr = "decoupled_grad" if use_decoupled_grad else "grad"
    grads = [getattr(p, attr).detach() for p in parameters if getattr(p, attr, None) is not None]
    for grad in grads:
        if grad.dtype != torch.float32:
            raise TypeError(f"gradient clipping expects fp32 gradients, found {grad.dtype}")
    clip_coeff = max_norm / (total_norm + 1.0e-6)
    if clip_coeff < 1.0 and grads:
        torch._foreach_mul_(grads, clip_coeff)


def _patch_clip_grads() -> None:
    for module_name in ("megatron.core.optimizer.clip_grads", "megatron.core.optimizer.optimizer"):
        module = importlib.import_module(module_name)
        module.clip_grad_by_total_norm_fp32 = _cpu_clip_grad_by_total_norm_fp32


def _patch_mamba_kernels() -> None:
    from nemo_rlp.models import mamba_cpu_kernels

    mamba_cpu_kernels.install(force=True)


class _CurrentStream:
    """A stand-in for the current CUDA stream: CPU work is synchronous, so waiting is a no-op."""

    def wait_event(self, event: Any = None) -> None:
        pass

    def wait_stream(self, stream: Any = None) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def record_event(self, event: Any = None) -> _WallClockEvent:
        event = event or _WallClockEvent()
        event.record()
        return event


_CPU_STREAM = _CurrentStream()


def _patch_streams() -> None:
    # megatron-core 0.19's grad sync (distributed/param_and_grad_buffer.py:632 start_grad_sync) asks
    # for the current stream on every optimizer step, to wait for CUDA-graph gradient events.
    torch.cuda.current_stream = lambda device=None: _CPU_STREAM


_PATCHES: dict[str, Callable[[], None]] = {
    "current_device": _patch_current_device,
    "cuda_device_literals": _patch_cuda_device_literals,
    "causal_masks": _patch_causal_masks,
    "rng_tracker": _patch_rng_tracker,
    "synchronize": _patch_synchronize,
    "events": _patch_events,
    "tensor_cuda_pin_memory": _patch_tensor_cuda_pin_memory,
    "clip_grads": _patch_clip_grads,
    "mamba_kernels": _patch_mamba_kernels,
    "streams": _patch_streams,
}

# The patches each megatron-core release needs: (first version, first version not covered, names).
# A patch missing from the installed version's rows is not applied.
PATCHES_BY_VERSION = (
    ("0.16", "0.20", ("current_device", "cuda_device_literals", "causal_masks", "rng_tracker", "synchronize",
                      "events", "tensor_cuda_pin_memory", "clip_grads", "mamba_kernels")),
    ("0.19", "0.20", ("streams",)),
)


def patches_for(version: str | None = None) -> list[str]:
    """The names of the patches `install()` applies for megatron-core `version` (default: installed)."""
    from nemo_rlp.megatron_version import rows_for

    return [name for names in rows_for(PATCHES_BY_VERSION, version) for name in names]
