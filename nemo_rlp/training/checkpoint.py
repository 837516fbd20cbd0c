"""Checkpoints: save, find the latest complete one, load (into the same or another TP/PP layout),
keep the last k. Written through megatron-core's `dist_checkpointing`.

A checkpoint directory (`checkpoint.dir`) holds one directory per saved step:

    step_0000040/                 complete: renamed into place after everything below was written
        dist/                     megatron-core dist_checkpointing (torch_dist): the sharded
                                  tensors of `PolicyWithTeacher.sharded_state_dict()`: the policy,
                                  the EMA teacher in fp32 (keys prefixed `ema_teacher.`), the
                                  optimizer (Adam moments and step); and in its common part the
                                  `state_dict()` of each Stateful component, under its key:
                                  `scheduler` (the learning-rate schedule), `ema` (the EMA
                                  teacher's counters), `trainer` (step, skips, summary)
        rank_state/rank00000.pt   one per rank (torch.save): the rank's Stateful components by
                                  key (`ntp_batches`, `context_sampler`: data-iterator states;
                                  `generator`: the rollout generator) and `rng`: torch / numpy /
                                  python / megatron-tracker RNG states
        config.json               the resolved config that saved it
        manifest.json             the size of every file above, and a checksum of the small ones
                                  (nemo_rlp.training.checkpoint_integrity)
        complete.json             the completion marker, written last: step, layout, ranks
    step_0000050.tmp/             a save in progress, or one a crash interrupted: never read

Atomicity. Every save writes `step_XXXXXXX.tmp/` and renames it to `step_XXXXXXX/` only after all
ranks have finished writing and `complete.json` is on disk (rename is atomic on POSIX file systems).
A checkpoint is picked for resume only if its name has no suffix *and* its `complete.json` names its
step: a crash at any moment leaves at worst a `.tmp` directory, which the next save deletes.

Sharded tensors are saved with their global shapes and offsets, so a checkpoint saved under one
TP x PP layout loads into another (megatron-core reshards on load). The per-rank state follows the
data-parallel rank: in the same layout each rank reads its own file; in another layout with the same
data-parallel size each rank reads the file of the first tensor/pipeline rank of its data-parallel
rank (data iterators and the rollout generator are identical across a replica's ranks). When the
data-parallel size changes, the data streams cannot continue where they were: they restart from
seeds derived from the step, with a warning.

`resume: auto` picks the newest checkpoint of `checkpoint.dir` that passes its integrity check
against the manifest (`checkpoint_integrity.newest_loadable`): a damaged newer one is renamed
`.damaged` with a loud warning, and the previous one is used. `resume: PATH` starts from PATH when it
is one checkpoint (a step directory, or a copy of one under any name, e.g. `warmup_end/`: its step is
the one its `complete.json` names) or this run's own checkpoint directory; PATH a directory of
*another* run's checkpoints is where a new run starts, so a requeued run (same command) continues from
its own checkpoints instead. Starting from a checkpoint older than this run's newest (or
`resume: never` in a directory with checkpoints) starts another history: the newer checkpoints are
moved to `superseded-<time>/` under the checkpoint directory, out of every later resume's way.

Keep-last-k (`checkpoint.keep_last`) deletes old `step_XXXXXXX` directories only, never those of
`checkpoint.keep_steps` (saved at those steps whatever `every_steps` says; by default the end of the
NTP warm-up, where a baseline branches off) nor a checkpoint copied under another name.

One run, one directory. So that rerunning the same command finds its checkpoints *and* its history
(`metrics.jsonl`, the report), the default output directory does not depend on the Hydra run
directory (which changes per invocation): it is `logging.output_dir` when set, and otherwise
`outputs/<model.name>-<hash>` under the launch directory (`default_output_dir`), the hash over the
resolved config less the keys that may change between invocations of one run (`VOLATILE_KEYS`).
Checkpoints go to `<output directory>/checkpoints` unless `checkpoint.dir` says otherwise.

Async save (`checkpoint.async_save`): the tensors are written by megatron-core's async machinery in
a forked process while training continues; the marker and the rename run when every rank's write has
finished (checked at each step boundary, and waited for before the next save and at the end).

Bounded writes. No save can hang training: a synchronous write runs under
`checkpoint_writer.run_bounded` (a writer process that dies fails the save at once, and
`checkpoint.save_timeout_s` bounds the rest), and waiting for an async write gives up at the same
deadline. A failed save raises `CheckpointWriteError` naming the cause, removes its `.tmp`
directory, and leaves the previous complete checkpoint the one a resume picks.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
import time
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import numpy as np
import torch

from nemo_rlp.config import ConfigError, RunConfig, as_dict
from nemo_rlp.parallel.distributed import ParallelLayout
from nemo_rlp.run_dirs import VOLATILE_KEYS, _without, checkpoint_dir, default_output_dir, run_id  # noqa: F401
from nemo_rlp.training import checkpoint_integrity as integrity
from nemo_rlp.training.checkpoint_writer import (
    CheckpointWriteError,
    child_pids,
    children_die_with_me,
    describe_failure,
    kill_children,
    run_bounded,
    start_results_queue,
)

if TYPE_CHECKING:
    from torch.distributed.checkpoint.stateful import Stateful

log = logging.getLogger("nemo_rlp")

MARKER = "complete.json"
CONFIG_FILE = "config.json"
DIST_DIR = "dist"
RANK_DIR = "rank_state"
TMP_SUFFIX = ".tmp"
FORMAT_VERSION = 1
_STEP_DIR = re.compile(r"^step_(\d{7,})$")


# ------------------------------------------------------------------------------------------------
# Names and discovery
# ------------------------------------------------------------------------------------------------


def step_dir_name(step: int) -> str:
    return f"step_{step:07d}"


def marker_step(path: Path) -> Optional[int]:
    """The step that the marker of the complete checkpoint at `path` names, whatever the directory
    is called (a copy renamed `warmup_end/` is still the checkpoint of its step); None without a
    readable marker, or when a `step_XXXXXXX` name and its marker disagree."""
    path = Path(path)
    if not path.is_dir():
        return None
    try:
        marker = json.loads((path / MARKER).read_text())
    except (OSError, ValueError):
        return None
    step = marker.get("step") if isinstance(marker, dict) else None
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        return None
    match = _STEP_DIR.match(path.name)
    return step if match is None or int(match[1]) == step else None


def checkpoint_step(path: Path) -> Optional[int]:
    """The step of a *complete* checkpoint directory named `step_XXXXXXX`, else None (a `.tmp`, a
    directory without its marker, a marker that does not name this step, or another name: the
    directories a checkpoint folder's listing and keep-last-k consider)."""
    return marker_step(path) if _STEP_DIR.match(Path(path).name) else None


def is_one_checkpoint(path: Path) -> bool:
    """Whether `path` is meant as one checkpoint (complete or not) rather than a folder of them: a
    `step_XXXXXXX` name, a completion marker, or the `dist/` tensors. A folder of checkpoints has
    none of them at its top."""
    path = Path(path)
    return bool(_STEP_DIR.match(path.name)) or (path / MARKER).exists() or (path / DIST_DIR).is_dir()


def complete_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """(step, path) of every complete checkpoint directly under `root`, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(checkpoint_step(p), p) for p in root.iterdir()]
    return sorted((s, p) for s, p in found if s is not None)


def find_latest(root: Path) -> Optional[Path]:
    """The latest complete checkpoint under `root`, or None."""
    found = complete_checkpoints(root)
    return found[-1][1] if found else None


def resolve_checkpoint(path: Path) -> Path:
    """`path` itself if it is a complete checkpoint (whatever its name), else the latest complete
    one in it."""
    path = Path(path)
    if marker_step(path) is not None:
        return path
    latest = find_latest(path)
    if latest is None:
        raise ConfigError(
            f"checkpoint.resume={str(path)!r} is not allowed: it is neither a complete checkpoint (a "
            f"directory with {MARKER}, e.g. step_XXXXXXX) nor a directory holding step_XXXXXXX checkpoints"
        )
    return latest


def keep_last(root: Path, k: int, keep_steps: Iterable[int] = ()) -> list[Path]:
    """Delete all but the newest `k` complete checkpoints under `root`, never those of `keep_steps`
    (`checkpoint.keep_steps`: neither deleted nor counted among the `k`); returns those deleted.
    Only `step_XXXXXXX` directories are considered: a checkpoint copied under another name stays."""
    keep = set(keep_steps)
    prunable = [p for s, p in complete_checkpoints(root) if s not in keep]
    doomed = prunable[:-k] if k > 0 else []
    for path in doomed:
        _remove_tree(path)
    return doomed


def _remove_tree(path: Path) -> None:
    """Delete a checkpoint directory, first renaming it to `.tmp` so that a crash half-way through
    the deletion never leaves a partial directory that looks complete."""
    path = Path(path)
    if not path.name.endswith(TMP_SUFFIX):
        doomed = path.with_name(path.name + ".deleting" + TMP_SUFFIX)
        os.replace(path, doomed)
        path = doomed
    shutil.rmtree(path, ignore_errors=True)


def config_differences(saved: dict, current: dict, limit: int = 12) -> list[str]:
    """'key: saved -> current' for the non-volatile keys that differ."""
    out: list[str] = []

    def walk(a: Any, b: Any, prefix: str) -> None:
        if isinstance(a, dict) and isinstance(b, dict):
            for key in sorted(set(a) | set(b)):
                walk(a.get(key, "<absent>"), b.get(key, "<absent>"), f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix[:-1]}: {a!r} -> {b!r}")

    walk(_without(saved, VOLATILE_KEYS), _without(current, VOLATILE_KEYS), "")
    return out[:limit] + ([f"... and {len(out) - limit} more"] if len(out) > limit else [])


# What a checkpoint's shapes depend on: a difference here explains a load that fails.
SHAPE_KEYS = ("model.", "data.tokenizer", "parallel.")


def load_error(path: Path, error: BaseException, cfg: RunConfig) -> ConfigError:
    """The error for a checkpoint that passed its integrity check but did not load into this model:
    names the config keys that differ from the ones it was saved with, when it can."""
    try:
        saved = json.loads((Path(path) / CONFIG_FILE).read_text())
    except (OSError, ValueError):
        saved = None
    detail = f"{type(error).__name__}: {str(error).strip()[:300]}"
    if saved is None:
        return ConfigError(f"checkpoint {path} does not fit this model ({detail}); it has no readable {CONFIG_FILE} "
                           "to compare with. Resume with the model config it was saved with, or set "
                           "checkpoint.resume=never or another checkpoint.dir")
    differing = [d for d in config_differences(saved, as_dict(cfg), limit=100) if d.startswith(SHAPE_KEYS)]
    if differing:
        return ConfigError(
            f"checkpoint {path} does not fit this model: it was saved with {'; '.join(differing[:8])} (saved -> "
            "now). Resume with the values it was saved with, or start this model elsewhere (another "
            "logging.output_dir or checkpoint.dir)"
        )
    return ConfigError(f"checkpoint {path} passed its integrity check and was saved with this model config, but "
                       f"did not load ({detail}); pick an older checkpoint with checkpoint.resume=<its step directory>")


# ------------------------------------------------------------------------------------------------
# RNG states
# ------------------------------------------------------------------------------------------------


def rng_state() -> dict[str, Any]:
    """Every global RNG a step may draw from, on this rank."""
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    state = {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
        "tracker": {k: v.clone() for k, v in get_cuda_rng_tracker().get_states().items()},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any], tracker: bool = True) -> None:
    """Restore `rng_state()`; `tracker=False` keeps the model-parallel tracker (layout-specific)."""
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if tracker and state.get("tracker"):
        get_cuda_rng_tracker().set_states({k: v.clone() for k, v in state["tracker"].items()})
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


class GeneratorState:
    """A `torch.Generator` as a Stateful component: its state is `get_state()`'s byte tensor."""

    def __init__(self, generator: torch.Generator):
        self.generator = generator

    def state_dict(self) -> torch.Tensor:
        return self.generator.get_state()

    def load_state_dict(self, state: torch.Tensor) -> None:
        self.generator.set_state(state)


# ------------------------------------------------------------------------------------------------
# Saving and loading
# ------------------------------------------------------------------------------------------------


def _rank_coordinates(layout: ParallelLayout) -> dict[str, int]:
    from megatron.core import parallel_state

    return {
        "rank": layout.rank,
        "dp_rank": parallel_state.get_data_parallel_rank(),
        "tp_rank": parallel_state.get_tensor_model_parallel_rank(),
        "pp_rank": parallel_state.get_pipeline_model_parallel_rank(),
    }


def _layout_dict(layout: ParallelLayout) -> dict[str, int]:
    return {
        "world_size": layout.world_size,
        "tensor_parallel": layout.tensor_parallel,
        "pipeline_parallel": layout.pipeline_parallel,
        "data_parallel": layout.data_parallel,
    }


def _barrier() -> None:
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        torch.distributed.barrier()


def _broadcast(value: Any) -> Any:
    """Rank 0's `value` on every rank."""
    if not (torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1):
        return value
    holder = [value]
    torch.distributed.broadcast_object_list(holder, src=0)
    return holder[0]


def _any_rank(flag: bool) -> bool:
    """Whether `flag` holds on any rank (the same answer on every rank)."""
    if not (torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1):
        return flag
    value = torch.tensor([int(flag)], dtype=torch.int32)
    if torch.cuda.is_available():
        value = value.cuda()
    torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MAX)
    return bool(value.item())


def _gather(value: Any) -> list[Any]:
    if not (torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1):
        return [value]
    out: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(out, value)
    return out


def _write_json(path: Path, value: Any) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(value, f, indent=2, default=str)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class Checkpointer:
    """Saves and loads the checkpoints of one run in `directory` (all ranks call every method)."""

    def __init__(self, cfg: RunConfig, layout: ParallelLayout, directory: Path):
        self.cfg = cfg
        self.layout = layout
        self.directory = Path(directory)
        self.last_saved_step: Optional[int] = None
        self.async_save = cfg.checkpoint.async_save
        self._async_queue = None
        self._async_writers: set[int] = set()
        self._async_tmp: Optional[Path] = None
        # megatron-core's torch_dist writer hands its results back through a helper process that it
        # starts at the first save. Started now, with the preemption signals ignored, it inherits
        # SIG_IGN and survives the SIGTERM that Slurm sends to every process of the job step; started
        # by `start_results_queue`, it dies with this process (checkpoint_writer's docstring).
        from nemo_rlp.training.preemption import signals_ignored

        with signals_ignored(cfg.checkpoint.signals):
            if not start_results_queue():
                log.warning("megatron-core's checkpoint writer changed (no _get_write_results_queue): a preemption "
                            "signal sent to every process may kill its helper before the preemption save")

    # --------------------------------------------------------------------------------------------
    # Which checkpoint to start from
    # --------------------------------------------------------------------------------------------

    def resume_path(self) -> Optional[Path]:
        """The checkpoint this run starts from, by `checkpoint.resume` (rank 0 decides; module docstring)."""
        path = self._choose_resume() if self.layout.is_main else None
        path = _broadcast(None if path is None else str(path))
        return None if path is None else Path(path)

    def _choose_resume(self) -> Optional[Path]:
        resume = self.cfg.checkpoint.resume
        if resume == "never":
            self._supersede_after(-1, "checkpoint.resume=never")
            return None
        if resume == "auto":
            return integrity.newest_loadable(self.directory)
        requested = Path(resume).absolute()
        if is_one_checkpoint(requested):  # one checkpoint, whatever its name: honoured as it is
            found = integrity.problem(requested)
            if found:
                raise ConfigError(
                    f"checkpoint.resume={resume!r} cannot be resumed from: {found}. Pick another checkpoint "
                    f"(checkpoint.resume=<its directory>) or checkpoint.resume=auto for the newest that loads"
                )
            if requested.parent.resolve() == self.directory.resolve():
                # The step is the marker's (checked by `problem`), not the name's: a renamed copy too.
                self._supersede_after(marker_step(requested), f"checkpoint.resume={resume}")
            return requested
        own = integrity.newest_loadable(self.directory)
        if own is not None and requested.resolve() != self.directory.resolve():
            log.info("checkpoint.resume=%s names where this run started; it has checkpoints of its own since "
                     "(a requeue), continuing from %s", resume, own)
            return own
        if own is not None:
            return own
        # Another run's directory: skip its damaged checkpoints, but leave them where they are.
        found = integrity.newest_loadable(requested, set_aside_damaged=False)
        return found if found is not None else resolve_checkpoint(requested)

    def _supersede_after(self, step: int, why: str) -> None:
        """Move this run's checkpoints newer than `step` out of the way: they belong to a history
        that this invocation abandons (a later `resume=auto` must not pick them)."""
        newer = [p for s, p in integrity.step_directories(self.directory) if s > step]
        if not newer:
            return
        aside = self.directory / f"superseded-{time.strftime('%Y%m%d-%H%M%S')}"
        aside.mkdir(parents=True, exist_ok=True)
        for path in newer:
            os.replace(path, aside / path.name)
        log.warning("%s: starting another history; moved the newer checkpoints %s to %s (delete them when no "
                    "longer needed)", why, ", ".join(p.name for p in newer), aside)

    # --------------------------------------------------------------------------------------------
    # Saving
    # --------------------------------------------------------------------------------------------

    def save(self, step: int, model, components: dict[str, Stateful], rank_components: dict[str, Stateful]
             ) -> Optional[Path]:
        """Save `step`: the model's sharded tensors (`model.sharded_state_dict()`: policy, teacher,
        optimizer), the state of each of `components` (identical on every rank) in the common part
        under its key, and this rank's `rank_components` with the global RNG states in its rank file.
        Returns the final path (complete once this returns, or, with async save, once `poll`/`wait`
        finalise it)."""
        if self.last_saved_step == step:
            return None
        self.wait()  # one save at a time
        start = time.perf_counter()
        final = self.directory / step_dir_name(step)
        tmp = final.with_name(final.name + TMP_SUFFIX)
        if self.layout.is_main:
            self.directory.mkdir(parents=True, exist_ok=True)
            for stale in self.directory.glob(f"*{TMP_SUFFIX}"):
                shutil.rmtree(stale, ignore_errors=True)
            (tmp / DIST_DIR).mkdir(parents=True)
            (tmp / RANK_DIR).mkdir()
        _barrier()

        what = f"checkpoint step {step} to {final}"
        coordinates = _rank_coordinates(self.layout)
        try:
            rank_state = {key: component.state_dict() for key, component in rank_components.items()}
            torch.save(
                {"coordinates": coordinates, "layout": _layout_dict(self.layout), **rank_state, "rng": rng_state()},
                tmp / RANK_DIR / f"rank{self.layout.rank:05d}.pt",
            )
        except (OSError, RuntimeError) as error:
            self._fail(tmp, what, error)
        ranks = _gather(coordinates)

        from megatron.core import dist_checkpointing

        state = model.sharded_state_dict(is_loading=False)
        state.update({key: component.state_dict() for key, component in components.items()})
        marker = {
            "step": step,
            "format": FORMAT_VERSION,
            "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "layout": _layout_dict(self.layout),
            "ranks": ranks,
        }
        finalize = lambda: self._finalize(tmp, final, marker, start)  # noqa: E731

        if self.async_save:
            from nemo_rlp.megatron_version import at_least

            # From megatron-core 0.17 `save` picks its async writer with `async_strategy`, by default
            # "nvrx" (nvidia-resiliency-ext, not a dependency); "mcore" is the writer 0.16 always used.
            strategy = {"async_strategy": "mcore"} if at_least("0.17") else {}
            request = dist_checkpointing.save(state, str(tmp / DIST_DIR), async_sharded_save=True, **strategy)
            request.finalize_fns.append(finalize)
            before = child_pids()
            with children_die_with_me():
                self._queue().schedule_async_request(request)
            self._async_writers = child_pids() - before
            self._async_tmp = tmp
            self.last_saved_step = step
            log.info("checkpoint: step %d being written to %s in the background", step, final)
            return final
        try:
            with children_die_with_me():
                run_bounded(lambda: dist_checkpointing.save(state, str(tmp / DIST_DIR)),
                            self.cfg.checkpoint.save_timeout_s, what)
        except (Exception, torch.distributed.checkpoint.api.CheckpointException) as error:  # a BaseException
            self._fail(tmp, what, error)
        try:
            finalize()
        except OSError as error:
            if describe_failure(error, self.directory).startswith("no space left"):
                self._fail(tmp, what, error)
            raise  # anything else is a crash: its .tmp stays for the next save to remove
        self.last_saved_step = step
        return final

    def _fail(self, tmp: Path, what: str, error: BaseException) -> None:
        """A save failed: say why (a full disk by name), remove its `.tmp`, raise CheckpointWriteError."""
        reason = None if isinstance(error, CheckpointWriteError) else describe_failure(error, tmp.parent)
        self._discard(tmp)
        if reason is None:
            raise error
        raise CheckpointWriteError(f"{what} failed: {reason}. The checkpoint was not completed; the previous "
                                   "complete checkpoint is still the one a resume picks.") from error

    def _discard(self, tmp: Path) -> None:
        """Remove a failed save's `.tmp` directory, so that only complete checkpoints remain."""
        if self.layout.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            log.error("checkpoint: the save to %s failed and was removed; the latest complete checkpoint is %s",
                      tmp, find_latest(self.directory))

    def _finalize(self, tmp: Path, final: Path, marker: dict, start: float) -> None:
        """Every rank has written its part: mark complete, rename into place, keep the last k."""
        _barrier()
        if self.layout.is_main:
            for path in (tmp / DIST_DIR).rglob("*"):
                if path.is_file():
                    with open(path, "rb") as f:
                        os.fsync(f.fileno())
            _write_json(tmp / CONFIG_FILE, as_dict(self.cfg))
            _write_json(tmp / integrity.MANIFEST, integrity.manifest_of(tmp))
            _write_json(tmp / MARKER, marker)
            _fsync_dir(tmp)
            if final.exists():  # resume=never over an older run's checkpoint of the same step
                _remove_tree(final)
            os.replace(tmp, final)
            _fsync_dir(self.directory)
            deleted = keep_last(self.directory, self.cfg.checkpoint.keep_last, self.cfg.checkpoint.keep_steps)
            log.info(
                "checkpoint: step %d saved to %s in %.1f s%s", marker["step"], final, time.perf_counter() - start,
                f" (deleted {', '.join(p.name for p in deleted)})" if deleted else "",
            )
        _barrier()

    def _queue(self):
        if self._async_queue is None:
            from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

            self._async_queue = AsyncCallsQueue()
        return self._async_queue

    def poll(self) -> None:
        """Finalise a finished async save, without waiting (a collective: call on every rank)."""
        if self._async_queue is not None:
            self._async_queue.maybe_finalize_async_calls(blocking=False)

    def wait(self) -> None:
        """Wait for an async save in flight and finalise it; give up after
        `checkpoint.save_timeout_s` (a collective: every rank decides the same)."""
        queue = self._async_queue
        if queue is None:
            return
        deadline = time.monotonic() + self.cfg.checkpoint.save_timeout_s
        while queue.get_num_unfinalized_calls():
            queue.maybe_finalize_async_calls(blocking=False)
            if not queue.get_num_unfinalized_calls():
                break
            if _any_rank(time.monotonic() > deadline):
                self._abort_async()
                raise CheckpointWriteError(
                    f"the background checkpoint write to {self._async_tmp} did not finish within "
                    f"checkpoint.save_timeout_s={self.cfg.checkpoint.save_timeout_s:g} s; it was killed and the "
                    "checkpoint was not completed (the previous complete checkpoint is still the one a resume picks)"
                )
            time.sleep(0.1)

    def _abort_async(self) -> None:
        kill_children(self._async_writers)
        self._async_queue = None
        self._discard(self._async_tmp)

    def close(self) -> None:
        if self._async_queue is not None:
            self.wait()
            self._async_queue.close()
            self._async_queue = None

    # --------------------------------------------------------------------------------------------
    # Loading
    # --------------------------------------------------------------------------------------------

    def load_weights(self, path: Path, model) -> None:
        """Only the policy's weights from `path/dist` (an import or a training checkpoint), in any
        TP/PP layout; nothing else of the run is touched."""
        from megatron.core import dist_checkpointing

        loaded = dist_checkpointing.load(
            {"model": model.language_model.sharded_state_dict()}, str(Path(path) / DIST_DIR)
        )
        model.language_model.load_state_dict(loaded["model"])

    def load(self, path: Path, model, components: dict[str, Stateful], rank_components: dict[str, Stateful]) -> bool:
        """Load the checkpoint at `path`: the model's sharded tensors, each of `components` from the
        common part under its key, and this rank's `rank_components` and global RNG states from its
        rank file (the model-parallel RNG tracker only in the saved layout). Returns whether the rank
        state was restored: not when the data-parallel size changed (module docstring)."""
        from megatron.core import dist_checkpointing

        path = Path(path)
        marker = json.loads((path / MARKER).read_text())
        loaded = dist_checkpointing.load(model.sharded_state_dict(is_loading=True), str(path / DIST_DIR))
        model.load_sharded_state_dict(loaded)
        for key, component in components.items():
            component.load_state_dict(loaded[key])

        saved_layout = marker["layout"]
        same_layout = saved_layout == _layout_dict(self.layout)
        source = self._rank_source(marker, same_layout)
        if source is not None:
            rank_state = torch.load(path / RANK_DIR / f"rank{source:05d}.pt", weights_only=False)
            try:
                for key, component in rank_components.items():
                    component.load_state_dict(rank_state[key])
            except ValueError as err:
                raise ConfigError(
                    f"checkpoint {path} was saved over other data: {err} (data.corpus / data.blend / data.format / "
                    "data.min_context must match the run that saved it)"
                ) from err
            set_rng_state(rank_state["rng"], tracker=same_layout)
        if not same_layout and self.layout.is_main:
            log.info(
                "checkpoint %s was saved with TP=%d PP=%d DP=%d; loading into TP=%d PP=%d DP=%d",
                path, saved_layout["tensor_parallel"], saved_layout["pipeline_parallel"],
                saved_layout["data_parallel"], self.layout.tensor_parallel, self.layout.pipeline_parallel,
                self.layout.data_parallel,
            )
        if self.layout.is_main and (path / CONFIG_FILE).is_file():
            differences = config_differences(json.loads((path / CONFIG_FILE).read_text()), as_dict(self.cfg))
            if differences:
                log.warning("resuming with a config that differs from the checkpoint's:\n  %s",
                            "\n  ".join(differences))
        if path.parent.resolve() == self.directory.resolve():
            self.last_saved_step = int(marker["step"])  # saving this step again would change nothing
        return source is not None

    def _rank_source(self, marker: dict, same_layout: bool) -> Optional[int]:
        """The saved rank whose file this rank reads (module docstring); None: none fits."""
        me = _rank_coordinates(self.layout)
        if same_layout:
            return me["rank"]
        if marker["layout"]["data_parallel"] == self.layout.data_parallel:
            return next(r["rank"] for r in marker["ranks"]
                        if r["dp_rank"] == me["dp_rank"] and r["tp_rank"] == 0 and r["pp_rank"] == 0)
        return None
