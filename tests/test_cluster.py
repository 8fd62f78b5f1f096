"""The cluster helper: LocalCluster sizing, a dashboard that really serves, clear errors."""

import argparse
import urllib.request

import psutil
import pytest

from recpipe import cluster
from recpipe.cli import UserError


def parse(*argv):
    parser = argparse.ArgumentParser()
    cluster.add_arguments(parser)
    return parser.parse_args(argv)


def test_cluster_local_size_shares_three_quarters_of_memory():
    workers, memory_limit = cluster.local_cluster_size(workers=2)
    assert workers == 2
    assert memory_limit == int(psutil.virtual_memory().total * 0.75 / 2)
    assert cluster.local_cluster_size(workers=1, memory_limit="2GiB") == (1, 2 * 2**30)


@pytest.mark.parametrize("workers, memory_limit, message", [
    (0, None, "--workers 0"), (1, "lots", "--memory-limit 'lots'")])
def test_cluster_local_size_rejects_bad_flags(workers, memory_limit, message):
    with pytest.raises(UserError, match=message):
        cluster.local_cluster_size(workers=workers, memory_limit=memory_limit)


def test_cluster_scheduler_flag_defaults_to_environment(monkeypatch):
    monkeypatch.setenv("DASK_SCHEDULER_ADDRESS", "tcp://10.0.0.1:8786")
    assert parse().scheduler == "tcp://10.0.0.1:8786"


def test_cluster_dashboard_link_serves_and_progress_returns_results(capsys):
    with cluster.connect(parse("--workers", "1", "--memory-limit", "1GiB")) as client:
        link = client.dashboard_link
        with urllib.request.urlopen(link, timeout=30) as response:
            assert response.status == 200
        futures = [client.submit(pow, n, 2) for n in range(5)]
        assert cluster.wait_with_progress(futures, "squaring") == [0, 1, 4, 9, 16]
    out = capsys.readouterr().out
    assert f"Dask dashboard: {link}" in out
    assert "squaring: 5/5 tasks done" in out
