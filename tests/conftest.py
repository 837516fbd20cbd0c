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

