"""Request bodies of /v1/chat/completions and /v1/completions, validated strictly.

Fields OpenAI defines but this server does not implement (tools, logit_bias, ...)
are ignored, as OpenAI ignores unknown fields; the ones it does honour are type-checked in
strict mode (a string "5" is not a number), so a wrong type is a 400, never a silent coercion.
"""
from __future__ import annotations

import json
from typing import Literal, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .errors import APIError

MAX_STOP = 16  # OpenAI allows 4; a few more cost nothing here
MAX_STOP_LEN = 256


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)


class KVCompression(BaseModel):
    """The extension object: which eviction policy and budget this request's conversation uses."""

    model_config = ConfigDict(extra="forbid", strict=True)  # a misspelt key here should not pass silently
    policy: str | None = None
    budget: int | None = None
    question_agnostic: bool = False  # True: the newest message does not steer compression (docs/query_aware.md)


class StreamOptions(_Body):
    include_usage: bool = False


class ResponseFormat(_Body):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: dict | None = None  # {"name": ..., "schema": {...}, "strict": ...}


class ContentPart(_Body):
    type: str
    text: str | None = None


class Message(_Body):
    role: str
    content: Union[str, list[ContentPart], None] = None


class _Common(_Body):
    model: str | None = None  # informational: the model is chosen when the server starts
    max_tokens: int | None = None
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    # llama.cpp server's sampling extensions, the same names and meanings
    top_k: int | None = Field(None, ge=0)
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    repeat_penalty: float | None = Field(None, gt=0.0)
    repeat_last_n: int | None = Field(None, ge=0)
    stop: Union[str, list[str], None] = None
    seed: int | None = None
    n: int | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    kv_compression: KVCompression | None = None
    ignore_eos: bool = False  # llama.cpp server's extension: generate until max_tokens or a stop string
    response_format: ResponseFormat | None = None

    def grammar(self) -> str | None:
        """GBNF the answer must follow: any JSON object for "json_object", the schema's for "json_schema"
        (llama-cpp-python's converters, as its own server uses them)."""
        from llama_cpp.llama_grammar import JSON_GBNF, json_schema_to_gbnf

        rf = self.response_format
        if rf is None or rf.type == "text":
            return None
        if rf.type == "json_object":
            return JSON_GBNF
        schema = (rf.json_schema or {}).get("schema")
        if not isinstance(schema, dict):
            raise APIError(400, "response_format.json_schema.schema: a JSON Schema object is required",
                           code="invalid_value", param="response_format.json_schema.schema")
        try:
            return json_schema_to_gbnf(json.dumps(schema))
        except Exception as e:  # noqa: BLE001 — any schema the converter cannot turn into a grammar
            why = (str(e) or type(e).__name__).splitlines()[0]
            raise APIError(400, f"response_format.json_schema.schema: not supported ({why})",
                           code="invalid_value", param="response_format.json_schema.schema") from None

    def stop_list(self) -> list[str]:
        s = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(s) > MAX_STOP or any(len(x) > MAX_STOP_LEN for x in s):
            raise APIError(400, f"stop: at most {MAX_STOP} sequences of at most {MAX_STOP_LEN} characters",
                           param="stop")
        return [x for x in s if x]


MAX_LOGPROBS = 20  # OpenAI's limit for top_logprobs


class ChatRequest(_Common):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)

    def logprobs_k(self) -> int | None:
        """Alternatives per token to report, or None: no logprobs."""
        if self.top_logprobs is not None and not self.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", code="invalid_value", param="top_logprobs")
        return (self.top_logprobs or 0) if self.logprobs else None


class CompletionRequest(_Common):
    prompt: Union[str, list[str], list[int]]
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)  # the legacy API: alternatives per token

    def logprobs_k(self) -> int | None:
        return self.logprobs


ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


def parse(model: type[_Body], raw: bytes) -> _Body:
    """The validated body, or APIError(400) naming the first problem."""
    try:
        return model.model_validate_json(raw)
    except ValidationError as e:
        err = e.errors(include_url=False)[0]
        if err["type"] == "json_invalid":
            raise APIError(400, "the request body is not valid JSON", code="invalid_json") from None
        loc = ".".join(str(x) for x in err["loc"])
        if err["type"] == "model_type" and not err["loc"]:
            raise APIError(400, "the request body must be a JSON object", code="invalid_type") from None
        if err["type"] == "missing":
            raise APIError(400, f"{loc}: required", code="missing_required_parameter", param=loc) from None
        raise APIError(400, f"{loc}: {err['msg']}", code="invalid_type" if "type" in err["type"] else "invalid_value",
                       param=loc) from None


def chat_messages(req: ChatRequest) -> list[dict]:
    """Messages as the chat template wants them: {role, content} with text content only."""
    out = []
    for i, m in enumerate(req.messages):
        role = ROLES.get(m.role)
        if role is None:
            raise APIError(400, f"messages[{i}].role: {m.role!r} is not supported (system, developer, user, "
                           "assistant)", code="invalid_value", param=f"messages.{i}.role")
        if isinstance(m.content, list):
            parts = []
            for part in m.content:
                if part.type != "text" or part.text is None:
                    raise APIError(400, f"messages[{i}].content: only text parts are supported, got {part.type!r}",
                                   code="invalid_value", param=f"messages.{i}.content")
                parts.append(part.text)
            text = "".join(parts)
        elif m.content is None:
            if role != "assistant":
                raise APIError(400, f"messages[{i}].content: required", code="missing_required_parameter",
                               param=f"messages.{i}.content")
            text = ""
        else:
            text = m.content
        out.append({"role": role, "content": text})
    return out


def check_common(req: _Common, max_tokens_limit: int) -> int | None:
    """Checks shared by both endpoints; returns the requested max_tokens (None: the server default)."""
    if req.n is not None and req.n != 1:
        raise APIError(400, f"n: only n=1 is supported, got {req.n}", code="invalid_value", param="n")
    mt = getattr(req, "max_completion_tokens", None) or req.max_tokens
    if mt is not None and not 1 <= mt <= max_tokens_limit:
        raise APIError(400, f"max_tokens must be in 1..{max_tokens_limit}, got {mt}", code="invalid_value",
                       param="max_tokens")
    if req.seed is not None and not -2**63 <= req.seed < 2**64:
        raise APIError(400, "seed is out of range", code="invalid_value", param="seed")
    return mt

