"""Fixtures of the end-to-end tests that more than one module uses."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from pipeline.core.settings import BrokerSettings
from tests.e2e.faults import fresh_broker


@pytest.fixture(scope="module")
def own_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BrokerSettings]:
    """A broker of the test module's own (free ports, own data dir) for tests that stop or
    kill it: the shared broker is never touched."""
    with fresh_broker(tmp_path_factory.mktemp("broker")) as settings:
        yield settings
