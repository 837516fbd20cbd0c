"""The CPU platform (nemo_rlp.parallel.cpu_platform): every patch, through the megatron-core code it fixes.

Each test below is registered with `@exercises(<patch name>)` and fails if that patch stops taking
effect (a megatron-core upgrade moved the spot, a patch was dropped, ...). Where another patch would
also cover the spot (the `device="cuda"` mode catches the causal-mask literal too), the test turns
that other patch off around the call, so it checks its own patch alone. `test_every_patch_is_exercised`
makes a new patch without a test fail.

The platform patches process-wide state and is meant to stay installed for the life of the process;
these tests install it once and never undo it. They use the one-process parallel state of
`nemo_rlp.parallel.distributed.initialize`, which is idempotent and is left initialised for later tests.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from nemo_rlp.config import ModelConfig, ParallelConfig
from nemo_rlp.parallel import cpu_platform

pytestmark = pytest.mark.skipif(
    cpu_platform.cuda_available(), reason="the CPU platform is installed only where CUDA is not available"
)

SEED = 1234
VOCAB = 128
REPO = Path(__file__).resolve().parents[2]

_EXERCISED: set[str] = set()


def exercises(patch_name: str):
    """Register a test as the one that fails when `patch_name` stops taking effect."""
    assert patch_name in cpu_platform._PATCHES, patch_name
    _EXERCISED.add(patch_name)
    return lambda test: test


@pytest.fixture(scope="module", autouse=True)
def platform():
    assert cpu_platform.install() is True
    yield


@pytest.fixture(scope="module")
def parallel(platform):
    """The one-process parallel state (torch.distributed + megatron's), left up for later tests."""
    from nemo_rlp.parallel import distributed

    # A one-process `initialize` rendezvouses on a free port it writes into os.environ
    # (MASTER_ADDR/MASTER_PORT). The group stays up, holding that port, so the variables must not
    # leak: a later `python -m nemo_rlp.train` subprocess would inherit them and fail with EADDRINUSE.
    saved = {key: os.environ.get(key) for key in ("MASTER_ADDR", "MASTER_PORT")}
    try:
        return distributed.initialize(ParallelConfig(), SEED)
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture
def reseed_tracker():
    """Tests that reseed megatron's RNG tracker leave it as `distributed.initialize` does."""
    yield
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    if parallel_state.model_parallel_is_initialized():
        model_parallel_cuda_manual_seed(SEED)


@contextlib.contextmanager
def device_mode_off():
    """Turn off every TorchFunctionMode (the `cuda_device_literals` patch) around a block."""
    with torch._C.DisableTorchFunction():
        yield


def tiny_gpt(parallel):
    from nemo_rlp.models import build_model

    torch.manual_seed(SEED)
    cfg = ModelConfig(
        num_layers=2, hidden_size=32, ffn_hidden_size=64, num_attention_heads=4, max_sequence_length=64
    )
    return build_model(cfg, VOCAB, tensor_parallel=1, device=parallel.device)


def tokens(batch: int = 2, length: int = 12, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def test_device_mode_off_really_turns_the_mode_off():
    # The isolating helper must work, or the tests using it would pass through the mode.
    assert torch.zeros(1, device="cuda").device.type == "cpu"
    with device_mode_off(), pytest.raises((AssertionError, RuntimeError)):
        torch.zeros(1, device="cuda")


# --------------------------------------------------------------------------------------------------
# One test per patch
# --------------------------------------------------------------------------------------------------


@exercises("current_device")
def test_current_device_global_memory_buffer_allocates_on_cpu():
    from megatron.core.utils import GlobalMemoryBuffer

    assert torch.cuda.current_device() == torch.device("cpu")
    buffer = GlobalMemoryBuffer()
    with device_mode_off():  # utils.py:631 passes device=torch.cuda.current_device(), no literal
        first = buffer.get_tensor((4, 8), torch.float32, "test")
        again = buffer.get_tensor((2, 8), torch.float32, "test")
    assert first.device.type == "cpu" and first.shape == (4, 8)
    assert again.data_ptr() == first.data_ptr()  # the buffer is reused, not reallocated


@exercises("current_device")
def test_current_device_gpu_style_init_of_a_tp_layer(parallel):
    # use_cpu_initialization=False allocates the weight on torch.cuda.current_device()
    # (tensor_parallel/layers.py) and draws it inside the tracker's fork.
    from megatron.core.tensor_parallel import ColumnParallelLinear
    from megatron.core.transformer.transformer_config import TransformerConfig

    config = TransformerConfig(
        num_layers=1, hidden_size=16, num_attention_heads=2, use_cpu_initialization=False
    )
    with device_mode_off():
        layer = ColumnParallelLinear(16, 32, config=config, init_method=config.init_method, bias=False)
    assert layer.weight.device.type == "cpu" and layer.weight.abs().sum() > 0


@exercises("cuda_device_literals")
def test_cuda_device_literals_forward_backward_schedule_runs(parallel):
    # schedules.py:596: total_num_tokens = torch.zeros([], dtype=torch.int, device="cuda")
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from nemo_rlp.models.handle import ModelHandle

    model = tiny_gpt(parallel).eval()
    batch = tokens(2, 13)

    def forward_step(data_iterator, module):
        data = next(data_iterator)
        inputs, labels = data[:, :-1], data[:, 1:]
        positions = torch.arange(inputs.shape[1]).unsqueeze(0).expand_as(inputs)
        per_token = module(inputs, positions, None, labels=labels)

        def loss_func(output):
            loss = output.float().mean()
            return loss, {"loss": loss.detach()}

        return per_token, loss_func

    forward_backward = get_forward_backward_func()
    with torch.no_grad():
        out = forward_backward(
            forward_step_func=forward_step,
            data_iterator=iter([batch]),
            model=[model],
            num_microbatches=1,
            seq_length=12,
            micro_batch_size=2,
            forward_only=True,
        )
        expected = -ModelHandle(model).token_logprobs(batch).mean()
    assert len(out) == 1
    torch.testing.assert_close(out[0]["loss"], expected, atol=1e-5, rtol=0)


@exercises("cuda_device_literals")
def test_cuda_device_literals_are_mapped_to_cpu_and_nothing_else_changes():
    for device in ("cuda", "cuda:0", "cuda:1", torch.device("cuda"), torch.device("cuda", 0)):
        assert torch.zeros(2, device=device).device.type == "cpu", device
        assert torch.ones(2).to(device=device).device.type == "cpu", device
    assert torch.empty(2, device="meta").device.type == "meta"
    assert torch.full((2,), 3, dtype=torch.int32, device="cuda").dtype == torch.int32
    assert torch.arange(3, device="cuda").tolist() == [0, 1, 2]


@exercises("causal_masks")
def test_causal_masks_on_cpu_in_both_modules():
    from megatron.core.fusions import fused_softmax
    from megatron.core.transformer import utils

    expected = torch.triu(torch.ones(5, 5, dtype=torch.bool), diagonal=1)
    with device_mode_off():
        for module in (utils, fused_softmax):
            mask = module.get_default_causal_mask(5)
            assert mask.device.type == "cpu" and mask.dtype == torch.bool
            assert torch.equal(mask, expected), module.__name__
            window = module.get_sliding_window_causal_mask(4, 6, (2, 0))
            assert window.device.type == "cpu" and window.shape == (4, 6)
            # Query i (absolute position i + 2) sees keys i..i+2: the last 3 including itself.
            for i in range(4):
                assert window[i].logical_not().nonzero().flatten().tolist() == [i, i + 1, i + 2]


@exercises("causal_masks")
def test_causal_masks_fused_scale_mask_softmax_causal_forward():
    from megatron.core.fusions.fused_softmax import FusedScaleMaskSoftmax
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.utils import attention_mask_func

    softmax = FusedScaleMaskSoftmax(
        input_in_fp16=False,
        input_in_bf16=False,
        attn_mask_type=AttnMaskType.causal,
        scaled_masked_softmax_fusion=False,
        mask_func=attention_mask_func,
        softmax_in_fp32=True,
        scale=0.5,
    )
    scores = torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(0))
    with device_mode_off():
        probs = softmax(scores, None)
    future = torch.triu(torch.ones(6, 6, dtype=torch.bool), diagonal=1)
    assert probs[..., future].abs().max() < 1e-6
    torch.testing.assert_close(probs.sum(-1), torch.ones(2, 3, 6))
    reference = torch.softmax((0.5 * scores).masked_fill(future, float("-inf")), dim=-1)
    torch.testing.assert_close(probs, reference)


@exercises("rng_tracker")
def test_rng_tracker_forks_are_reproducible_named_and_restore_the_outer_state(reseed_tracker):
    from megatron.core.tensor_parallel.random import (
        get_cuda_rng_tracker,
        get_data_parallel_rng_tracker_name,
        model_parallel_cuda_manual_seed,
    )

    def draws(
        seed: int, name: str = "model-parallel-rng", tp_rank: int = 0, n: int = 2
    ) -> list[torch.Tensor]:
        model_parallel_cuda_manual_seed(seed, tp_rank=tp_rank, ep_rank=0, etp_rank=0)
        tracker = get_cuda_rng_tracker()
        out = []
        for _ in range(n):
            with tracker.fork(name):
                out.append(torch.rand(4))
        return out

    torch.manual_seed(99)
    outer = torch.get_rng_state()
    first = draws(7)
    assert torch.equal(torch.get_rng_state(), outer)  # forking leaves the default CPU stream alone
    assert torch.equal(torch.rand(3), torch.rand(3, generator=torch.Generator().manual_seed(99)))

    again = draws(7)
    assert all(torch.equal(a, b) for a, b in zip(first, again))  # same seed: same draws
    assert not torch.equal(first[0], first[1])  # a fork continues its own stream
    assert not torch.equal(draws(8)[0], first[0])  # another seed: other draws
    data_parallel_name = get_data_parallel_rng_tracker_name()
    assert not torch.equal(draws(7, data_parallel_name)[0], first[0])  # another name: other draws
    # Megatron's intent: the TP stream differs per TP rank, the data-parallel one does not.
    assert not torch.equal(draws(7, tp_rank=1)[0], first[0])
    assert torch.equal(draws(7, data_parallel_name, tp_rank=1)[0], draws(7, data_parallel_name)[0])


@exercises("rng_tracker")
def test_rng_tracker_drives_megatron_gpu_style_initialisation(parallel, reseed_tracker):
    # _initialize_affine_weight_gpu draws inside get_cuda_rng_tracker().fork(): the weights follow
    # megatron's seed, not the default CPU stream.
    from megatron.core.tensor_parallel import ColumnParallelLinear
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed
    from megatron.core.transformer.transformer_config import TransformerConfig

    config = TransformerConfig(
        num_layers=1, hidden_size=16, num_attention_heads=2, use_cpu_initialization=False
    )

    def weight(megatron_seed: int, torch_seed: int) -> torch.Tensor:
        model_parallel_cuda_manual_seed(megatron_seed)
        torch.manual_seed(torch_seed)
        return ColumnParallelLinear(
            16, 32, config=config, init_method=config.init_method, bias=False
        ).weight.detach()

    assert torch.equal(weight(5, 0), weight(5, 1))
    assert not torch.equal(weight(5, 0), weight(6, 0))


@exercises("synchronize")
def test_synchronize_is_a_no_op_and_megatron_timers_run():
    from megatron.core.timers import Timers

    assert torch.cuda.synchronize() is None
    assert torch.cuda.synchronize(0) is None
    timers = Timers(log_level=2, log_option="minmax")
    timer = timers("step", log_level=0)
    timer.start()  # timers.py:152 torch.cuda.synchronize()
    time.sleep(0.01)
    timer.stop()  # timers.py:165
    assert 0.005 < timer.elapsed() < 5.0


@exercises("events")
def test_events_measure_elapsed_milliseconds():
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    with pytest.raises(RuntimeError):
        start.elapsed_time(end)
    start.record()
    time.sleep(0.02)
    end.record()
    end.synchronize()
    end.wait()
    assert end.query()
    assert 15.0 < start.elapsed_time(end) < 5000.0


@exercises("tensor_cuda_pin_memory")
def test_tensor_cuda_is_identity_and_pin_memory_copies():
    t = torch.arange(4.0)
    assert t.cuda() is t
    assert t.cuda(0, non_blocking=True) is t
    # pin_memory() returns a new tensor, as torch's does: a caller may free the original.
    pinned = t.pin_memory()
    assert pinned is not t and torch.equal(pinned, t) and pinned.data_ptr() != t.data_ptr()
    # The pin_memory=True keyword (text_generation_controller.py:115) is dropped by the mode.
    assert torch.equal(torch.empty_like(t, pin_memory=True).fill_(1.0), torch.ones(4))


@exercises("tensor_cuda_pin_memory")
def test_tensor_cuda_in_shared_embedding_setup(parallel, monkeypatch):
    # language_module.py:244: with torch.distributed up and pipeline parallelism, the first stage
    # moves the shared embedding with `weight.data.cuda()` before all-reducing it over the embedding
    # group. PP=1 returns before that line, so the config claims PP=2 for this one call (a single
    # process is both the first and the last stage; the all-reduce is over itself).
    model = tiny_gpt(parallel)
    weight = model.shared_embedding_or_output_weight()
    before = weight.detach().clone()
    assert torch.distributed.is_initialized() and model._is_in_embd_group()
    monkeypatch.setattr(model.config, "pipeline_model_parallel_size", 2)
    model.setup_embeddings_and_output_layer()
    assert weight.device.type == "cpu"
    assert torch.equal(weight.detach(), before)


def _sgd_step_with_clip(parallel, clip_grad: float, loss_scale: float) -> tuple[float, float, float]:
    """One megatron SGD step (lr 1) over megatron DDP; returns (reported norm, true norm, step norm)."""
    from megatron.core.distributed import (
        DistributedDataParallel,
        DistributedDataParallelConfig,
        finalize_model_grads,
    )
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    from nemo_rlp.models.handle import ModelHandle

    model = tiny_gpt(parallel)
    ddp = DistributedDataParallel(
        model.config,
        DistributedDataParallelConfig(
            grad_reduce_in_fp32=True, overlap_grad_reduce=False, use_distributed_optimizer=False
        ),
        model,
    )
    optimizer = get_megatron_optimizer(
        OptimizerConfig(
            optimizer="sgd",
            lr=1.0,
            sgd_momentum=0.0,
            weight_decay=0.0,
            clip_grad=clip_grad,
            bf16=False,
            use_distributed_optimizer=False,
        ),
        [ddp],
    )
    ddp.zero_grad_buffer()
    optimizer.zero_grad()
    (loss_scale * -ModelHandle(ddp).token_logprobs(tokens(2, 12)).mean()).backward()
    finalize_model_grads([ddp])
    true_norm = torch.sqrt(sum(p.main_grad.float().pow(2).sum() for p in model.parameters())).item()
    before = [p.detach().clone() for p in model.parameters()]
    updated, grad_norm, _ = optimizer.step()
    assert updated
    step = torch.sqrt(sum((b - p.detach()).pow(2).sum() for b, p in zip(before, model.parameters()))).item()
    return float(grad_norm), true_norm, step


@exercises("clip_grads")
def test_clip_grads_megatron_optimizer_step_clips(parallel):
    # optimizer.py calls clip_grad_by_total_norm_fp32 (clip_grads.py:167 asserts CUDA grads).
    grad_norm, true_norm, step = _sgd_step_with_clip(parallel, clip_grad=0.05, loss_scale=10.0)
    assert grad_norm == pytest.approx(true_norm, rel=1e-4)
    assert grad_norm > 0.05
    assert step == pytest.approx(0.05, rel=1e-3)  # SGD with lr 1 moves by the clipped gradient


@exercises("clip_grads")
def test_clip_grads_leaves_a_small_gradient_alone(parallel):
    grad_norm, true_norm, step = _sgd_step_with_clip(parallel, clip_grad=1.0e6, loss_scale=1.0)
    assert grad_norm == pytest.approx(true_norm, rel=1e-4)
    assert step == pytest.approx(grad_norm, rel=1e-3)


@exercises("streams")
def test_streams_megatron_grad_sync_runs_where_the_version_needs_it(parallel):
    # megatron-core 0.19's DDP grad sync asks for torch.cuda.current_stream() (param_and_grad_buffer.py:632):
    # the patch is applied on the versions whose row (PATCHES_BY_VERSION) names it, and only there.
    if "streams" not in cpu_platform.patches_for():
        assert not cpu_platform._installed.get("streams")
        return
    assert torch.cuda.current_stream() is cpu_platform._CPU_STREAM
    grad_norm, true_norm, _ = _sgd_step_with_clip(parallel, clip_grad=1.0e6, loss_scale=1.0)
    assert grad_norm == pytest.approx(true_norm, rel=1e-4)


def test_every_version_row_names_known_patches():
    for _, _, names in cpu_platform.PATCHES_BY_VERSION:
        assert set(names) <= set(cpu_platform._PATCHES)
    assert set(cpu_platform.patches_for()) == set(cpu_platform._installed)


# --------------------------------------------------------------------------------------------------
# install() itself
# --------------------------------------------------------------------------------------------------


def _device_modes() -> list:
    from torch.overrides import _get_current_function_mode_stack

    return [m for m in _get_current_function_mode_stack() if isinstance(m, cpu_platform._CudaToCpuMode)]


def test_install_is_idempotent():
    patched = (torch.cuda.current_device, torch.cuda.synchronize, torch.cuda.Event, torch.Tensor.cuda)
    assert len(_device_modes()) == 1
    assert cpu_platform.install() is True
    assert cpu_platform.install() is True
    assert (torch.cuda.current_device, torch.cuda.synchronize, torch.cuda.Event, torch.Tensor.cuda) == patched
    assert len(_device_modes()) == 1  # the mode was not entered a second time
    assert cpu_platform.is_installed()


def test_install_does_nothing_when_cuda_is_available():
    # In a fresh interpreter, so that nothing here is already patched.
    script = textwrap.dedent(
        """
        import sys, torch
        from torch.overrides import _get_current_function_mode_stack
        from nemo_rlp.parallel import cpu_platform

        cpu_platform.cuda_available = lambda: True
        names = ("current_device", "synchronize", "Event")
        before = [getattr(torch.cuda, n) for n in names] + [torch.Tensor.cuda, torch.Tensor.pin_memory]
        assert cpu_platform.install() is False
        after = [getattr(torch.cuda, n) for n in names] + [torch.Tensor.cuda, torch.Tensor.pin_memory]
        assert all(a is b for a, b in zip(before, after)), "torch was patched"
        assert not _get_current_function_mode_stack(), "a TorchFunctionMode was entered"
        assert not cpu_platform.is_installed()
        loaded = sorted(m for m in sys.modules if m.startswith("megatron"))
        assert not loaded, f"megatron modules were imported (and maybe patched): {loaded}"
        print("unchanged")
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "unchanged"


def test_docstring_table_names_every_patch():
    rows = re.findall(r"^\| `(\w+)`", cpu_platform.__doc__, flags=re.MULTILINE)
    assert sorted(rows) == sorted(cpu_platform._PATCHES)


def test_installed_megatron_core_is_a_supported_and_tested_release():
    # Fails on a megatron-core upgrade: run the suite on it, re-check the version tables
    # (nemo_rlp.megatron_version explains them), then list it in TESTED (and widen SUPPORTED).
    from nemo_rlp import megatron_version

    installed = importlib.metadata.version("megatron-core")
    assert megatron_version.installed_version() == installed
    assert megatron_version.is_supported(), (installed, megatron_version.SUPPORTED)
    release = megatron_version._release(installed).base_version  # a container's 0.18.0+nv is 0.18.0
    assert release in megatron_version.TESTED, (installed, megatron_version.TESTED)
    pyproject = (REPO / "pyproject.toml").read_text()
    low, end = megatron_version.SUPPORTED
    assert f'"megatron-core>={low},<{end}"' in pyproject


def test_version_tables_cover_every_supported_release_once():
    """Each version-keyed table answers exactly one row for every release in the supported range."""
    from nemo_rlp import megatron_version
    from nemo_rlp.models import cache_ops, mamba_cpu_kernels
    from nemo_rlp.models.hybrid import mixer_fixes, provider
    from nemo_rlp.training import packing

    tables = {
        "mamba_cpu_kernels.STAND_INS_BY_VERSION": mamba_cpu_kernels.STAND_INS_BY_VERSION,
        "cache_ops.INFERENCE_MODE_BY_VERSION": cache_ops.INFERENCE_MODE_BY_VERSION,
        "provider.HYBRID_API_BY_VERSION": provider.HYBRID_API_BY_VERSION,
        "provider.CONV1D_NAMES_BY_VERSION": provider.CONV1D_NAMES_BY_VERSION,
        "mixer_fixes.STATIC_DECODE_BATCH_FIRST_BY_VERSION": mixer_fixes.STATIC_DECODE_BATCH_FIRST_BY_VERSION,
        "cpu_platform.PATCHES_BY_VERSION (all versions)": cpu_platform.PATCHES_BY_VERSION[:1],
        "packing.PACKED_TOTAL_TOKENS_BY_VERSION": packing.PACKED_TOTAL_TOKENS_BY_VERSION,
    }
    releases = ["0.16.0", "0.16.1", "0.17.0", "0.18.0", "0.18.1", "0.19.0", "0.19.2", "0.19.5rc1"]
    for name, table in tables.items():
        for release in releases:
            assert megatron_version.is_supported(release)
            assert len(megatron_version.rows_for(table, release)) == 1, (name, release)
    assert not megatron_version.is_supported("0.15.3") and not megatron_version.is_supported("0.20.0")


def test_an_unsupported_version_warns(monkeypatch):
    from nemo_rlp import megatron_version

    monkeypatch.setattr(megatron_version, "SUPPORTED", ("0.0", "0.1"))
    with pytest.warns(UserWarning, match=r"supports megatron-core >= 0\.0, < 0\.1"):
        cpu_platform._warn_if_unchecked_version()


def test_every_patch_is_exercised():
    assert _EXERCISED == set(cpu_platform._PATCHES)


@exercises("mamba_kernels")
def test_megatron_mamba_mixer_imports_and_uses_the_cpu_kernels():
    # Without the stand-ins, importing the mixer fails on `import triton` (mamba_mixer.py:22).
    from megatron.core.ssm import mamba_mixer

    from nemo_rlp.models import mamba_cpu_kernels

    assert mamba_mixer.mamba_chunk_scan_combined is mamba_cpu_kernels.mamba_chunk_scan_combined
    assert mamba_mixer.causal_conv1d_fn is mamba_cpu_kernels.causal_conv1d_fn
