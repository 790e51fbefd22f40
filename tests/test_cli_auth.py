"""Tier 1: neither the CLI nor build_app exposes an unauthenticated endpoint beyond loopback."""
import pytest

from serving.cli import main
from serving.config import load, loopback
from shards.errors import ShardServeError

pytestmark = pytest.mark.unit


def test_non_loopback_host_needs_a_key(capsys, monkeypatch):
    monkeypatch.delenv("SHARDSERVE_API_KEY", raising=False)
    import ray
    connects = []      # the clean-up must not connect either: it could reach another cluster's Serve
    monkeypatch.setattr(ray, "init", lambda *a, **kw: connects.append((a, kw)))
    assert main(["serve", "--host", "0.0.0.0", "--shards", "2"]) == 2   # before any Ray starts
    assert "without an API key" in capsys.readouterr().err and connects == []
    assert loopback("127.0.0.1") and loopback("::1") and loopback("localhost")
    assert not loopback("0.0.0.0") and not loopback("10.1.2.3") and not loopback("example.org")


def test_bind_check_passes_with_a_key_or_insecure(monkeypatch):
    monkeypatch.delenv("SHARDSERVE_API_KEY", raising=False)
    with pytest.raises(ShardServeError, match="0.0.0.0 without an API key"):
        load().check_bind("0.0.0.0")
    load(api_key="k").check_bind("0.0.0.0")
    load(insecure=True).check_bind("0.0.0.0")
    load().check_bind("127.0.0.1")
    monkeypatch.setenv("SHARDSERVE_API_KEY", "from-env")
    load().check_bind("0.0.0.0")


def test_build_app_refuses_a_public_serve_host_without_a_key(monkeypatch):
    """build_app reads the host from the running Serve controller's HTTP options."""
    import serving.api.app as app

    class Client:
        class http_config:
            host = "0.0.0.0"
    monkeypatch.delenv("SHARDSERVE_API_KEY", raising=False)
    monkeypatch.setattr(app, "serve_client", lambda: Client)
    with pytest.raises(ShardServeError, match="without an API key"):
        app.build_app({"shards": 2})
    assert app.build_app({"shards": 2, "api_key": "k"}) is not None
    assert app.build_app({"shards": 2, "insecure": True}) is not None
    monkeypatch.setattr(app, "serve_client", lambda: None)     # serve.run will start it on loopback
    assert app.build_app({"shards": 2}) is not None


def test_fingerprint_follows_what_the_shards_hold():
    base = load()
    assert base.fingerprint() == load(max_batch=8, api_key="k", served_name="x").fingerprint()
    changed = [load(model="other.gguf"), load(shards=3), load(compression="w8a16"), load(kv_tokens=4096),
               load(budgets=["300MiB", "300MiB"]), load(placement=False)]
    assert len({base.fingerprint(), *(c.fingerprint() for c in changed)}) == 1 + len(changed)
