"""Ray Serve application: an OpenAI-compatible FastAPI ingress over the shard pipeline.

    serve run serving.api.app:build_app model=default shards=2

Endpoints: POST /v1/chat/completions, POST /v1/completions (stream or not), GET /v1/models,
GET /v1/shards, GET /healthz (200 only when every shard is loaded and answers).
"""
# No `from __future__ import annotations` here: Serve pickles this class by value, and string
# annotations would be resolved against globals that cloudpickle only fills with names the code
# uses, so FastAPI would lose the `Request` type of route parameters. For the same reason every
# helper the class calls is imported or defined above it (one defined below was a NameError in
# the replica).
import asyncio
import json
import logging
import os
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from ray import serve

from serving import config as app_config
from serving.api import fanout, prometheus, responses, tools
from serving.api.http import check_admin, check_key, count_error, error_response, key_ok, next_delta, parse_body
from serving.api.logprobs import TokenText
from serving.api.schemas import ChatCompletionRequest, CompletionRequest, DetokenizeRequest, ShardPatch, TokenizeRequest
from serving.control.pipeline import BudgetTooSmall, ShardUnanswered
from serving.launch import replica_prefixes
from serving.router.grammar import GrammarError, Grammars
from shards.compat import reusable_direct_ingress, serve_client
from shards.model.source import chat_prompt_ids, open_source
from shards.runtime.actor import stop_pipeline

log = logging.getLogger(__name__)

api = FastAPI(title="shardserve")
# a replaced deployment's replicas drain and stop within Serve's graceful shutdown (20 s by
# default) of this one serving; its shards are reclaimed after this long
STALE_GRACE_S = 60.0
DOC_PATHS = ("/docs", "/redoc", "/openapi.json", "/docs/oauth2-redirect")



@api.exception_handler(HTTPException)
async def _http_error(request: Request, exc: HTTPException):
    kind = {401: "authentication_error", 404: "not_found_error", 429: "rate_limit_error",
            503: "service_unavailable", 504: "timeout"}.get(exc.status_code, "invalid_request_error")
    count_error(exc.status_code)
    resp = error_response(exc.status_code, str(exc.detail), kind)
    if exc.status_code in (429, 503):
        resp.headers["Retry-After"] = "1"
    return resp


class _DocsGuard:
    """With an API key set, the schema and docs pages need it too. Plain ASGI: starlette's
    BaseHTTPMiddleware (`@app.middleware("http")`) would pass every SSE chunk of every reply
    through a memory stream and a task switch of its own, on the router's event loop."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"] in DOC_PATHS and not key_ok(Request(scope)):
            await error_response(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                                 "authentication_error")(scope, receive, send)
            return
        await self.app(scope, receive, send)


api.add_middleware(_DocsGuard)


def _check_bind(cfg: app_config.Config) -> None:
    """Refuse a public HTTP host without an API key (Config.check_bind), the host read from
    the running Serve controller; not running yet, serve.run starts it on 127.0.0.1. A replica
    checks again, so no path (`serve deploy`, a Python serve.run) serves one unchecked."""
    client = serve_client()
    cfg.check_bind(client.http_config.host if client is not None else "127.0.0.1")


def _replica_rank() -> int:
    """This Serve replica's rank among its deployment's replicas (0 .. replicas - 1)."""
    rank = serve.get_replica_context().rank
    return getattr(rank, "rank", rank)


@serve.deployment(max_ongoing_requests=512, ray_actor_options={"num_cpus": 0})
@serve.ingress(api)
class ShardServe:
    async def __init__(self, config: dict | None = None):
        """Validates the config and starts building the engine (attaching to shard actors the
        CLI started, or starting them): /healthz reports on that build and never starts one."""
        cfg = app_config.load(config or {})
        _check_bind(cfg)
        reusable_direct_ingress()   # before Serve starts this replica's own HTTP server, if it does
        api.state.api_key, api.state.admin_key = cfg.key(), cfg.admin_key()
        self.model_name = cfg.model.served_name or "shardserve-" + cfg.model.name
        # data parallel: each Serve replica routes its own pipeline, `<prefix><fp>-r<rank>-shard-<k>`
        self.replica = _replica_rank() if cfg.server.replicas > 1 else 0
        self.cfg = cfg.replace(prefix=replica_prefixes(cfg)[self.replica])
        self._stale = asyncio.ensure_future(self._reclaim_stale(cfg)) if self.replica == 0 else None
        self._build = None  # asyncio.Future of the Engine
        self.created = int(time.time())
        # tokenization and chat templates run off the event loop, one at a time, on their own
        # tokenizer (the router's detokenizes on the loop meanwhile)
        self._tokenize = ThreadPoolExecutor(1, thread_name_prefix="tokenize")
        self._encoder = None
        self._grammars = None     # structured output's compiler, built on first use
        self._build = asyncio.ensure_future(self._build_engine())

    def __del__(self):
        """Serve shuts the replica down: its Compiled Graph (if any) must not outlive it on the
        shard actors, or the next replica's could never start."""
        b = self._build
        if b is not None and b.done() and not b.cancelled() and b.exception() is None:
            b.result().pipeline.close(wait=True)

    async def engine(self):
        """The engine, built once on first use (attaching to shard actors the CLI started).

        The build runs as its own task, shielded: a request that times out or disconnects must
        not cancel it half-way (its actor handles would be dropped and the shards die)."""
        if self._build is None or (self._build.done() and self._build.exception() is not None):
            self._build = asyncio.ensure_future(self._build_engine())
        return await asyncio.shield(self._build)

    async def _build_engine(self):
        """build_engine (which warms the pipeline), then this replica's tokenizer copy and chat
        template: the first request paid them, ~105 ms (copy 102, first render 5 against 0.2)."""
        from serving.launch import build_engine
        engine = await build_engine(self.cfg)
        # the longest prompt + completion: a shard's KV pool, or the model's positions if fewer
        model_cfg = open_source(self.cfg.model.name).config
        positions = getattr(model_cfg, "max_position_embeddings", None)
        self.vocab_size = model_cfg.vocab_size      # the logits' width: structured-output masks cover it
        pool = engine.sched.cfg.kv_blocks * engine.sched.cfg.block_size
        self.max_model_len = min(pool, positions or pool)
        try:
            await self._encode(engine, chat_prompt_ids, [{"role": "user", "content": "Hello"}])
        except HTTPException as e:   # e.g. a model without a chat template: its requests say so
            log.info("chat template not warmed: %s", e.detail)
        return engine

    async def _reclaim_stale(self, cfg: app_config.Config) -> None:
        """Shards of this app's prefix under another fingerprint are a replaced deployment's:
        once this replica's pipeline serves and Serve has drained and stopped the old replicas
        (its graceful shutdown, 20 s by default), they are killed, and their memory with them."""
        try:
            await asyncio.shield(self._build)
        except Exception:
            return     # no pipeline of ours: the old one may be all there is
        await asyncio.sleep(STALE_GRACE_S)
        killed = await asyncio.to_thread(stop_pipeline, cfg.server.prefix, cfg.fingerprint())
        if killed:
            log.info("stopped %d actors of a replaced deployment: %s", len(killed), ", ".join(killed))

    async def check_health(self):
        """Serve's periodic health check: passes while the engine builds; fails when the build
        failed or the pipeline is down and could not be re-placed, so Serve replaces this
        replica, and the new one re-adopts the running shards or starts them afresh."""
        b = self._build
        if b is None or not b.done():
            return
        if b.cancelled() or b.exception() is not None:
            raise RuntimeError(f"engine build failed: {None if b.cancelled() else b.exception()!r}")
        if b.result().down:
            raise RuntimeError(f"pipeline down: {b.result().down}")

    @api.get("/healthz")
    async def healthz(self):
        """ok, or not ok with one word: no key needed, so no internals (they are in the logs and,
        for the admin, in /v1/shards); it never starts a build."""
        b = self._build
        if b is None or not b.done():
            return error_response(503, "starting", "service_unavailable")
        if b.cancelled() or b.exception() is not None:
            log.warning("engine build failed: %r", None if b.cancelled() else b.exception())
            return error_response(503, "not ready", "service_unavailable")
        engine = b.result()
        try:
            if not engine.down:
                await asyncio.wait_for(engine.stats(), timeout=10)
        except Exception as e:  # any shard missing, dead or slow: not healthy
            log.warning("health check: a shard did not answer: %s", e)
            return error_response(503, "not ready", "service_unavailable")
        if engine.down:
            log.warning("health check: pipeline down: %s", engine.down)
            return error_response(503, "pipeline down", "service_unavailable")
        return {"status": "ok"}

    @api.get("/v1/models", dependencies=[Depends(check_key)])
    async def models(self):
        return {"object": "list", "data": [{"id": self.model_name, "object": "model",
                                            "created": self.created, "owned_by": "shardserve"}]}

    @api.get("/v1/shards", dependencies=[Depends(check_admin)])
    async def shards(self, since: float = 0.0):
        """The plan, each shard's measured numbers, the controller's actions (newest last), and
        where decode time goes (steps that ended after `since`, epoch seconds)."""
        engine = await self.engine()
        pipe = engine.pipeline.shards
        stats = await engine.pipeline.reconfigure.stats_or_errors()
        out = []
        for spec, name, st in zip(pipe.plan.shards, pipe.names, stats):
            st = {"error": st} if isinstance(st, str) else st.to_dict()
            out.append({"index": spec.index, "name": name, "kv_tokens": spec.kv_tokens, **st})
        return {"model": self.model_name, "n_layers": pipe.plan.n_layers, "plan": pipe.plan.to_dict(),
                "shards": out, "events": list(pipe.events), "down": engine.down,
                "timing": await engine.timing(since),
                "replica": self.replica, "replicas": self.cfg.server.replicas, "router_pid": os.getpid()}

    @api.patch("/v1/shards/{index}", dependencies=[Depends(check_admin)])
    async def patch_shard(self, index: str, request: Request):
        """{"budget_bytes": N} (or null): the bytes shard `index` (its index, or its actor name,
        which a split does not shift) may hold; the controller acts when its measured use goes
        over the watermark."""
        body = await parse_body(request, ShardPatch)
        engine = await self.engine()
        try:
            st = await engine.set_budget(index, body.budget_bytes)
        except IndexError as e:
            raise HTTPException(404, str(e)) from e
        except BudgetTooSmall as e:
            raise HTTPException(400, str(e)) from e
        except ShardUnanswered as e:
            raise HTTPException(503, str(e)) from e
        return st.to_dict()

    @api.post("/v1/chat/completions", dependencies=[Depends(check_key)])
    async def chat(self, request: Request):
        return await self._chat(await parse_body(request, ChatCompletionRequest))

    async def _chat(self, body: ChatCompletionRequest):
        engine = await self._engine_for(body)
        messages, mode = body.chat(), body.tool_mode
        if mode is not None:        # tools through the template where it has a tools section
            functions = body.functions()
            if "tools" in (engine.tokenizer.chat_template or ""):
                specs = [{"type": "function", "function": f} for f in functions]
                ids = await self._encode(engine, lambda tok, m: chat_prompt_ids(tok, m, tools=specs), messages)
            else:
                ids = await self._encode(engine, chat_prompt_ids, tools.with_tools(messages, functions))
        else:
            ids = await self._encode(engine, chat_prompt_ids, messages)
        text = self._token_text(engine, body.logprobs)
        names = frozenset(f.function.name for f in body.tools or []) if mode else frozenset()
        return await self._respond(engine, [responses.View(j, True, text, prompt_ids=ids, tools=names,
                                                           forced=mode not in (None, "auto")) for j in range(body.n)], body)

    @api.post("/v1/completions", dependencies=[Depends(check_key)])
    async def completions(self, request: Request):
        body = await parse_body(request, CompletionRequest)
        engine = await self._engine_for(body)
        text = self._token_text(engine, body.logprobs is not None)
        views = []
        for i, prompt in enumerate(body.prompts()):
            if isinstance(prompt, str):
                ids = await self._encode(engine, lambda tok, t: tok.encode(t), prompt)
            else:
                ids = self._known_ids(engine, prompt)
            echo = None
            if body.echo:
                echo = prompt if isinstance(prompt, str) else await self._decode(engine, ids)
            views += [responses.View(i * body.n + j, False, text, echo, ids, drop=body.max_tokens == 0, prompt=i)
                      for j in range(body.n)]
        return await self._respond(engine, views, body)

    def _token_text(self, engine, wanted: bool):
        """Token texts for log probabilities (one cache per replica), or None when not wanted."""
        if not wanted:
            return None
        if getattr(self, "_texts", None) is None:
            self._texts = TokenText(engine.tokenizer.decode)
        return self._texts

    @staticmethod
    def _known_ids(engine, ids: list[int]) -> list[int]:
        vocab = len(engine.tokenizer)
        bad = [t for t in ids if t >= vocab]
        if bad or not ids:
            raise HTTPException(400, f"token ids {bad[:5]} are outside the vocabulary of {vocab} tokens"
                                if bad else "the prompt is empty")
        return ids

    async def _compile(self, engine, constraint):
        """A request's output constraint compiled in the tokenizer thread (None for none); one
        that does not compile is a 400 naming why."""
        if constraint is None:
            return None

        def build():
            if self._grammars is None:
                self._grammars = Grammars(engine.tokenizer, self.vocab_size, engine.eos)
            return self._grammars.compile(constraint)
        try:
            return await asyncio.get_running_loop().run_in_executor(self._tokenize, build)
        except GrammarError as e:
            raise HTTPException(400, str(e)) from e

    async def _decode(self, engine, ids: list[int]) -> str:
        return await asyncio.get_running_loop().run_in_executor(self._tokenize, engine.tokenizer.decode, ids)

    @api.post("/tokenize", dependencies=[Depends(check_key)])
    async def tokenize(self, request: Request):
        """vLLM's /tokenize: a prompt's (or a chat's) token ids, as /v1/completions (or
        /v1/chat/completions) would feed them, and the longest prompt + completion served."""
        body = await parse_body(request, TokenizeRequest)
        engine = await self._engine_for(body)
        if body.messages is not None:
            ids = await self._encode(engine, lambda tok, a: chat_prompt_ids(tok, *a),
                                     (body.chat(), body.add_generation_prompt), empty_ok=True)
        else:
            ids = await self._encode(engine, lambda tok, a: tok.encode(a[0], add_special_tokens=a[1]),
                                     (body.prompt, body.add_special_tokens), empty_ok=True)
        out = {"count": len(ids), "max_model_len": self.max_model_len, "tokens": ids}
        if body.return_token_strs:
            out["token_strs"] = self._encoder.convert_ids_to_tokens(ids)
        return out

    @api.get("/metrics", dependencies=[Depends(check_key)])
    async def metrics(self):
        """Prometheus text: the shardserve series of every Ray node (serving/api/prometheus.py)."""
        return PlainTextResponse(await prometheus.scrape(), media_type="text/plain; version=0.0.4")

    @api.get("/tokenizer_info", dependencies=[Depends(check_key)])
    async def tokenizer_info(self):
        """vLLM's /tokenizer_info: the special tokens and chat template, which evaluation
        harnesses (lm-eval's remote tokenizer) read beside /tokenize and /detokenize."""
        engine = await self.engine()
        tok = engine.tokenizer
        return {"tokenizer_class": type(tok).__name__, "eos_token": tok.eos_token, "bos_token": tok.bos_token,
                "pad_token": tok.pad_token, "unk_token": tok.unk_token, "chat_template": tok.chat_template,
                "model_max_length": self.max_model_len, "vocab_size": len(tok)}

    @api.post("/detokenize", dependencies=[Depends(check_key)])
    async def detokenize(self, request: Request):
        """vLLM's /detokenize: token ids back to text; an id outside the vocabulary is a 400."""
        body = await parse_body(request, DetokenizeRequest)
        engine = await self._engine_for(body)
        vocab = len(engine.tokenizer)
        bad = [t for t in body.tokens if t >= vocab]
        if bad:
            raise HTTPException(400, f"token ids {bad[:5]} are outside the vocabulary of {vocab} tokens")
        return {"prompt": await self._decode(engine, body.tokens)}

    async def chat_handle(self, body: dict) -> dict:
        """In-cluster entry for DeploymentHandle callers: an OpenAI chat body in, response out."""
        req = ChatCompletionRequest(**{**body, "stream": False})
        resp = await self._chat(req)
        return json.loads(resp.body)

    async def _engine_for(self, body):
        if body.model not in (None, self.model_name):
            raise HTTPException(404, f"model {body.model!r} does not exist; this server has {self.model_name!r}")
        return await self.engine()

    async def _encode(self, engine, fn, arg, empty_ok: bool = False) -> list[int]:
        """Token ids, computed in the tokenizer thread; a template or tokenizer error is a 400,
        and so is an empty prompt unless empty_ok."""
        if self._encoder is None:
            import copy
            self._encoder = copy.deepcopy(engine.tokenizer)
        try:
            ids = await asyncio.get_running_loop().run_in_executor(self._tokenize, fn, self._encoder, arg)
        except Exception as e:
            raise HTTPException(400, f"could not tokenize the request: {type(e).__name__}: {str(e)[:300]}") from e
        if not ids and not empty_ok:
            raise HTTPException(400, "the prompt is empty after tokenization")
        return ids

    async def _respond(self, engine, views: list, body):
        """Every choice's stream started together (429 / 503 / 504 before any byte is sent);
        then one body, or one merged event stream."""
        try:
            params = [body.choice_sampling(v.index - v.prompt * body.n) for v in views]
            for v, p in zip(views, params):
                engine.check(len(v.prompt_ids), p.max_tokens)
        except ValueError as e:
            raise HTTPException(400, str(e)) from e
        grammar = await self._compile(engine, body.constraint())
        # a prompt's choices are started together; the router prefills it once (Scheduler._behind)
        gens = [engine.generate(v.prompt_ids, p, grammar and self._grammars.matcher(grammar))
                for v, p in zip(views, params)]
        rid = ("chatcmpl-" if views[0].chat else "cmpl-") + uuid.uuid4().hex[:24]
        firsts = await fanout.start(gens, next_delta)
        if body.stream:
            return StreamingResponse(self._sse(gens, firsts, views, rid, body.include_usage),
                                     media_type="text/event-stream")
        try:
            deltas = await fanout.drain(gens, firsts, next_delta)
        finally:
            await fanout.close(gens)   # a client gone mid-request aborts it and frees its KV
        for ds in deltas:
            if ds[-1].finish_reason == "error":
                raise HTTPException(503, ds[-1].error)
        return JSONResponse(responses.completion_body(rid, self.model_name, views, deltas))

    async def _sse(self, gens, firsts, views, rid, include_usage):
        events = fanout.merged(gens, firsts, next_delta)
        try:
            async for event in responses.sse(events, views, rid, self.model_name, include_usage):
                yield event
        except HTTPException as e:    # timed out, or the pipeline went down mid-stream
            yield responses.error_event(str(e.detail))
            yield "data: [DONE]\n\n"
        finally:
            await events.aclose()
            await fanout.close(gens)  # client gone mid-stream: the engine aborts and frees its KV


def build_app(args: dict) -> serve.Application:
    """`serve run deploy/serve.yaml`, or `serve run serving.api.app:build_app model=default shards=2`:
    args are validated (serving/config.py) before anything starts; `replicas` Serve replicas,
    each routing its own pipeline, balanced by Serve's router (fewest ongoing requests of two)."""
    # `serve run ... shards=2` passes strings, a YAML file typed values: pydantic takes both
    cfg = app_config.load(args)
    _check_bind(cfg)
    return ShardServe.options(num_replicas=cfg.server.replicas).bind(cfg.model_dump(exclude_defaults=True))
