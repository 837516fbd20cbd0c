"""W&B beside TensorBoard (`logging.wandb`): an offline run, no network, holds the metrics of every
step under TensorBoard's names; enabled without the package, the config error names the extra."""

from __future__ import annotations

import importlib.util
import json
import struct
import tempfile
from pathlib import Path

import pytest

from nemo_rlp.config import ConfigError, load_config
from nemo_rlp.training.loop import Trainer

from tests.tiny_run import TINY_RUN

SHORT = [*TINY_RUN, "trainer.steps=4", "trainer.schedule.ntp_warmup_steps=2", "checkpoint.resume=never"]


def _wandb_records(path: Path):
    """The records of a run's `.wandb` file: W&B's transaction log, LevelDB's log format (32 KiB
    blocks of chunks with a 7-byte header: checksum, length, type FULL/FIRST/MIDDLE/LAST) after a
    7-byte file header, each record a `wandb_internal_pb2.Record`. wandb ships no Python reader."""
    from wandb.proto import wandb_internal_pb2

    block, data = 32768, path.read_bytes()
    assert data[:4] == b":W&B", data[:7]
    pos, pending = 7, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        _checksum, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if left < 7 or (kind == 0 and length == 0):  # the rest of a block is padding
            pos += left
            continue
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind in (1, 2):  # FULL, FIRST
            pending = chunk
        else:  # MIDDLE, LAST
            pending += chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record


@pytest.mark.timeout(600)  # a tiny run and W&B's own service process; about 40 s on a quiet machine
def test_offline_wandb_run_holds_the_logged_metrics(tmp_path, monkeypatch):
    pytest.importorskip("wandb", reason="the wandb extra is not installed")
    for key in ("WANDB_API_KEY", "WANDB_BASE_URL"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb_env_dir"))
    monkeypatch.setenv("WANDB_CONSOLE", "off")  # leave pytest's capture of stdout alone
    monkeypatch.setenv("WANDB_SILENT", "true")
    # W&B makes `tmp*wandb-media` / `tmp*wandb-artifacts` directories in the temp dir and leaves them.
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setenv("TMPDIR", str(scratch))
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    out, wandb_dir = tmp_path / "run", tmp_path / "wb"
    cfg = load_config([*SHORT, "logging.wandb.enabled=true", "logging.wandb.mode=offline",
                       f"logging.wandb.dir={wandb_dir}", "logging.wandb.project=nemo-rlp-test"])
    Trainer(cfg, out).train()

    (run_file,) = wandb_dir.glob("wandb/offline-run-*/run-*.wandb")
    history: dict[int, dict] = {}
    config = None
    for record in _wandb_records(run_file):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            items = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            history[int(items["_step"])] = items
        elif kind == "run":
            config = {item.key: json.loads(item.value_json) for item in record.run.config.update}
    assert sorted(history) == [0, 1, 2, 3]
    tensorboard_names = [{f"{r['kind']}/{k}" for k in r if k not in ("step", "kind", "step_seconds")} | {"time/step_seconds"}
                         for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())]
    for step, names in enumerate(tensorboard_names):
        assert names <= set(history[step]), names - set(history[step])
    assert history[0]["ntp/ntp_loss"] > 0 and history[0]["ntp/tokens_per_s"] > 0
    assert history[3]["rlp/reward_mean"] == json.loads((out / "metrics.jsonl").read_text().splitlines()[3])["reward_mean"]
    assert history[3]["rlp/thought_tokens_per_s"] > 0 and history[3]["rlp/time_rollout_s"] > 0
    assert config is not None and config["rlp"]["group_size"] == 3  # the run's config goes along
    assert not (tmp_path / "wandb_env_dir").exists()  # logging.wandb.dir wins over WANDB_DIR


def test_enabled_without_the_package_names_the_extra(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(ConfigError, match=r"pip install 'nemo-rlp\[wandb\]'"):
        load_config(["logging.wandb.enabled=true"])
    load_config(["logging.wandb.enabled=false"])  # off by default, and off needs nothing


def test_bad_mode_is_rejected():
    with pytest.raises(ConfigError, match="logging.wandb.mode"):
        load_config(["logging.wandb.mode=sometimes"])
