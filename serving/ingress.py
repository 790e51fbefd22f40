"""How HTTP reaches the router: through Serve's proxy, or straight into the replica.

Through the proxy, every streamed token crosses one more process: the replica yields it to a Ray
streaming generator, the proxy (another Python process on the same cores) reads it and writes
it to the socket. With direct ingress the replica's own HTTP server takes the request, and the
router's tokens go from its event loop to the socket. On a 2-core node serving the default model
at concurrency 1 that hop cost 0.6-0.8 CPU ms a token in the proxy and 0.2-0.5 in the replica, run
beside the shards' steps (docs/performance.md, "The front door").

Direct ingress takes the user's port only where one replica serves it on a Ray this process
starts: Serve then gives each ingress replica a port of its own from a range, so the range is
that one port, and Serve's proxy (which direct ingress still starts on the head node) gets a
free port nobody is told about. With several replicas the proxy keeps the port and balances
them; on a cluster someone else started, Serve's processes already run with their own settings.
"""
from __future__ import annotations

import os
import socket
from contextlib import contextmanager
from dataclasses import dataclass

from shards.errors import ShardServeError


@dataclass(frozen=True)
class Ingress:
    """Where Serve's proxy listens and, when `direct`, that the replica serves `port` itself."""
    direct: bool
    port: int           # the port users call
    proxy_port: int     # Serve's proxy: `port`, or an unannounced free one under direct ingress


def choose(port: int, replicas: int, starts_ray: bool, wanted: bool = True, host: str = "127.0.0.1") -> Ingress:
    """Direct ingress for one replica on a Ray this process starts, when `wanted`; the proxy
    otherwise."""
    if wanted and replicas == 1 and starts_ray:
        return Ingress(True, port, free_port(host))
    return Ingress(False, port, port)


def env(ing: Ingress) -> dict[str, str]:
    """The variables Serve's controller and replicas read at import (so they must be set when the
    Ray they run in starts): the replica port range is the one user port (upper bound exclusive);
    no quarantine of a released port and no drain period, so a restarted replica takes the port
    back at once and a stop does not wait 30 s for an external balancer there is none of."""
    if not ing.direct:
        return {}
    return {"RAY_SERVE_ENABLE_DIRECT_INGRESS": "1",
            "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT": str(ing.port),
            "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT": str(ing.port + 1),
            "RAY_SERVE_PORT_QUARANTINE_S": "0",
            "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "0"}


@contextmanager
def environment(variables: dict[str, str]):
    """Set `variables` for what starts inside (Ray's processes inherit them), then restore."""
    saved = {k: os.environ.get(k) for k in variables}
    os.environ.update(variables)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def starts_ray(address: str | None) -> bool:
    """Whether `ray.init(address)` starts a Ray rather than joining one: with no address it joins a
    Ray that `ray start` left on this machine (RAY_ADDRESS, or Ray's record of the last cluster).
    Ray's own resolution decides; where it cannot be asked, joining is assumed (the proxy)."""
    from shards.compat import CompatError, ray_bootstrap_address
    try:
        return ray_bootstrap_address(address) is None
    except CompatError:
        return False


def check_port(host: str, port: int) -> None:
    """Refuse a port another server listens on, before anything starts. Serve's replica would
    retry it and fail only after its health wait; a connection closed a moment ago (TIME_WAIT)
    does not count (SO_REUSEADDR, as the replica binds)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            raise ShardServeError(f"port {port} on {host} is in use ({e.strerror}); pick another with --port") from None


def free_port(host: str) -> int:
    """A port the OS has free on `host` now (bound and released)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]
