"""Tier 1: the CLI refuses to expose an unauthenticated endpoint beyond loopback."""
import pytest

from serving.cli import _loopback, main

pytestmark = pytest.mark.unit


def test_non_loopback_host_needs_a_key(capsys, monkeypatch):
    monkeypatch.delenv("SHARDSERVE_API_KEY", raising=False)
    assert main(["serve", "--host", "0.0.0.0", "--shards", "2"]) == 2   # before any Ray starts
    assert "without an API key" in capsys.readouterr().err
    assert _loopback("127.0.0.1") and _loopback("::1") and _loopback("localhost")
    assert not _loopback("0.0.0.0") and not _loopback("10.1.2.3") and not _loopback("example.org")
