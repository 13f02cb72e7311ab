"""Request bodies of the HTTP service: strict (``"1"``, ``1.0`` and ``true`` are not ids), no
unknown fields."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr

from ..validation import MAX_USER_ID, MIN_USER_ID

MAX_K = 1000  # a static bound; the server's ranker enforces its own (1..candidates)
MAX_CANDIDATES = 1000
MAX_BATCH_REQUESTS = 64


class RecommendBody(BaseModel):
    """``POST /v1/recommend``."""

    model_config = ConfigDict(strict=True, extra="forbid")

    user_id: StrictInt = Field(ge=MIN_USER_ID, le=MAX_USER_ID, description="a user of the feature store")
    k: StrictInt = Field(10, ge=1, le=MAX_K, description="items to return, 1 to the ranker's candidates")
    mode: Literal["rcllm", "prefix", "full"] | None = Field(None, description="default: the server's")
    policy: StrictStr | None = Field(None, max_length=64, description="rcllm recompute policy")
    candidates: list[StrictInt] | None = Field(
        None, min_length=1, max_length=MAX_CANDIDATES, description="item ids to rank, not the retriever's"
    )
    timeout_ms: StrictInt | None = Field(
        None, ge=1, description="deadline in the admission queue (at most the server's)"
    )


class BatchBody(BaseModel):
    """``POST /v1/recommend:batch``: several requests, admitted together or refused together."""

    model_config = ConfigDict(strict=True, extra="forbid")

    requests: list[RecommendBody] = Field(min_length=1, max_length=MAX_BATCH_REQUESTS)
