"""Suite-wide fixtures."""
from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest


@pytest.fixture(autouse=True)
def _root_logger_restored() -> Iterator[None]:
    """The CLI configures logging (cli._setup_logging: root level ERROR with -q); restore the root logger's level
    after each test, so a later test's ``caplog`` still sees warnings whatever ran before it."""
    root = logging.getLogger()
    level = root.level
    yield
    root.setLevel(level)
