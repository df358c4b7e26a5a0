"""Service settings: one typed pydantic-settings class read from `XMR_*` environment variables."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


class Settings(BaseSettings):
    """Everything the service reads from its environment; tests pass their own instance."""

    model_config = SettingsConfigDict(env_prefix="XMR_", extra="ignore")

    artifacts: Path = Field(default=Path("artifacts"), description="Output of `xmr train`.")
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    redis_url: str | None = Field(
        default=None, description="Redis URL for sessions; None = in-process store."
    )
    redis_pool_size: int = Field(default=16, ge=1, description="Connections in the Redis pool.")
    redis_timeout_s: float = Field(
        default=0.5, gt=0, description="Redis connect, socket and pool-wait timeout."
    )
    session_ttl_s: int = Field(default=86400, ge=1)
    session_max_items: int = Field(default=50, ge=1)
    max_k: int = Field(default=100, ge=1)
    max_request_items: int = Field(default=500, ge=1)
    max_body_bytes: int = Field(default=65536, ge=1)
    admin_token: str | None = Field(
        default=None, description="Bearer token of POST /admin/reload; None disables it."
    )
    device: Literal["cpu", "cuda", "auto"] = "cpu"
    search: Literal["faiss", "torch"] = "faiss"
    encoder: Literal["auto", "onnx", "torch", "cuda-graphs"] = Field(
        default="auto", description="Session encoder: ONNX Runtime (CPU), eager torch, or torch "
        "replayed from CUDA graphs (GPU); auto = ONNX Runtime on the CPU, CUDA graphs on a GPU.")
    threads: int = Field(
        default=1, ge=1, description="Compute threads of the server: torch, ONNX Runtime, FAISS.")
    workers: int = Field(
        default=1, ge=1, description="Server processes on the port (`xmr serve --workers`), each "
        "with `threads` compute threads and its own copy of the models; more than one needs "
        "`redis_url` so that they share sessions.")
    markets: Annotated[list[str] | None, NoDecode] = Field(
        default=None, description="Comma list of markets to serve (default: all built ones)."
    )
    # On by default: with concurrency >= 8 one encoder call per batch served 5-20x the
    # requests/s of one call per request (CPU and CUDA); with wait 0 a lone request does not
    # wait, batches form from what queues while the previous batch runs.
    batch_max: int = Field(
        default=32, ge=1, description="Most requests merged into one encoder call (1 = off)."
    )
    batch_wait_ms: float = Field(
        default=0.0, ge=0, description="How long a batch waits for more requests to join."
    )
    # A request reading its session from the store when a batch forms is waited for this long
    # at most (measured, concurrency 8, 20 % session requests: their p50 18.7/16.7 -> 11.0/10.3
    # ms, the others' 10.3/9.5 -> 10.5/9.9, requests/s +7-13 %; benchmarks/README.md).
    batch_join_ms: float = Field(
        default=2.0, ge=0, description="How long a batch waits for requests still reading their "
        "session from the store (0 = not at all).")
    batch_in: Literal["auto", "loop", "thread"] = Field(
        default="auto", description="Where a batch is encoded: on the event loop or in one "
        "encoder thread; auto = the loop on the CPU, the thread on a GPU.")
    reload_on_sighup: bool = Field(default=True, description="Reload on SIGHUP (main thread).")
    log_level: str = Field(
        default="INFO", description="Logging level; the app sets logging up with it when its "
        "host has not (e.g. `uvicorn --factory`); `xmr` reads it too.")

    @field_validator("log_level", mode="before")
    @classmethod
    def _known_level(cls, value: object) -> object:
        if isinstance(value, str):
            if value.upper() not in LOG_LEVELS:
                raise ValueError(f"unknown logging level {value!r}; one of {', '.join(LOG_LEVELS)}")
            return value.upper()
        return value

    @field_validator("markets", mode="before")
    @classmethod
    def _split_markets(cls, value: object) -> object:
        if isinstance(value, str):
            return [m.strip() for m in value.split(",") if m.strip()] or None
        return value
