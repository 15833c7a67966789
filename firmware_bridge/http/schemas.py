"""What the request bodies and error shapes of every API have in common, as pydantic types.

Bodies are open (`extra="allow"`): clients send fields of newer API versions, which are ignored unless a
route says otherwise. Sampling fields take their domain from core/sampling.py (the one the llm unit
checks), narrowed where an API documents a smaller range; the mapping code in each API module then only
decides what the model supports.
"""
from __future__ import annotations

from typing import Annotated, Any, Optional

from pydantic import BaseModel, ConfigDict, Field

from core import sampling


class Body(BaseModel):
    model_config = ConfigDict(extra="allow")

    def fields(self) -> dict[str, Any]:
        """The fields the client sent (none of the defaults), as the plain dict the mapping code reads."""
        return self.model_dump(exclude_none=True)


def bounded(name: str, low: float | None = None, high: float | None = None, description: str | None = None) -> Any:
    """An optional request field for sampling key `name`: its domain, narrowed to low..high by an API."""
    domain = sampling.DOMAINS[name]
    if domain.low is not None:
        low = domain.low if low is None else max(low, domain.low)
    if domain.high is not None:
        high = domain.high if high is None else min(high, domain.high)
    bounds: dict[str, Any] = {}
    if low is not None:
        bounds["gt" if domain.low_open and low == domain.low else "ge"] = low
    if high is not None:
        bounds["le"] = high
    if domain.integer:
        return Annotated[Optional[int], Field(strict=True, description=description, **bounds)]
    return Annotated[Optional[float], Field(strict=True, allow_inf_nan=False, description=description, **bounds)]


Temperature = bounded("temperature")
TopP = bounded("top_p")
TopK = bounded("top_k")
MinP = bounded("min_p")
TypicalP = bounded("typical_p")
Seed = bounded("seed")
MaxTokens = bounded("max_tokens")
RepetitionPenalty = bounded("repetition_penalty")
Penalty = bounded("presence_penalty")
Stop = Optional[str | list[str]]
Texts = str | list[str]  # one text or several


class OpenAIErrorDetail(BaseModel):
    message: str
    type: str
    param: Optional[str] = None
    code: Optional[str] = None


class OpenAIError(BaseModel):
    """OpenAI's error body; `code` and `message` beside `error` are DecentralGPT's (http.openai.dbc_fields)."""
    error: OpenAIErrorDetail
    code: Optional[int] = None
    message: Optional[str] = None
