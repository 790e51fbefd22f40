"""OpenAI-compatible request bodies (pydantic only here, at the HTTP boundary)."""
from __future__ import annotations

import dataclasses
import json
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from serving.api import tools
from serving.router.grammar import Constraint
from shards.model.sampling import choice_seed
from shards.model.step import DEFAULT_MAX_TOKENS, MAX_LOGPROBS, SamplingParams

MAX_TOKENS_LIMIT = 4096
MAX_STOP_CHARS = 256
# OpenAI fields this server does not implement: refused by name, never silently ignored
# (a value equal to OpenAI's default is accepted: SDKs send some of them unasked)
UNSUPPORTED = {"functions": None, "function_call": None,
               "logit_bias": None,
               "presence_penalty": 0, "frequency_penalty": 0, "audio": None, "modalities": None,
               "prediction": None, "best_of": None, "suffix": None}
# accepted and without effect here (bookkeeping fields of the OpenAI API)
IGNORED = {"user", "metadata", "store", "parallel_tool_calls", "service_tier"}
MAX_DETOKENIZE = 1 << 20     # token ids one /detokenize takes
MAX_N = 8                    # choices per prompt
MAX_GRAMMAR_CHARS = 1 << 16  # a regex or grammar's length
MAX_PROMPTS = 64             # prompts one /v1/completions takes (a list of them: one choice each)


class _Strict(BaseModel):
    """A request part that refuses fields it does not name."""

    model_config = ConfigDict(extra="forbid")


class TextPart(_Strict):
    """One part of a list-of-parts message content; only text parts are served."""

    type: Literal["text"]
    text: str


class FunctionCall(_Strict):
    name: str
    arguments: str = "{}"        # JSON text, as OpenAI sends it


class ToolCall(_Strict):
    """An earlier assistant turn's call, as a client sends the conversation back."""

    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Strict):
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None     # assistant turns that called tools
    tool_call_id: str | None = None              # a tool's result: the call it answers

    @model_validator(mode="after")
    def _content_or_calls(self):
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise ValueError(f"a {self.role} message needs content (only an assistant's with tool_calls may omit it)")
        if self.tool_calls and self.role != "assistant":
            raise ValueError("only assistant messages carry tool_calls")
        return self

    @field_validator("content", mode="before")
    @classmethod
    def _text_parts_only(cls, v):
        for part in v if isinstance(v, list) else ():
            if isinstance(part, dict) and part.get("type") not in ("text", None):
                raise ValueError(f"content parts of type {part.get('type')!r} are not supported (text only)")
        return v

    def text(self) -> str:
        """The content as text; an assistant's calls written as the model writes them."""
        text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content or [])
        if self.tool_calls:
            calls = tools.call_text([c.model_dump() for c in self.tool_calls])
            text = f"{text}\n{calls}" if text else calls
        return text


class FunctionDef(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict | None = None    # a JSON schema of the arguments object
    strict: bool | None = None


class Tool(_Strict):
    type: Literal["function"]
    function: FunctionDef


class NamedFunction(_Strict):
    name: str


class NamedToolChoice(_Strict):
    type: Literal["function"]
    function: NamedFunction


class StreamOptions(_Strict):
    include_usage: bool = False      # a last chunk with `usage` and no choices; `usage: null` before


class JsonSchemaFormat(_Strict):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)   # `schema` shadows a BaseModel name
    name: str = Field("response", max_length=64)
    description: str | None = None
    schema_: dict = Field(default_factory=dict, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Strict):
    """OpenAI's response_format: text, any JSON object, or JSON that validates against a schema."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_with_its_type(self):
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise ValueError("response_format json_schema needs its json_schema, and only it")
        return self


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str | None = None
    max_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS_LIMIT)
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS_LIMIT)
    temperature: float = Field(1.0, ge=0.0, le=2.0, allow_inf_nan=False)
    top_p: float = Field(1.0, gt=0.0, le=1.0, allow_inf_nan=False)
    top_k: int = Field(0, ge=0, le=1 << 20)
    seed: int | None = Field(None, ge=-(1 << 63), lt=1 << 64)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=MAX_N)     # choices; the prompt is prefilled once and its blocks copied
    response_format: ResponseFormat | None = None
    # vLLM's names for the other constraints (at most one constraint a request)
    guided_json: dict | str | None = None
    guided_regex: str | None = Field(None, min_length=1, max_length=MAX_GRAMMAR_CHARS)
    guided_choice: list[Annotated[str, Field(min_length=1)]] | None = Field(None, min_length=1, max_length=256)
    guided_grammar: str | None = Field(None, min_length=1, max_length=MAX_GRAMMAR_CHARS)

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, v):
        stops = [v] if isinstance(v, str) else v or []
        if len(stops) > 4:
            raise ValueError("at most 4 stop strings")
        if any(not x or len(x) > MAX_STOP_CHARS for x in stops):
            raise ValueError(f"stop strings must be 1 to {MAX_STOP_CHARS} characters")
        return v

    @model_validator(mode="after")
    def _refuse_unsupported(self):
        for name, value in (self.model_extra or {}).items():
            if name in UNSUPPORTED:
                if value != UNSUPPORTED[name]:
                    raise ValueError(f"field {name!r} is not supported by this server")
            elif name not in IGNORED:
                raise ValueError(f"unknown field {name!r}")
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed with stream: true")
        given = [n for n in ("guided_json", "guided_regex", "guided_choice", "guided_grammar") if getattr(self, n)]
        if self.response_format is not None and self.response_format.type != "text":
            given.append("response_format")
        if len(given) > 1:
            raise ValueError(f"at most one output constraint a request, got {', '.join(given)}")
        return self

    def constraint(self) -> Constraint | None:
        """The output constraint the request asks for, if any (serving/router/grammar.py)."""
        rf = self.response_format
        if rf is not None and rf.type == "json_object":
            return Constraint("json_object")
        if rf is not None and rf.type == "json_schema":
            return Constraint("json_schema", json.dumps(rf.json_schema.schema_), rf.json_schema.strict is not False)
        if self.guided_json is not None:
            text = self.guided_json if isinstance(self.guided_json, str) else json.dumps(self.guided_json)
            return Constraint("json_schema", text)
        if self.guided_regex:
            return Constraint("regex", self.guided_regex)
        if self.guided_choice:
            return Constraint("choice", json.dumps(self.guided_choice))
        if self.guided_grammar:
            return Constraint("grammar", self.guided_grammar)
        return None

    def choice_sampling(self, choice: int) -> SamplingParams:
        """Choice `choice`'s sampling: seeded ones reproducible per index (sampling.choice_seed)."""
        p = self.sampling()
        return dataclasses.replace(p, seed=choice_seed(p.seed, choice))

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    def sampling(self, default_max: int = DEFAULT_MAX_TOKENS) -> SamplingParams:
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        logprobs, prompt_logprobs = self.logprob_counts()
        return SamplingParams(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
                              seed=self.seed, max_tokens=self.max_completion_tokens or self.max_tokens
                              or default_max, stop=stop, logprobs=logprobs, prompt_logprobs=prompt_logprobs)

    def logprob_counts(self) -> tuple[int | None, int | None]:
        """Alternatives per generated token and per prompt token (None: no log probabilities)."""
        return None, None


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1, max_length=1024)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    tools: list[Tool] | None = Field(None, min_length=1, max_length=128)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None

    @model_validator(mode="after")
    def _top_needs_logprobs(self):
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        return self

    @model_validator(mode="after")
    def _tool_choice_fits_tools(self):
        names = [t.function.name for t in self.tools or []]
        if self.tool_choice not in (None, "none") and not names:
            raise ValueError("tool_choice needs tools")
        if isinstance(self.tool_choice, NamedToolChoice) and self.tool_choice.function.name not in names:
            raise ValueError(f"tool_choice names function {self.tool_choice.function.name!r}; "
                             f"the tools are {', '.join(names)}")
        if self.tool_mode not in (None, "auto") and super().constraint() is not None:
            raise ValueError("a required or named tool_choice constrains the reply: no other output constraint")
        return self

    @property
    def tool_mode(self) -> str | None:
        """None (no tools, or tool_choice none), "auto", "required", or the function named."""
        if not self.tools or self.tool_choice == "none":
            return None
        if isinstance(self.tool_choice, NamedToolChoice):
            return self.tool_choice.function.name
        return self.tool_choice or "auto"

    def functions(self) -> list[dict]:
        return [t.function.model_dump(exclude_none=True) for t in self.tools or []]

    def constraint(self) -> Constraint | None:
        """A required or named tool_choice: a call whose arguments validate (tools.call_schema)."""
        mode = self.tool_mode
        if mode in (None, "auto"):
            return super().constraint()
        schema = tools.call_schema(self.functions(), None if mode == "required" else mode)
        return Constraint("json_schema", json.dumps(schema))

    def chat(self) -> list[dict]:
        """Messages as the chat template takes them (text parts joined)."""
        return [{"role": m.role, "content": m.text()} for m in self.messages]

    def logprob_counts(self) -> tuple[int | None, int | None]:
        return (self.top_logprobs or 0) if self.logprobs else None, None


class CompletionRequest(_Sampling):
    # a string, a list of strings, token ids, or a list of token-id lists: one choice a prompt
    prompt: str | list[str] | list[Annotated[int, Field(ge=0)]] | list[list[Annotated[int, Field(ge=0)]]]
    # 0 with echo: score the prompt only (its log probabilities), generate nothing
    max_tokens: int | None = Field(None, ge=0, le=MAX_TOKENS_LIMIT)
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False          # the prompt's text (and log probabilities) before the completion's

    @model_validator(mode="after")
    def _prompts(self):
        if isinstance(self.prompt, list) and not 0 < len(self.prompt) <= MAX_PROMPTS:
            raise ValueError(f"prompt must be a string, or a list of 1 to {MAX_PROMPTS} prompts or token ids")
        if len(self.prompts()) * self.n > MAX_PROMPTS:
            raise ValueError(f"{len(self.prompts())} prompts x n {self.n} is over {MAX_PROMPTS} choices")
        if self.max_tokens == 0 and not self.echo:
            raise ValueError("max_tokens 0 needs echo: true (it scores the prompt, generates nothing)")
        return self

    def prompts(self) -> list[str | list[int]]:
        """Each prompt as text or token ids."""
        p = self.prompt
        if isinstance(p, str) or (p and isinstance(p[0], int)):
            return [p]
        return list(p)

    def logprob_counts(self) -> tuple[int | None, int | None]:
        return self.logprobs, self.logprobs if self.echo else None

    def sampling(self, default_max: int = DEFAULT_MAX_TOKENS) -> SamplingParams:
        """max_tokens 0 samples one token from the prefill that is then dropped: the prompt's
        log probabilities need the prefill, which ends in a sample anyway."""
        if self.max_tokens == 0:
            return self.model_copy(update={"max_tokens": 1}).sampling(default_max)
        return super().sampling(default_max)


class TokenizeRequest(_Strict):
    """POST /tokenize (vLLM's shape): a `prompt`, or chat `messages` through the template."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(None, min_length=1, max_length=1024)
    add_special_tokens: bool = True          # prompt: the tokenizer's BOS and the like
    add_generation_prompt: bool = True       # messages: end where the assistant answers
    return_token_strs: bool = False

    @model_validator(mode="after")
    def _one_input(self):
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of prompt and messages")
        return self

    def chat(self) -> list[dict]:
        return [{"role": m.role, "content": m.text()} for m in self.messages or []]


class DetokenizeRequest(_Strict):
    """POST /detokenize (vLLM's shape): token ids back to text."""

    model: str | None = None
    tokens: list[Annotated[int, Field(ge=0)]] = Field(max_length=MAX_DETOKENIZE)


class ShardPatch(_Strict):
    """PATCH /v1/shards/{k}: the bytes shard k may hold for its tensors (null: no budget)."""

    budget_bytes: int | None = Field(..., ge=0)
