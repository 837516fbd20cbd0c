from __future__ import annotations

import pytest

from nemo_rlp.data.bundled import BUNDLED_TOKENIZER


@pytest.fixture(scope="session")
def experiment_data(tmp_path_factory) -> list[str]:
    """Overrides for the data the at-scale experiments leave to the user: an (empty) indexed dataset
    prefix and the bundled tokenizer. The plan and the dry runs only check that they exist."""
    root = tmp_path_factory.mktemp("data")
    for suffix in (".bin", ".idx"):
        (root / f"corpus{suffix}").touch()
    return [f"data.corpus={root / 'corpus'}", f"data.tokenizer={BUNDLED_TOKENIZER}"]


def _time_limit(item: pytest.Item) -> float:
    marker = item.get_closest_marker("timeout")
    return float(marker.args[0]) if marker and marker.args else 0.0


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The tests with the longest time limits (the demo, the wheel, bring-your-own-corpus) run first.

    CI runs the suite on two pytest-xdist workers (`-n 2 --dist loadfile`: a file's tests on one
    worker, so module fixtures run once): started first, the ten-minute demo runs on one worker while
    the other works through the rest, instead of holding the run's end back.
    The sort is stable, so every other test keeps its collection order."""
    items.sort(key=lambda item: -_time_limit(item))
