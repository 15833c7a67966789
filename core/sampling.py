"""The domain of every sampling key a request or setup may carry (protocol.md §11.3), defined once.

The llm unit's sampler checks its parameters here, and the HTTP gateways build their request schemas
from the same table, so a value the gateway accepts is one the unit accepts (an API may narrow a range,
as OpenAI's temperature 0..2, never widen it). Every bound rejects NaN and the infinities.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

INT32_MAX = 2**31 - 1
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1  # what the bus encoding (msgpack) carries


@dataclass(frozen=True)
class Domain:
    low: float | None = None
    high: float | None = None
    low_open: bool = False  # low itself excluded
    integer: bool = False

    def text(self) -> str:
        low = "-inf" if self.low is None else f"{self.low:g}"
        high = "inf" if self.high is None else f"{self.high:g}"
        return f"{'(' if self.low_open or self.low is None else '['}{low}, {high}{')' if self.high is None else ']'}"

    def check(self, name: str, value: Any) -> Any:
        """`value` when it is a finite number inside the domain; ValueError naming `name` otherwise."""
        kind = "an integer" if self.integer else "a number"
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{name}: expected {kind}, got {value!r}")
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{name}: {value} is not a finite number")
        if self.integer:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(f"{name}: expected {kind}, got {value!r}")
            value = int(value)
        too_low = self.low is not None and (value <= self.low if self.low_open else value < self.low)
        if too_low or (self.high is not None and value > self.high):
            raise ValueError(f"{name}: {value} is outside {self.text()}")
        return value


# Why each bound: temperature 0 is greedy; a top_p of 0 keeps the single most likely token (as llama.cpp);
# typical_p 0 would keep nothing; penalties divide by repetition_penalty; 0 for top_k and penalty_window
# means "off"; integers stay within what the bus and numpy carry.
DOMAINS: dict[str, Domain] = {
    "temperature": Domain(0.0),
    "top_p": Domain(0.0, 1.0),
    "min_p": Domain(0.0, 1.0),
    "typical_p": Domain(0.0, 1.0, low_open=True),
    "top_k": Domain(0, INT32_MAX, integer=True),
    "repetition_penalty": Domain(0.0, low_open=True),
    "presence_penalty": Domain(),
    "frequency_penalty": Domain(),
    "penalty_decay": Domain(0.0, 1.0, low_open=True),
    "penalty_window": Domain(0, INT32_MAX, integer=True),
    "mirostat_tau": Domain(0.0),
    "mirostat_eta": Domain(0.0, low_open=True),
    "seed": Domain(INT64_MIN, INT64_MAX, integer=True),
    "max_tokens": Domain(1, INT32_MAX, integer=True),
    "logit_bias_value": Domain(),
    "penalty_half_life": Domain(0.0, low_open=True),  # Ai00's `penalty`, in tokens
    "typical_tau": Domain(0.0, low_open=True),  # Ai00's Typical `tau`, a mass (above 1 keeps all)
}

# Ai00 `sampler` objects (http-apis.md §4.4): the keys of each type and their defaults.
AI00_SAMPLERS: dict[str, dict[str, float]] = {
    "Nucleus": {"top_p": 0.5, "top_k": 128, "temperature": 1.0, "presence_penalty": 0.3, "frequency_penalty": 0.3,
                "penalty_decay": 0.99654026},
    "Typical": {"tau": 0.5, "top_k": 128, "temperature": 1.0, "presence_penalty": 0.3, "frequency_penalty": 0.3,
                "penalty_decay": 0.99654026},
    "Mirostat": {"tau": 3.0, "rate": 0.1},
}
# Ai00's top-level fields when no sampler object is given (§4.2).
AI00_FLAT_DEFAULTS: dict[str, float] = {"top_p": 0.5, "top_k": 128, "temperature": 1.0}


def check(name: str, value: Any) -> Any:
    """A sampling value checked against its domain (ValueError naming the key)."""
    return DOMAINS[name].check(name, value)
