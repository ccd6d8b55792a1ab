"""The operator suites' set-up: their integration tests' trainers run on the session's real node
from the tests' trainer image (``trainer_test_image``), imported there once per session."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _trainer_image_on_the_node(request: pytest.FixtureRequest) -> None:
    if request.node.get_closest_marker("integration") is not None:
        request.getfixturevalue("trainer_test_image")
