"""The serving forms of a checkpoint's session encoder: the same function as
`Bert4XMR.encode` in eval mode, as user vectors (B, D) of sessions of item rows.

- `SessionEncoder`: a flat sequence of fused torch calls on weights read once (CPU or CUDA).
  `nn.TransformerEncoder` re-checks its fast-path conditions and walks the module tree on every
  call; for a serving call of a few dozen tokens that Python work cost about as much as the
  arithmetic (measured: B=1, T=24, one thread: 507 us through the module, 272 us here).
- `OnnxEncoder`: that same graph exported to ONNX by `xmr index build` and run by ONNX Runtime
  (the CPU default). One call releases the GIL for the whole forward pass; torch releases and
  retakes it around every op, and next to a busy event loop each retake waits (measured with
  the loop thread spinning: 3 torch encodes/s against 159 ONNX Runtime runs/s, B=8, T=24).

Training and evaluation keep the module; `tests/test_encoder.py` holds all three equal.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F

from training.evaluate import pad_sessions
from training.model import Bert4XMR
from training.vocab import PAD


class Encoder(Protocol):
    kind: str

    def encode(self, sessions: Sequence[Sequence[int]]) -> torch.Tensor: ...


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
            self.market = model.market_emb.weight[market_row].detach()  # (D,)
            self.positions = (model.position_emb.weight.detach()
                              if model.position_emb is not None else None)  # (max_len, D)
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
        if self.positions is not None:  # newest item at position 0, as in training
            lengths = real.sum(1, keepdim=True)  # (B, 1)
            back = (lengths - 1 - torch.arange(t, device=items.device)).clamp(min=0)  # (B, T)
            x = x + self.positions[back]
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
        weights = real.unsqueeze(-1).to(x.dtype)  # (B, T, 1)
        return (x * weights).sum(1) / weights.sum(1).clamp(min=1.0)  # (B, D)


class _Graph(torch.nn.Module):
    """`SessionEncoder._encode` as a module, for the exporter."""

    def __init__(self, encoder: SessionEncoder) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, items: torch.Tensor) -> torch.Tensor:
        return self.encoder._encode(items)


def export_onnx(model: Bert4XMR, market_row: int, path: Path) -> None:
    """Write the market's encoder as ONNX: input `items` (B, T) int64 item rows with PAD=0
    padding, T <= max_len; output `user` (B, D) float32. Batch and length are dynamic."""
    encoder = SessionEncoder(model, market_row)
    example = torch.tensor([[1, 1, 0], [1, 0, 0]], dtype=torch.long, device=encoder.device)
    batch = torch.export.Dim("batch", min=1, max=1 << 16)
    length = torch.export.Dim("length", min=1, max=encoder.max_len)
    # The exporter logs each optional op set it skips, its IR passes each initializer merged.
    quiet = [logging.getLogger(name) for name in ("torch.onnx", "onnx_ir", "onnxscript")]
    levels = [logger.level for logger in quiet]
    for logger in quiet:
        logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), torch.inference_mode(False):
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                _Graph(encoder), (example,), input_names=["items"], output_names=["user"],
                dynamic_shapes=({0: batch, 1: length},), dynamo=True, verbose=False,
            )
    finally:
        for logger, level in zip(quiet, levels, strict=True):
            logger.setLevel(level)
    if program is None:
        raise RuntimeError("the ONNX exporter returned no program")
    path.write_bytes(program.model_proto.SerializeToString())


class OnnxEncoder:
    """An exported encoder run by ONNX Runtime on the CPU with `threads` intra-op threads."""

    kind = "onnx"
    device = torch.device("cpu")

    def __init__(self, path: Path, max_len: int, threads: int = 1) -> None:
        # Imported here: a GPU host serving with the torch encoder needs no ONNX Runtime.
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.execution_mode = onnxruntime.ExecutionMode.ORT_SEQUENTIAL
        options.log_severity_level = 3  # errors only
        # Idle intra-op threads sleep instead of spinning (with XMR_THREADS > 1): spinning
        # threads take cores from the event loop and Redis on a small machine.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.max_len = max_len
        self.session = onnxruntime.InferenceSession(
            str(path), options, providers=["CPUExecutionProvider"]
        )

    def encode(self, sessions: Sequence[Sequence[int]]) -> torch.Tensor:
        items = pad_sessions(sessions, self.max_len).numpy()  # (B, T)
        (user,) = self.session.run(["user"], {"items": items})  # (B, D)
        return torch.from_numpy(np.asarray(user))
