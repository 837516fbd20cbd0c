"""Whether a checkpoint directory will load, checked before anything is loaded from it.

A checkpoint's `complete.json` says that every rank finished writing; it says nothing about what
happened to the files since (a truncated or deleted shard, a garbled `dist/.metadata`, a lost
`rank_state` file). megatron-core then fails deep inside the load with an error that reads like a
model mismatch. So each save also writes `manifest.json` (before the marker): the size of every
file of the checkpoint, and a CRC-32 of the small ones (metadata, common state, rank states: cheap
to read, and where garbage would otherwise go unnoticed). `problem(path)` compares the directory
with its manifest and says, in words, what is wrong, or None.

`newest_loadable(root)` is what a resume uses: the newest checkpoint without a problem. Every newer
one that has a problem is skipped with a warning and, in the run's own directory, renamed
`step_XXXXXXX.damaged` (kept for inspection, never picked again,
and no longer counted by keep-last-k, which would otherwise delete the good checkpoint in favour of
the damaged one) with a warning naming what is wrong.

Checkpoints written before manifests existed are checked for what their marker promises: the
metadata file and one rank-state file per rank.
"""

from __future__ import annotations

import json
import logging
import os
import re
import zlib
from pathlib import Path
from typing import Optional

log = logging.getLogger("nemo_rlp")

MANIFEST = "manifest.json"
MARKER = "complete.json"
DAMAGED_SUFFIX = ".damaged"
# Files up to this size also get a checksum (the big tensor shards get their size checked only:
# reading every byte of a multi-GB checkpoint at each resume would cost minutes).
CHECKSUM_MAX_BYTES = 16 * 2**20
_STEP_DIR = re.compile(r"^step_(\d{7,})$")


def _crc32(path: Path) -> int:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(2**20):
            crc = zlib.crc32(chunk, crc)
    return crc


def manifest_of(directory: Path) -> dict:
    """{relative path: {"size": bytes[, "crc32": int]}} for every file under `directory` (except
    the manifest and the marker, written after it)."""
    files = {}
    for path in sorted(Path(directory).rglob("*")):
        relative = path.relative_to(directory).as_posix()
        if not path.is_file() or relative in (MANIFEST, MARKER):
            continue
        entry = {"size": path.stat().st_size}
        if entry["size"] <= CHECKSUM_MAX_BYTES:
            entry["crc32"] = _crc32(path)
        files[relative] = entry
    return {"format": 1, "files": files}


def _file_problem(path: Path, relative: str, expected: dict) -> Optional[str]:
    file = path / relative
    if not file.is_file():
        return f"{relative} is missing"
    try:
        size = file.stat().st_size
        if size != expected["size"]:
            return f"{relative} is {size} bytes, the manifest written at save says {expected['size']} (truncated or overwritten)"
        if "crc32" in expected and _crc32(file) != expected["crc32"]:
            return f"{relative} has changed since the save (its checksum differs from the manifest's)"
    except OSError as error:
        return f"{relative} cannot be read ({error.strerror or error})"
    return None


def problem(path: Path) -> Optional[str]:
    """What keeps the checkpoint at `path` from loading, in words; None if nothing does."""
    path = Path(path)
    match = _STEP_DIR.match(path.name)
    try:
        marker = json.loads((path / MARKER).read_text())
    except FileNotFoundError:
        return f"{MARKER} is missing"
    except (OSError, ValueError) as error:
        return f"{MARKER} is not valid JSON ({str(error)[:80]})"
    step = marker.get("step") if isinstance(marker, dict) else None
    # Any directory name resumes (a renamed copy): then the marker alone says which step it is.
    if not isinstance(step, int) or isinstance(step, bool) or step < 0 or (match and step != int(match[1])):
        return f"{MARKER} does not name step {int(match[1]) if match else '(a step number)'}: {str(marker)[:80]}"
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        files = manifest["files"]
    except FileNotFoundError:  # a checkpoint from before manifests: check what the marker promises
        files = {"dist/.metadata": {"size": None}}
        files.update({f"rank_state/rank{r['rank']:05d}.pt": {"size": None} for r in marker.get("ranks", [])})
        missing = [relative for relative in files if not (path / relative).is_file()]
        return f"{', '.join(missing)} missing" if missing else None
    except (OSError, ValueError, KeyError, TypeError) as error:
        return f"{MANIFEST} is unreadable ({str(error)[:80]})"
    for relative, expected in files.items():
        found = _file_problem(path, relative, expected)
        if found:
            return found
    return None


def step_directories(root: Path) -> list[tuple[int, Path]]:
    """(step, path) of every `step_XXXXXXX` directory under `root` (complete or not), oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m[1]), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
    return sorted(found)


def set_aside(path: Path, suffix: str) -> Path:
    """Rename `path` to `path<suffix>` (numbered if taken), out of every checkpoint search."""
    target = path.with_name(path.name + suffix)
    n = 1
    while target.exists():
        n += 1
        target = path.with_name(f"{path.name}{suffix}{n}")
    os.replace(path, target)
    return target


def newest_loadable(root: Path, set_aside_damaged: bool = True) -> Optional[Path]:
    """The newest checkpoint under `root` that passes `problem`; newer damaged ones are skipped with
    a warning and, with `set_aside_damaged` (this run's own directory), renamed (module docstring)."""
    for step, path in reversed(step_directories(root)):
        found = problem(path)
        if found is None:
            return path
        what = "Skipping it"
        if set_aside_damaged:
            what = f"Renamed it to {set_aside(path, DAMAGED_SUFFIX).name} (kept for inspection)"
        log.warning("CHECKPOINT DAMAGED: %s cannot be resumed from: %s. %s and falling back to the previous "
                    "complete checkpoint.", path, found, what)
    return None
