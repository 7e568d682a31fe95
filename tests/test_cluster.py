"""Scheduler selection."""

from __future__ import annotations

import pytest

import pertscale as ps
from pertscale.cluster import resolve_scheduler


def test_named_schedulers():
    for name in ("synchronous", "threads", "processes"):
        assert resolve_scheduler(name) == name
    with pytest.raises(ValueError, match="scheduler 'gpu' is not known"):
        resolve_scheduler("gpu")


def test_settings_override_restores():
    before = ps.settings.scheduler
    with ps.settings.override(scheduler="synchronous"):
        assert resolve_scheduler(None) == "synchronous"
    assert ps.settings.scheduler == before
    with pytest.raises(TypeError, match="unknown setting"), ps.settings.override(colour="red"):
        pass


@pytest.mark.cluster
def test_active_client_is_used(cluster_client):
    with cluster_client.as_current():
        assert resolve_scheduler("local") is cluster_client
