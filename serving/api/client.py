"""Python client for a shardserve endpoint (HTTP), and for in-cluster use (a Serve handle).

    from serving.api.client import Client
    c = Client("http://127.0.0.1:8000", api_key=None)
    c.chat([{"role": "user", "content": "What is the capital of France?"}], max_tokens=32)
    for piece in c.chat([...], stream=True): print(piece, end="")
"""
from __future__ import annotations

import json
from collections.abc import Iterator

import httpx

from shards.runtime.stats import ShardStats


class ShardServeError(RuntimeError):
    """The server answered with an OpenAI-style error body."""

    def __init__(self, status: int, body: dict):
        err = body.get("error", {}) if isinstance(body, dict) else {}
        super().__init__(f"HTTP {status}: {err.get('message', body)}")
        self.status, self.body = status, body


class Client:
    def __init__(self, base_url: str = "http://127.0.0.1:8000", api_key: str | None = None,
                 timeout: float = 600.0, admin_key: str | None = None):
        """admin_key: for /v1/shards and budgets where the server has one (else the API key)."""
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.admin = {"Authorization": f"Bearer {admin_key}"} if admin_key else {}
        self.http = httpx.Client(base_url=base_url.rstrip("/"), headers=headers, timeout=timeout)

    def _json(self, method: str, path: str, body: dict | None = None, admin: bool = False) -> dict:
        r = self.http.request(method, path, json=body, headers=self.admin if admin else None)
        data = r.json()
        if r.status_code >= 400:
            raise ShardServeError(r.status_code, data)
        return data

    def _stream(self, path: str, body: dict, key) -> Iterator[str]:
        with self.http.stream("POST", path, json={**body, "stream": True}) as r:
            if r.status_code >= 400:
                r.read()
                raise ShardServeError(r.status_code, r.json())
            for line in r.iter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    return
                yield key(json.loads(line[6:])["choices"][0])

    def chat(self, messages: list[dict], stream: bool = False, **params):
        """Reply text (stream=False) or an iterator of text pieces (stream=True)."""
        body = {"messages": messages, **params}
        if stream:
            return self._stream("/v1/chat/completions", body, lambda c: c["delta"].get("content", ""))
        return self._json("POST", "/v1/chat/completions", body)["choices"][0]["message"]["content"]

    def complete(self, prompt: str, stream: bool = False, **params):
        body = {"prompt": prompt, **params}
        if stream:
            return self._stream("/v1/completions", body, lambda c: c["text"])
        return self._json("POST", "/v1/completions", body)["choices"][0]["text"]

    def chat_response(self, messages: list[dict], **params) -> dict:
        """The whole OpenAI response body (usage, finish_reason, ...)."""
        return self._json("POST", "/v1/chat/completions", {"messages": messages, **params})

    def shards(self) -> dict:
        """Plan, per-shard measured numbers, and the controller's events (newest last)."""
        return self._json("GET", "/v1/shards", admin=True)

    def set_budget(self, shard: int | str, budget_bytes: int | None) -> ShardStats:
        """Change shard `shard`'s (an index or its actor name) memory budget at run time (None: no budget); the controller
        acts when its measured use goes over the high watermark. Returns the shard's stats."""
        return ShardStats(**self._json("PATCH", f"/v1/shards/{shard}", {"budget_bytes": budget_bytes}, admin=True))

    def models(self) -> list[str]:
        return [m["id"] for m in self._json("GET", "/v1/models")["data"]]

    def healthy(self) -> bool:
        try:
            return self.http.get("/healthz", timeout=5).status_code == 200
        except httpx.HTTPError:
            return False


class HandleClient:
    """In-cluster: call the ShardServe deployment through its DeploymentHandle, no HTTP."""

    def __init__(self, handle):
        self.handle = handle

    def chat(self, messages: list[dict], **params) -> str:
        out = self.handle.chat_handle.remote({"messages": messages, **params}).result()
        return out["choices"][0]["message"]["content"]
