"""The service's kill -9 rounds (tests/e2e/test_service.py) with the Dask engine: the
coordinator killed while its tasks run on a LocalCluster of worker processes; on restart
no duplicate master, and no input lost or moved twice."""

from __future__ import annotations

import pytest

distributed = pytest.importorskip("distributed", reason="the dask extra (distributed) is not installed")

from test_service import kill_9_rounds  # noqa: E402


def test_kill_9_of_the_coordinator_with_the_dask_engine(tmp_path, watches):
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
                                  worker_dashboard_address=None) as cluster:
        kill_9_rounds(tmp_path, watches, f"{{kind: dask, address: '{cluster.scheduler_address}', "
                                         "fallback: fail, memory_limit: 9MiB, workers: 1}")
