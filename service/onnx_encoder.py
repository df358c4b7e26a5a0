"""The CPU serving encoder: a market's exported encoder (`service.export`, written by
`xmr index build`) run by ONNX Runtime on the item embedding rows that the market's
`MarketItems` gives (the table shared by all markets). Imports no torch, so the CPU image serves
without it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from training.item_table import MarketItems
from training.vocab import pad_rows


class OnnxEncoder:
    """An exported encoder run by ONNX Runtime on the CPU with `threads` intra-op threads;
    user vectors (B, D) float32 as a numpy array."""

    kind = "onnx"
    device = "cpu"

    def __init__(self, path: Path, items: MarketItems, max_len: int, threads: int = 1) -> None:
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
        self.items = items
        self.max_len = max_len
        self.session = onnxruntime.InferenceSession(
            str(path), options, providers=["CPUExecutionProvider"]
        )

    def encode(self, sessions: Sequence[Sequence[int]]) -> np.ndarray:
        items = pad_rows(sessions, self.max_len)  # (B, T)
        embedded = self.items.embeddings(items)  # (B, T, D)
        (user,) = self.session.run(["user"], {"items": items, "item_emb": embedded})  # (B, D)
        return np.asarray(user)
