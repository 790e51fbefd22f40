"""Which way HTTP reaches the router (serving/ingress.py): the decision and the variables Serve's
processes start with."""
import os

import pytest

from serving.ingress import choose, env, environment, free_port

pytestmark = pytest.mark.unit


def test_one_replica_on_a_ray_we_start_takes_the_port_directly():
    ing = choose(8123, replicas=1, starts_ray=True)
    assert ing.direct and ing.port == 8123 and ing.proxy_port not in (8123, 0)
    e = env(ing)
    assert e["RAY_SERVE_ENABLE_DIRECT_INGRESS"] == "1"
    # the replica's port range is exactly the user's port (Serve's upper bound is exclusive)
    assert (e["RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT"], e["RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT"]) == ("8123", "8124")
    assert e["RAY_SERVE_PORT_QUARANTINE_S"] == "0" and e["RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"] == "0"


@pytest.mark.parametrize("replicas,starts_ray,wanted", [(2, True, True), (1, False, True), (1, True, False)])
def test_the_proxy_keeps_the_port_otherwise(replicas, starts_ray, wanted):
    ing = choose(8123, replicas=replicas, starts_ray=starts_ray, wanted=wanted)
    assert not ing.direct and ing.proxy_port == 8123 and env(ing) == {}


def test_environment_is_restored_after_ray_starts(monkeypatch):
    monkeypatch.setenv("RAY_SERVE_PORT_QUARANTINE_S", "7")
    monkeypatch.delenv("RAY_SERVE_ENABLE_DIRECT_INGRESS", raising=False)
    with environment(env(choose(free_port("127.0.0.1"), 1, True))):
        assert os.environ["RAY_SERVE_ENABLE_DIRECT_INGRESS"] == "1"
        assert os.environ["RAY_SERVE_PORT_QUARANTINE_S"] == "0"
    assert "RAY_SERVE_ENABLE_DIRECT_INGRESS" not in os.environ
    assert os.environ["RAY_SERVE_PORT_QUARANTINE_S"] == "7"


def _serve_once_and_stop(port: int) -> None:
    """Start the replica's direct-ingress server as Serve does, answer one request that closes
    its connection from the server side (that side keeps TIME_WAIT), and stop the server."""
    import asyncio

    import httpx
    from ray.serve._private import replica
    from ray.serve.config import HTTPOptions

    async def app(scope, receive, send):
        if scope["type"] != "http":
            return
        await send({"type": "http.response.start", "status": 200, "headers": [(b"connection", b"close")]})
        await send({"type": "http.response.body", "body": b"ok"})

    async def run():
        loop = asyncio.get_running_loop()
        task, server = await replica.start_asgi_http_server(app, HTTPOptions(host="127.0.0.1", port=port),
                                                            event_loop=loop)
        async with httpx.AsyncClient() as c:
            assert (await c.get(f"http://127.0.0.1:{port}/")).text == "ok"
        server.should_exit = True
        await task
    asyncio.run(run())


def test_a_replica_port_binds_again_right_after_it_served():
    """Serve binds a replica's own port without SO_REUSEADDR; the connection it closed holds the
    port in TIME_WAIT, so a restarted replica (or the next server) could not bind it for 60 s.
    With reusable_direct_ingress the second server starts at once."""
    from ray.serve._private import replica

    from shards.compat import reusable_direct_ingress
    serves = replica.start_asgi_http_server
    try:
        reusable_direct_ingress()
        port = free_port("127.0.0.1")
        _serve_once_and_stop(port)
        _serve_once_and_stop(port)
    finally:
        replica.start_asgi_http_server = serves


def test_a_port_someone_listens_on_is_refused_by_number():
    import socket

    from serving.ingress import check_port
    from shards.errors import ShardServeError
    with socket.create_server(("127.0.0.1", 0)) as s:
        port = s.getsockname()[1]
        with pytest.raises(ShardServeError, match=f"port {port} on 127.0.0.1 is in use"):
            check_port("127.0.0.1", port)
    check_port("127.0.0.1", port)    # closed: free again
