"""The API's request bodies and error: strict types (``"n": 1.5`` is a 400); unknown (extra) fields are ignored."""

from __future__ import annotations

from typing import Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr

Number = Union[StrictInt, StrictFloat]


class APIError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: Optional[str] = None, code: Optional[str] = None, headers: Optional[dict] = None):
        super().__init__(message)
        self.status, self.type, self.param, self.code, self.headers = status, type, param, code, headers

    def body(self) -> dict:
        return {"error": {"message": str(self), "type": self.type, "param": self.param, "code": self.code}}


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)


class TextPart(_Body):
    type: Literal["text"]
    text: StrictStr


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant"]
    content: Union[StrictStr, list[TextPart], None] = None
    name: Optional[StrictStr] = None

    def text(self) -> str:
        return "".join(p.text for p in self.content) if isinstance(self.content, list) else self.content or ""


class StreamOptions(_Body):
    include_usage: StrictBool = False


class _Sampling(_Body):
    model: Optional[StrictStr] = None  # None = the served model
    # None = pocketgpt.chat.CHAT_DEFAULTS; top_k and repetition_penalty are vLLM's extensions of the API
    temperature: Optional[Number] = Field(None, ge=0.0, le=2.0)
    top_p: Optional[Number] = Field(None, gt=0.0, le=1.0)
    top_k: Optional[StrictInt] = Field(None, ge=0)
    repetition_penalty: Optional[Number] = Field(None, gt=0.0, le=10.0)
    n: StrictInt = Field(1, ge=1, le=16)
    stop: Union[StrictStr, list[StrictStr], None] = None
    seed: Optional[StrictInt] = None
    presence_penalty: Number = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: Number = Field(0.0, ge=-2.0, le=2.0)
    stream: StrictBool = False
    stream_options: Optional[StreamOptions] = None


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage]
    max_tokens: Optional[StrictInt] = Field(None, ge=1)
    max_completion_tokens: Optional[StrictInt] = Field(None, ge=1)
    logprobs: StrictBool = False
    top_logprobs: Optional[StrictInt] = Field(None, ge=0, le=20)


class CompletionRequest(_Sampling):
    prompt: Union[StrictStr, list[StrictStr], list[StrictInt], list[list[StrictInt]]]
    max_tokens: StrictInt = Field(16, ge=0)  # OpenAI's default; 0 = score the prompt only (with echo)
    logprobs: Optional[StrictInt] = Field(None, ge=0, le=20)
    echo: StrictBool = False
