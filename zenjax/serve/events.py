"""The events a request's handler reads from its queue, written by the scheduler thread.

Order for one request: Progress per prefill piece, Delta per token (the first one ends the prefill), then
exactly one Finished (stop / length / cancelled) or Failed. Each front end (gRPC, HTTP) turns them into
its protocol's messages; they carry nothing transport-specific. The gRPC client (zenjax/client) yields
the same Progress and Delta.
"""
from __future__ import annotations

import dataclasses

__all__ = ["Delta", "Failed", "Finished", "Progress", "Usage"]


@dataclasses.dataclass(frozen=True)
class Progress:
    prefilled: int
    total: int


@dataclasses.dataclass(frozen=True)
class Delta:
    text: str
    token_ids: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    generated_tokens: int
    ttft_s: float
    queue_s: float
    total_s: float
    reused_tokens: int = 0     # prompt tokens whose K/V came from the slot's previous sequence (prefix reuse)


@dataclasses.dataclass(frozen=True)
class Finished:
    reason: str            # "stop" | "length" | "cancelled"
    usage: Usage


@dataclasses.dataclass(frozen=True)
class Failed:
    code: str              # an errors.ServiceError code: "invalid_request" | "unavailable" | "internal"
    message: str
