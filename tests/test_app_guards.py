"""Tier 1: the HTTP app's guards without Ray: a chunked body is refused as soon as it passes
the limit (not buffered whole), and /v1/shards takes the admin key where one is set."""
import asyncio

import pytest
from fastapi import HTTPException
from starlette.requests import Request

from serving.api import app, http

pytestmark = pytest.mark.unit


def _request(chunks: list[bytes], headers: dict | None = None, admin: str | None = None, key: str | None = None):
    sent = []

    async def receive():
        sent.append(1)
        if len(sent) <= len(chunks):
            return {"type": "http.request", "body": chunks[len(sent) - 1], "more_body": len(sent) < len(chunks)}
        return {"type": "http.disconnect"}
    fast = type("App", (), {"state": type("State", (), {"api_key": key, "admin_key": admin})()})()
    scope = {"type": "http", "method": "POST", "path": "/", "headers": [(k.lower().encode(), v.encode())
                                                                      for k, v in (headers or {}).items()],
             "app": fast}
    return Request(scope, receive), sent


def test_a_chunked_body_over_the_limit_is_refused_before_it_is_all_read():
    chunk = b"x" * (64 << 10)
    n = 2 * http.MAX_BODY_BYTES // len(chunk)        # 2 MiB in 64 KiB chunks, no content-length
    req, sent = _request([chunk] * n)
    with pytest.raises(HTTPException) as e:
        asyncio.run(http._body(req))
    assert e.value.status_code == 413 and len(sent) == http.MAX_BODY_BYTES // len(chunk) + 1 < n


def test_a_body_under_the_limit_is_read_whole():
    req, _ = _request([b'{"a": ', b"1}"])
    assert asyncio.run(http._body(req)) == b'{"a": 1}'


@pytest.mark.parametrize("admin,key,sent,ok", [
    ("adm", "api", "Bearer adm", True), ("adm", "api", "Bearer api", False),   # the API key is not enough
    (None, "api", "Bearer api", True), (None, "api", "Bearer adm", False),     # no admin key: the API key
    (None, None, "", True)])
def test_admin_routes_take_the_admin_key(admin, key, sent, ok):
    req, _ = _request([], {"authorization": sent}, admin=admin, key=key)
    if ok:
        http.check_admin(req)
    else:
        with pytest.raises(HTTPException) as e:
            http.check_admin(req)
        assert e.value.status_code == 401


def test_serve_health_check_fails_only_when_the_build_failed_or_the_pipeline_is_down():
    check = app.ShardServe.func_or_class.check_health

    async def run():
        loop = asyncio.get_running_loop()
        replica = type("Replica", (), {})()
        replica._build = loop.create_future()
        await check(replica)                                   # still building: healthy
        engine = type("Engine", (), {"down": None})()
        replica._build.set_result(engine)
        await check(replica)
        engine.down = "shard lost and not re-placed"
        with pytest.raises(RuntimeError, match="pipeline down: shard lost"):
            await check(replica)
        replica._build = loop.create_future()
        replica._build.set_exception(ValueError("no model"))
        with pytest.raises(RuntimeError, match="engine build failed: ValueError"):
            await check(replica)
    asyncio.run(run())
