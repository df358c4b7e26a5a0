"""Request and response bodies of the HTTP API (pydantic); the OpenAPI docs come from here."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StringConstraints

# Market codes hold no ':' or '.', so session keys stay unambiguous and paths stay plain.
MARKET_PATTERN = r"^[A-Za-z0-9_-]{1,32}$"
SESSION_ID_PATTERN = r"^[A-Za-z0-9_.:-]{1,128}$"

ItemId = Annotated[str, StringConstraints(min_length=1, max_length=256)]
SessionId = Annotated[str, StringConstraints(pattern=SESSION_ID_PATTERN)]


class RecommendRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    items: list[ItemId] = Field(
        default_factory=list, description="The session's item ids, oldest first."
    )
    session_id: SessionId | None = Field(
        default=None, description="Use the stored session; `items` are appended to it first."
    )
    k: int = Field(default=10, ge=1, description="How many items to return (at most XMR_MAX_K).")
    # Strict: `0` or `"no"` is a 422 rather than a silent False (JSON Schema's boolean).
    exclude_seen: StrictBool = Field(default=True,
                                     description="Leave out items already in the session.")
    candidates: list[ItemId] | None = Field(
        default=None, description="Rank only these items (ids not sold in the market are reported "
                          "in unknown_items)."
    )


class ScoredItem(BaseModel):
    item_id: str
    score: float = Field(description="Model score u·v; interactions for the popular fallback.")


class RecommendResponse(BaseModel):
    market: str
    items: list[ScoredItem]
    unknown_items: list[str] = Field(description="Request ids the market's model does not know.")
    fallback: Literal["popular"] | None = Field(
        description="'popular' when no item of the session was known."
    )
    model_version: str
    index_version: str


class EventsRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    items: list[ItemId] = Field(min_length=1, description="Item ids to append, oldest first.")


class SessionResponse(BaseModel):
    market: str
    session_id: str
    items: list[str]


class MarketInfo(BaseModel):
    market: str
    model_version: str
    index_version: str
    n_items: int = Field(description="Items sold in the market (indexed).")
    search: str
    index: str = Field(description="Index kind: flat_ip (exact), ivf_ip or hnsw_ip (approximate, "
                       "built by `xmr index build --index`).")
    index_params: dict[str, int] = Field(
        description="The index's parameters: ivf_ip nlist, nprobe; hnsw_ip m, ef_construction, "
                    "ef_search.")
    exact: bool = Field(description="Whether the search returns the exact top-K.")
    recall_at_10: float | None = Field(
        description="An approximate index's recall@10 against exact search, measured when it "
                    "was built; null where the search is exact.")
    encoder: str = Field(
        description="Session encoder: onnx (ONNX Runtime), torch (eager) or cuda-graphs.")
    device: str
    ranking: str = Field(
        description="two-stage (the index's candidates re-scored by the fitted ranker) or "
                    "model (the model's inner-product ranking: no ranker was fitted).")


class MarketsResponse(BaseModel):
    markets: list[MarketInfo]
    loaded_at: str
    worker: int = Field(description="Process id of the server process that answered (one of "
                        "several with `xmr serve --workers N`).")


class ErrorResponse(BaseModel):
    model_config = ConfigDict(extra="allow")

    error: str = Field(description="A stable code, e.g. unknown_market.")
    message: str


class StatusResponse(BaseModel):
    status: str
