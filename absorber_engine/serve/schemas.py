"""Request bodies of the OpenAI-compatible endpoints, checked strictly (a string is not a number,
a float is not an integer), and the conversion of a validation failure into a 400 naming the field.

Fields the server does not use (logprobs, presence_penalty, ...) are accepted and ignored, as
OpenAI-compatible servers commonly do; a used field of the wrong type or out of range is refused.
"""

from __future__ import annotations

import json
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .errors import APIError, bad_request

# OpenAI's own limits on these fields.
MAX_STOP_SEQUENCES = 4


class _Body(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class StreamOptions(_Body):
    include_usage: bool = False


class _Sampling(_Body):
    model: str
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    max_tokens: int | None = Field(default=None, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=0, lt=2**63)     # refused here, before any session is touched
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int | None = None
    user: str | None = None
    recite: bool = False               # ours: generate(..., recite=True), answers read from a recital

    @field_validator("n")
    @classmethod
    def _one_choice(cls, n):
        if n is not None and n != 1:
            raise ValueError("only n = 1 is supported")
        return n

    @field_validator("stop")
    @classmethod
    def _stops(cls, stop):
        stops = [stop] if isinstance(stop, str) else (stop or [])
        if len(stops) > MAX_STOP_SEQUENCES:
            raise ValueError(f"at most {MAX_STOP_SEQUENCES} stop sequences")
        if any(s == "" for s in stops):
            raise ValueError("a stop sequence must not be empty")
        return stop

    def stop_strings(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


class CompletionRequest(_Sampling):
    # One prompt: text or token ids (OpenAI also takes a one-element list of either).
    prompt: str | list[int] | list[str] | list[list[int]]

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, prompt):
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
            if len(prompt) != 1:
                raise ValueError("one prompt per request (a list of several prompts is not supported)")
            prompt = prompt[0]
        if len(prompt) == 0:
            raise ValueError("the prompt is empty")
        return prompt


class TextPart(_Body):
    type: Literal["text"]
    text: str


class Message(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class ChatRequest(_Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)


class AbsorbRequest(_Body):
    text: str | None = None
    tokens: list[int] | None = None
    flush: bool = False

    def payload(self):
        if (self.text is None) == (self.tokens is None):
            raise bad_request("give exactly one of `text` and `tokens`", param="text")
        data = self.text if self.text is not None else self.tokens
        if len(data) == 0:
            raise bad_request("the document is empty", param="text" if self.text is not None else "tokens")
        return data


def parse(model: type[_Body], raw: bytes):
    """raw request bytes -> a checked request, or an APIError (400) saying what is wrong and where."""
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise bad_request(f"the request body is not valid JSON: {exc}", code="invalid_json") from None
    except RecursionError:
        raise bad_request("the request body nests arrays or objects too deeply", code="invalid_json") from None
    try:    # "\ud800" is valid JSON but decodes to a lone surrogate, which no tokenizer or file name takes
        json.dumps(data, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise bad_request("the request body holds a lone UTF-16 surrogate (an unpaired \\ud800-\\udfff "
                          "escape): not text", code="invalid_json") from None
    if not isinstance(data, dict):
        raise bad_request(f"the request body must be a JSON object, got {type(data).__name__}", code="invalid_json")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise _validation_error(exc) from None


def _validation_error(exc: ValidationError) -> APIError:
    err = exc.errors()[0]
    loc = [p for p in err["loc"] if not (isinstance(p, str) and p.startswith(("function-", "constrained-")))]
    param = _dotted(loc)
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "missing":
        return bad_request(f"missing required parameter: `{param}`", param=param, code="missing_required_parameter")
    return bad_request(f"invalid value for `{param}`: {msg}", param=param, code="invalid_value")


def _dotted(loc) -> str:
    out = ""
    for p in loc:
        if isinstance(p, int):
            out += f"[{p}]"
        elif p in ("str", "list[int]", "list[str]", "list[list[int]]", "list[TextPart]", "none", "is-instance"):
            continue             # union branch names pydantic puts in the location
        else:
            out += ("." if out else "") + str(p)
    return out
