"""The HTTP edge of the app: OpenAI error bodies, bounded JSON bodies, API and admin keys, and
the router's refusals as HTTP errors. Plain functions: the Serve app (app.py) routes through them."""
import hmac
import json

from fastapi import HTTPException, Request
from fastapi.responses import JSONResponse

MAX_BODY_BYTES = 1 << 20     # 1 MiB: far above the longest prompt the KV pools can hold


def error_response(status: int, message: str, kind: str, code: str | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": None, "code": code}},
                        status_code=status)


async def parse_body(request: Request, model):
    """The JSON body as `model`: 413 over MAX_BODY_BYTES, else a 400 in OpenAI's error shape."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise HTTPException(413, f"request body of {declared} bytes is over the {MAX_BODY_BYTES}-byte limit")
    raw = await _body(request)
    try:
        data = json.loads(raw.decode("utf-8"), parse_constant=_no_constant)
        if not isinstance(data, dict):
            raise ValueError(f"the body must be a JSON object, not {type(data).__name__}")
        return model.model_validate(data)
    except ValueError as e:  # bad UTF-8, JSONDecodeError and pydantic's ValidationError are ValueErrors
        errors = getattr(e, "errors", None)
        msg = "; ".join(f"{'.'.join(map(str, x['loc']))}: {x['msg']}" for x in errors()) if errors else str(e)
        raise HTTPException(400, f"invalid request body: {msg[:1000]}") from e


async def _body(request: Request) -> bytes:
    """The body, read chunk by chunk and refused (413) as soon as it passes MAX_BODY_BYTES: a
    chunked body declares no length, and must not be buffered whole first."""
    parts, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise HTTPException(413, f"request body of more than {MAX_BODY_BYTES} bytes is over the limit")
        parts.append(chunk)
    return b"".join(parts)


def _no_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


def key_ok(request: Request) -> bool:
    key = request.app.state.api_key
    if not key:
        return True
    sent = request.headers.get("authorization", "").encode()
    return hmac.compare_digest(sent, f"Bearer {key}".encode())   # constant time


def check_key(request: Request) -> None:
    if not key_ok(request):
        raise HTTPException(401, "missing or wrong API key: send 'Authorization: Bearer <key>'")


def check_admin(request: Request) -> None:
    """/v1/shards and its changes (budgets move layers and recompress shards for every client):
    the admin key where one is set, else the API key."""
    admin = getattr(request.app.state, "admin_key", None)
    if admin is None:
        return check_key(request)
    sent = request.headers.get("authorization", "").encode()
    if not hmac.compare_digest(sent, f"Bearer {admin}".encode()):
        raise HTTPException(401, "missing or wrong admin key: send 'Authorization: Bearer <admin key>'")


async def next_delta(gen):
    """The next Delta, with the engine's refusals as HTTP errors."""
    from serving.router.stream import Overloaded, PipelineDown, RequestTimeout
    try:
        return await gen.__anext__()
    except Overloaded as e:
        raise HTTPException(429, f"server busy: {e}; retry shortly") from e
    except PipelineDown as e:
        raise HTTPException(503, f"pipeline down: {e}") from e
    except RequestTimeout as e:
        raise HTTPException(504, str(e)) from e


_errors = None     # the Prometheus counter of error responses, made on first use (needs Ray)


def count_error(status: int) -> None:
    """One more error response with this status, in `shardserve_http_errors{code}`."""
    global _errors
    import ray
    if not ray.is_initialized():
        return
    if _errors is None:
        from ray.util.metrics import Counter
        _errors = Counter("shardserve_http_errors", "error responses by HTTP status", tag_keys=("code",))
    _errors.inc(tags={"code": str(status)})
