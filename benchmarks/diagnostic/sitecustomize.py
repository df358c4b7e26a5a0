"""Diagnostic only (`load.py --diagnostic-zero-encoder`): on the server's path when asked, so
that its ONNX Runtime encoder returns zero vectors at no cost. Everything else (HTTP, Redis,
the batcher, FAISS over every item, the response) runs as served. The run then measures a
bound, what recommend would cost with a free encoder, and never the service."""

import os

if os.environ.get("XMR_DIAGNOSTIC_ZERO_ENCODER") == "1":
    import numpy as np

    from service.onnx_encoder import OnnxEncoder

    def _zero_encode(self: OnnxEncoder, sessions: object) -> np.ndarray:
        width = self.session.get_outputs()[0].shape[1]  # D
        return np.zeros((len(sessions), width), dtype=np.float32)  # type: ignore[arg-type]

    OnnxEncoder.encode = _zero_encode  # type: ignore[method-assign,assignment]
    print("xmr: DIAGNOSTIC RUN, the ONNX encoder returns zero vectors", flush=True)
