"""The serving forms of a checkpoint's session encoder: the same function as
`Bert4XMR.encode` in eval mode, as user vectors (B, D) of sessions of item rows.

- `SessionEncoder`: a flat sequence of fused torch calls on weights read once (CPU or CUDA).
  `nn.TransformerEncoder` re-checks its fast-path conditions and walks the module tree on every
  call; for a serving call of a few dozen tokens that Python work cost about as much as the
  arithmetic (measured: B=1, T=24, one thread: 507 us through the module, 272 us here).
- `CudaGraphEncoder` (the GPU default): `SessionEncoder` on CUDA, replayed from CUDA graphs
  captured at load, one per bucket of batch size and session length.
- `OnnxEncoder` (the CPU default): the same function as an ONNX graph (`service.export`,
  written by `xmr index build`) run by ONNX Runtime. One call releases the GIL for the whole
  forward pass; torch releases and retakes it around every op, and next to a busy event loop
  each retake waits (measured with the loop thread spinning: 3 torch encodes/s against 159
  ONNX Runtime runs/s, B=8, T=24).

Training and evaluation keep the module; `tests/test_encoder.py` holds them all equal.
`OnnxEncoder` lives in `service.onnx_encoder`, which imports no torch.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F

from training.evaluate import pad_sessions
from training.model import Bert4XMR, ages_of, pool
from training.vocab import PAD

LENGTH_STEP = 8  # CUDA graph shapes: session lengths padded to a multiple of this
_CAPTURE_LOCK = threading.Lock()  # one CUDA graph capture at a time in the process


class Encoder(Protocol):
    kind: str

    def encode(self, sessions: Sequence[Sequence[int]]) -> torch.Tensor | np.ndarray: ...


@dataclass(frozen=True)
class Layer:
    norm1: tuple[torch.Tensor, torch.Tensor]
    qkv: tuple[torch.Tensor, torch.Tensor]
    out: tuple[torch.Tensor, torch.Tensor]
    norm2: tuple[torch.Tensor, torch.Tensor]
    ff1: tuple[torch.Tensor, torch.Tensor]
    ff2: tuple[torch.Tensor, torch.Tensor]
    eps: float


class SessionEncoder:
    """User vectors of sessions in one market with one model's weights (no grad, eval)."""

    kind = "torch"

    def __init__(self, model: Bert4XMR, market_row: int) -> None:
        config = model.config
        self.max_len = config.max_len
        self.d = config.d_model
        self.heads = config.n_heads
        with torch.inference_mode():
            self.items = model.item_emb.weight.detach()  # (n_rows, D)
            market = model.market_emb.weight[market_row].detach()  # (D,)
            # The input side carries the market only where the model places it there.
            self.market = (market if config.market_placement in ("both", "input")
                           else torch.zeros_like(market))
            self.positions = (model.position_emb.weight.detach()
                              if model.position_emb is not None else None)  # (max_len, D)
            self.pool_logits = (model.pool_logits.detach()
                                if model.pool_logits is not None else None)  # (max_len,)
        self.input_norm = self._norm(model.input_norm)
        self.output_norm = self._norm(model.output_norm)
        self.layers = [self._layer(layer) for layer in model.encoder.layers]

    @staticmethod
    def _norm(norm: torch.nn.LayerNorm) -> tuple[torch.Tensor, torch.Tensor]:
        return norm.weight.detach(), norm.bias.detach()

    @classmethod
    def _layer(cls, layer: torch.nn.TransformerEncoderLayer) -> Layer:
        if not layer.norm_first or layer.activation_relu_or_gelu != 2:
            raise ValueError("the serving encoder expects pre-norm layers with GELU")
        attn = layer.self_attn
        return Layer(
            norm1=cls._norm(layer.norm1), norm2=cls._norm(layer.norm2),
            qkv=(attn.in_proj_weight.detach(), attn.in_proj_bias.detach()),
            out=(attn.out_proj.weight.detach(), attn.out_proj.bias.detach()),
            ff1=(layer.linear1.weight.detach(), layer.linear1.bias.detach()),
            ff2=(layer.linear2.weight.detach(), layer.linear2.bias.detach()),
            eps=layer.norm1.eps,
        )

    @property
    def device(self) -> torch.device:
        return self.items.device

    def encode(self, sessions: Sequence[Sequence[int]]) -> torch.Tensor:
        """(B, D) user vectors for sessions of item rows (their last `max_len` items)."""
        items = pad_sessions(sessions, self.max_len).to(self.device)  # (B, T)
        with torch.inference_mode():
            return self._encode(items)

    def _encode(self, items: torch.Tensor) -> torch.Tensor:
        b, t = items.shape
        d, heads = self.d, self.heads
        real = items != PAD  # (B, T)
        x = F.layer_norm(F.embedding(items, self.items) + self.market, (d,), *self.input_norm)
        ages = ages_of(real)  # (B, T)
        if self.positions is not None:  # newest item at position 0, as in training
            x = x + self.positions[ages]
        mask = real[:, None, None, :]  # (B, 1, 1, T): attend to real items only
        for layer in self.layers:
            y = F.layer_norm(x, (d,), *layer.norm1, layer.eps)
            qkv = F.linear(y, *layer.qkv).view(b, t, 3, heads, d // heads)
            q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, H, T, D/H)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, H, T, D/H)
            x = x + F.linear(y.transpose(1, 2).reshape(b, t, d), *layer.out)
            y = F.layer_norm(x, (d,), *layer.norm2, layer.eps)
            x = x + F.linear(F.gelu(F.linear(y, *layer.ff1)), *layer.ff2)
        x = F.layer_norm(x, (d,), *self.output_norm)
        return pool(x, real, ages, self.pool_logits)  # (B, D)


def bucket_shape(batch: int, length: int, max_len: int, max_batch: int) -> tuple[int, int] | None:
    """The CUDA graph shape a (batch, length) call runs in: batch up to the next power of two,
    length up to the next multiple of 8 (at most max_len); None above `max_batch`."""
    padded_batch = 1 << max(0, batch - 1).bit_length()
    if padded_batch > max_batch:
        return None
    return padded_batch, min(max_len, -(-length // LENGTH_STEP) * LENGTH_STEP)


class CudaGraphEncoder:
    """`SessionEncoder` on CUDA, replayed from CUDA graphs: one per bucket shape, captured at
    load (`capture_all`; a shape missed there is captured on first use). An eager call launches
    about 40 kernels, each a Python call holding the GIL; a replay is one launch. Padding rows
    (all PAD) and padding columns (PAD) change nothing for the real rows: PAD keys are masked
    and only real positions are averaged.

    Replays share one input and one output buffer per shape, so calls are serialized by a lock
    (the batcher's encoder thread and a readiness probe may call at once). Batches above
    `max_batch` run eagerly."""

    kind = "cuda-graphs"

    def __init__(self, encoder: SessionEncoder, max_batch: int = 64) -> None:
        if encoder.device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA encoder, not {encoder.device}")
        self.encoder = encoder
        self.max_len = encoder.max_len
        self.max_batch = max_batch
        self._graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor,
                                                  torch.Tensor]] = {}
        self._pool = torch.cuda.graph_pool_handle()  # one memory pool for this encoder's graphs
        self._lock = threading.Lock()

    @property
    def device(self) -> torch.device:
        return self.encoder.device

    def _capture(self, shape: tuple[int, int]) -> tuple[torch.cuda.CUDAGraph, torch.Tensor,
                                                         torch.Tensor]:
        static_in = torch.zeros(shape, dtype=torch.long, device=self.device)
        static_in[:, 0] = 1  # a real item per row while warming up and capturing
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side), torch.inference_mode():
            for _ in range(2):  # warm-up outside the capture: kernels chosen, workspace made
                self.encoder._encode(static_in)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # thread_local: another market's encoder may run in another thread meanwhile
        with _CAPTURE_LOCK, torch.inference_mode(), torch.cuda.graph(
                graph, pool=self._pool, capture_error_mode="thread_local"):
            static_out = self.encoder._encode(static_in)
        return graph, static_in, static_out

    def capture_all(self) -> int:
        """Capture every bucket shape now (at load), so no request waits for a capture;
        returns how many graphs this encoder holds."""
        batch = 1
        while batch <= self.max_batch:
            for length in range(LENGTH_STEP, self.max_len + LENGTH_STEP, LENGTH_STEP):
                shape = bucket_shape(batch, length, self.max_len, self.max_batch)
                assert shape is not None
                with self._lock:
                    if shape not in self._graphs:
                        self._graphs[shape] = self._capture(shape)
            batch *= 2
        return len(self._graphs)

    def encode(self, sessions: Sequence[Sequence[int]]) -> torch.Tensor:
        items = pad_sessions(sessions, self.max_len)  # (B, T) on the host
        b, t = items.shape
        shape = bucket_shape(b, t, self.max_len, self.max_batch)
        if shape is None:
            with torch.inference_mode():
                return self.encoder._encode(items.to(self.device))
        host = torch.zeros(shape, dtype=torch.long)
        host[:b, :t] = items
        with self._lock:
            entry = self._graphs.get(shape)
            if entry is None:
                entry = self._graphs[shape] = self._capture(shape)
            graph, static_in, static_out = entry
            static_in.copy_(host)
            graph.replay()
            return static_out[:b].clone()  # the buffer is the next replay's
