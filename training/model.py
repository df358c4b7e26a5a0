"""Bert4XMR in retrieval form (Hu et al., "Bert4XMR: Cross-Market Recommendation with
Bidirectional Encoder Representations from Transformer", arXiv 2305.15145).

An item in market m enters the encoder as LayerNorm(E_item[i] + E_market[m]); a bidirectional
transformer encodes the session (a set: no position embedding by default); the user vector is the
mean of the encoder outputs over real positions. The score of item i is the inner product with
the market-shifted item vector v_m(i) = LayerNorm(E_item[i] + E_market[m]), so an inner-product
index over {v_m(i)} returns exactly the model's own top-K.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import torch
from torch import nn

from training.vocab import PAD

POOLINGS = ("mean", "recency")
PLACEMENTS = ("both", "input", "output")


@dataclass(frozen=True)
class ModelConfig:
    n_rows: int  # item embedding rows, padding row 0 included
    n_markets: int
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 2
    d_ff: int = 256
    dropout: float = 0.2
    max_len: int = 50
    market_embedding: bool = True
    position_embedding: bool = False
    output_projection: bool = False  # v_m(i) = W LayerNorm(E_item[i] + E_market[m])
    # "mean": the paper's plain mean of the outputs; "recency": a weighted mean whose weights
    # are learned per age (0 = newest item), a softmax over the session's real positions.
    pooling: str = "mean"
    # Where the market embedding enters: "both" (the paper: the encoder's input and the item
    # vectors), "input" (the encoder's input only) or "output" (the item vectors only).
    market_placement: str = "both"

    def __post_init__(self) -> None:
        if self.n_rows < 2 or self.n_markets < 1:
            raise ValueError(f"need at least one item and one market, got {self}")
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, not {self.pooling!r}")
        if self.market_placement not in PLACEMENTS:
            raise ValueError(f"market_placement must be one of {PLACEMENTS}, "
                             f"not {self.market_placement!r}")
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} not divisible by n_heads={self.n_heads}")

    def to_dict(self) -> dict[str, object]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, object]) -> ModelConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown model config keys {sorted(unknown)}")
        return cls(**data)  # type: ignore[arg-type]


class Bert4XMR(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        d = config.d_model
        self.item_emb = nn.Embedding(config.n_rows, d, padding_idx=PAD)
        self.market_emb = nn.Embedding(config.n_markets, d)
        self.position_emb = nn.Embedding(config.max_len, d) if config.position_embedding else None
        self.input_norm = nn.LayerNorm(d)
        self.dropout = nn.Dropout(config.dropout)
        layer = nn.TransformerEncoderLayer(
            d,
            config.n_heads,
            config.d_ff,
            config.dropout,
            activation="gelu",
            batch_first=True,
            norm_first=True,
        )
        self.encoder = nn.TransformerEncoder(layer, config.n_layers, enable_nested_tensor=False)
        self.output_norm = nn.LayerNorm(d)
        self.output_proj = nn.Linear(d, d, bias=False) if config.output_projection else None
        # Zero logits: the recency pooling starts as the plain mean.
        self.pool_logits = (
            nn.Parameter(torch.zeros(config.max_len)) if config.pooling == "recency" else None
        )
        nn.init.normal_(self.item_emb.weight, std=0.02)
        nn.init.normal_(self.market_emb.weight, std=0.02)
        with torch.no_grad():
            self.item_emb.weight[PAD].zero_()
        if not config.market_embedding:
            self.market_emb.weight.requires_grad_(False)
            nn.init.zeros_(self.market_emb.weight)

    def shifted(self, items: torch.Tensor, market: torch.Tensor, side: str) -> torch.Tensor:
        """LayerNorm(E_item + E_market) for the `side` ("input" or "output") where the market
        embedding is placed, LayerNorm(E_item) on the other: items (B, T) or (N,), market
        broadcastable."""
        x = self.item_emb(items)
        if self.config.market_placement in ("both", side):
            x = x + self.market_emb(market)
        return self.input_norm(x)

    def encode(self, items: torch.Tensor, market: torch.Tensor) -> torch.Tensor:
        """User vectors: items (B, T) rows with PAD=0 padding, market (B,) -> (B, D)."""
        items = items[:, -self.config.max_len :]
        real = items != PAD  # (B, T)
        ages = ages_of(real)  # (B, T)
        x = self.shifted(items, market[:, None], "input")  # (B, T, D)
        if self.position_emb is not None:
            x = x + self.position_emb(ages)  # (B, T, D)
        x = self.encoder(self.dropout(x), src_key_padding_mask=~real)  # (B, T, D)
        x = self.output_norm(x)
        return pool(x, real, ages, self.pool_logits)

    def item_vectors(self, market: int | torch.Tensor) -> torch.Tensor:
        """Market-shifted vectors of every row (N, D); row 0 (padding) is never a candidate."""
        rows = torch.arange(self.config.n_rows, device=self.item_emb.weight.device)
        market_t = torch.as_tensor(market, device=rows.device)
        return self.output_vectors(self.shifted(rows, market_t, "output"))

    def output_vectors(self, shifted: torch.Tensor) -> torch.Tensor:
        return self.output_proj(shifted) if self.output_proj is not None else shifted

    def forward(
        self, items: torch.Tensor, market: torch.Tensor, rows: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Scores of every row for each session: (B, T), (B,) -> (B, N).

        With `rows` (C,) (one market per batch), the two factors instead: the user vectors
        (B, D) and the vectors of those rows (C, D), so that a sampled softmax scores its own
        candidates without a (B, N) matrix (training.sampled_softmax)."""
        user = self.encode(items, market)  # (B, D)
        if rows is not None:
            return user, self.output_vectors(self.shifted(rows, market[0], "output"))
        # One market per batch is the common case; otherwise score per market.
        if bool((market == market[0]).all()):
            return user @ self.item_vectors(market[0]).T  # (B, N)
        vectors = self.output_vectors(
            self.shifted(
                torch.arange(self.config.n_rows, device=items.device)[None, :], market[:, None],
                "output",
            )
        )  # (B, N, D)
        return torch.einsum("bd,bnd->bn", user, vectors)


def ages_of(real: torch.Tensor) -> torch.Tensor:
    """(B, T) age of each position of right-padded sessions (`real` (B, T): not padding),
    counted back from the newest item (0) so that recency means the same at any length;
    padding positions get 0 and must be masked by the caller."""
    lengths = real.sum(1, keepdim=True)  # (B, 1): the newest real item is at lengths - 1
    return (lengths - 1 - torch.arange(real.shape[1], device=real.device)).clamp(min=0)


def pool(x: torch.Tensor, real: torch.Tensor, ages: torch.Tensor,
         logits: torch.Tensor | None) -> torch.Tensor:
    """The user vector: the mean of x (B, T, D) over real positions, weighted by
    softmax(logits[age]) when recency logits are given -> (B, D)."""
    if logits is None:
        weights = real.to(x.dtype)  # (B, T)
    else:
        scores = logits[ages].masked_fill(~real, float("-inf"))  # (B, T)
        weights = torch.softmax(scores, dim=1).nan_to_num(0.0)  # an empty row: all zero
    weights = weights.unsqueeze(-1)  # (B, T, 1)
    return (x * weights).sum(1) / weights.sum(1).clamp(min=1e-6 if logits is not None else 1.0)
