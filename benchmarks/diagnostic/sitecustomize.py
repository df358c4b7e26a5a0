"""Diagnostic only (`load.py --diagnostic-zero-encoder`): on the server's path when asked, so
that its ONNX Runtime encoder returns zero vectors at no cost. Everything else (HTTP, Redis,
the batcher, FAISS over every item, the response) runs as served. The run then measures a
bound, what recommend would cost with a free encoder, and never the service."""

import os

if os.environ.get("XMR_DIAGNOSTIC_ZERO_ENCODER") == "1":
    import torch

    from service.encoder import OnnxEncoder

    def _zero_encode(self: OnnxEncoder, sessions: object) -> torch.Tensor:
        width = self.session.get_outputs()[0].shape[1]  # D
        return torch.zeros((len(sessions), width))  # type: ignore[arg-type]

    OnnxEncoder.encode = _zero_encode  # type: ignore[method-assign,assignment]
    print("xmr: DIAGNOSTIC RUN, the ONNX encoder returns zero vectors", flush=True)
