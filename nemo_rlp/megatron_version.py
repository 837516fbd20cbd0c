"""Which megatron-core versions nemo-rlp supports, and the version tables its patches are keyed by.

megatron-core moves code between releases (0.17 moved the Mamba decode kernels into
`megatron.core.ssm.ops`, 0.18 gated the mixer's inference cache on `InferenceMode`, 0.19 made the
mixer's conv a bare `conv1d_weight` / `conv1d_bias` and `MambaModel` a deprecated alias of
`HybridModel`). Code that depends on such a change asks this module for the installed version and
looks its behaviour up in a small table of version ranges (`rows_for`), never guesses with
try/except. The tests run every table's rows for the installed version
(tests/unit/test_cpu_platform.py, tests/unit/test_mamba_kernels.py), and CI runs the suite on the
oldest and the newest supported release (.ci/run).

Reads the version from the package metadata only: importing this module does not import megatron.
"""

from __future__ import annotations

import functools
import warnings
from importlib.metadata import version as _distribution_version
from typing import Iterable, TypeVar

from packaging.version import Version

# [first, end): the releases the tables below and in the patched modules cover. Keep in step with
# pyproject.toml's `megatron-core>=0.16,<0.20` and the Dockerfile's check.
SUPPORTED = ("0.16", "0.20")
# The releases the version-sensitive tests were run on (tests/unit/test_cpu_platform.py checks the
# installed one is listed, so a new release is run before it is claimed): CI runs the whole suite on
# 0.19.x and the unit and distributed tests on 0.16.1 (.ci/run); 0.17.0 and 0.18.0 were run by hand,
# the CPU platform, Mamba kernel, hybrid model, packing (and on 0.17.0 rollout) tests only.
TESTED = ("0.16.1", "0.17.0", "0.18.0", "0.19.2")

T = TypeVar("T")


@functools.lru_cache(maxsize=None)
def installed_version() -> str:
    """The installed megatron-core's version string (e.g. "0.19.2")."""
    return _distribution_version("megatron-core")


def at_least(release: str, version: str | None = None) -> bool:
    """True when megatron-core `version` (default: the installed one) is `release` or newer."""
    return _release(version or installed_version()) >= Version(release)


def is_supported(version: str | None = None) -> bool:
    v = _release(version or installed_version())
    return Version(SUPPORTED[0]) <= v < Version(SUPPORTED[1])


def rows_for(table: Iterable[tuple[str, str, T]], version: str | None = None) -> list[T]:
    """The values of the rows (first, end, value) of `table` whose [first, end) holds `version`."""
    v = _release(version or installed_version())
    return [value for first, end, value in table if Version(first) <= v < Version(end)]


def warn_if_unsupported(what: str) -> None:
    """Warn (once per caller) when the installed megatron-core is outside `SUPPORTED`."""
    found = installed_version()
    if not is_supported(found):
        warnings.warn(
            f"{what} supports megatron-core >= {SUPPORTED[0]}, < {SUPPORTED[1]}; found {found}. "
            f"Its patches are keyed by version and may not take effect: run tests/unit/test_cpu_platform.py.",
            stacklevel=3,
        )


def _release(version: str) -> Version:
    """The release part only, so that 0.19.0rc1 or 0.18.0+nv counts as its release (NeMo containers
    carry such builds)."""
    return Version(Version(version).base_version)
