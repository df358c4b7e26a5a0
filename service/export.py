"""The CPU serving encoder's file: a market's session encoder written as an ONNX graph for
ONNX Runtime (`xmr index build` writes it beside the FAISS index; `OnnxEncoder` runs it)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from service.encoder import SessionEncoder
from training.model import Bert4XMR
from training.vocab import PAD

MS = "com.microsoft"  # ONNX Runtime's contrib operators
ONNX_OPSET = 18
# The IR version of opset 18, not the installed onnx's newest: ONNX Runtime refuses files of an
# IR newer than it knows (seen: onnx 1.23 writes IR 14, ONNX Runtime 1.30 reads up to 13).
IR_VERSION = 8


class _GraphBuilder:
    """Nodes and initializers of an ONNX graph, appended in order."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []

    def const(self, name: str, value: torch.Tensor | np.ndarray) -> str:
        array = value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else value
        self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def op(self, op_type: str, inputs: list[str], output: str, domain: str = "",
           **attributes: Any) -> str:
        self.nodes.append(helper.make_node(op_type, inputs, [output], domain=domain or None,
                                           **attributes))
        return output


def onnx_model(model: Bert4XMR, market_row: int) -> onnx.ModelProto:
    """The market's encoder as an ONNX graph for ONNX Runtime's CPU provider: inputs `items`
    (B, T) int64 item rows, right-padded with PAD=0, T <= max_len, and `item_emb` (B, T, D)
    float32, their rows of the item embedding (`MarketItems.embeddings`: the table is shared by
    every market of a server, so the graph holds none); output `user` (B, D) float32.

    Built node by node from `SessionEncoder`'s weights rather than traced: 34 nodes for the
    default shape where torch's exporter wrote 99 (most of them shape arithmetic), so a call's
    fixed cost halves (measured, one thread, uk: 32 against 58 us at B=1, T=1; 107 against
    144 us at T=24; 670 against 750 us at B=8, T=24), and building takes milliseconds instead
    of seconds. It uses ONNX Runtime's fused `Attention` (QKV projection and masked softmax
    attention in one node, with the session lengths as its mask) and `BiasGelu` (exact, erf)
    from the com.microsoft domain.
    - Input: LayerNorm(item + market) of the given embedding rows.
    - Layers: pre-norm, `x += Attention(LN1(x)) W_o + b_o; x += W_2 GELU(W_1 LN2(x) + b_1) + b_2`.
    - Output: the mean of LN_out(x) over the real positions, weighted by the softmax of the
      learned logit of each position's age with the recency pooling.
    `tests/test_encoder.py` holds it equal to the module for every model option."""
    encoder = SessionEncoder(model, market_row)
    d = encoder.d
    g = _GraphBuilder()
    x = g.op("LayerNormalization", [g.op("Add", ["item_emb", g.const("market", encoder.market)],
                                         "x_shifted"),
                                    g.const("input_norm_w", encoder.input_norm[0]),
                                    g.const("input_norm_b", encoder.input_norm[1])],
             "x_in", axis=-1, epsilon=model.input_norm.eps)  # (B, T, D)
    real = g.op("Greater", ["items", g.const("pad", np.array(PAD, np.int64))], "real")  # (B, T)
    axis1 = g.const("axis1", np.array([1], np.int64))
    lengths = g.op("ReduceSum", [g.op("Cast", [real], "real_i32", to=TensorProto.INT32), axis1],
                   "lengths", keepdims=0)  # (B,) int32: the Attention mask (right padding)
    back = ""
    if encoder.positions is not None or encoder.pool_logits is not None:
        # Age of each position, newest item at 0: row lengths - 1 - t, at least 0.
        width = g.op("Gather", [g.op("Shape", ["items"], "shape"),
                                g.const("one_i64", np.array(1, np.int64))], "width", axis=0)
        steps = g.op("Range", [g.const("zero_i64", np.array(0, np.int64)), width,
                               g.const("step_i64", np.array(1, np.int64))], "steps")  # (T,)
        newest = g.op("Sub", [g.op("Cast", [g.op("Unsqueeze", [lengths, axis1], "lengths_col")],
                                   "lengths_i64", to=TensorProto.INT64),
                              g.const("one_col", np.array([[1]], np.int64))], "newest")  # (B, 1)
        back = g.op("Max", [g.op("Sub", [newest, steps], "back_raw"), "zero_i64"], "back")
    if encoder.positions is not None:
        x = g.op("Add", [x, g.op("Gather", [g.const("positions", encoder.positions), back],
                                 "x_pos", axis=0)], "x_with_pos")
    norms = [layer.norm1 + (layer.eps,) for layer in encoder.layers[1:]]
    norms.append(encoder.output_norm + (model.output_norm.eps,))
    first = encoder.layers[0]
    y = g.op("LayerNormalization", [x, g.const("ln1_w_0", first.norm1[0]),
                                    g.const("ln1_b_0", first.norm1[1])], "y_0",
             axis=-1, epsilon=first.eps)
    for i, (layer, (weight, bias, eps)) in enumerate(zip(encoder.layers, norms, strict=True)):
        a = g.op("Attention", [y, g.const(f"qkv_w_{i}", layer.qkv[0].T),
                               g.const(f"qkv_b_{i}", layer.qkv[1]), lengths], f"attn_{i}",
                 domain=MS, num_heads=encoder.heads)  # (B, T, D)
        a = g.op("Add", [g.op("MatMul", [a, g.const(f"out_w_{i}", layer.out[0].T)], f"out_{i}"),
                         g.const(f"out_b_{i}", layer.out[1])], f"out_biased_{i}")
        x = g.op("Add", [x, a], f"x_attn_{i}")
        y = g.op("LayerNormalization", [x, g.const(f"ln2_w_{i}", layer.norm2[0]),
                                        g.const(f"ln2_b_{i}", layer.norm2[1])], f"y_ff_{i}",
                 axis=-1, epsilon=layer.eps)
        h = g.op("BiasGelu", [g.op("MatMul", [y, g.const(f"ff1_w_{i}", layer.ff1[0].T)],
                                   f"ff1_{i}"), g.const(f"ff1_b_{i}", layer.ff1[1])],
                 f"gelu_{i}", domain=MS)
        f = g.op("Add", [g.op("MatMul", [h, g.const(f"ff2_w_{i}", layer.ff2[0].T)], f"ff2_{i}"),
                         g.const(f"ff2_b_{i}", layer.ff2[1])], f"ff2_biased_{i}")
        x = g.op("Add", [x, f], f"x_ff_{i}")
        y = g.op("LayerNormalization", [x, g.const(f"ln_next_w_{i}", weight),
                                        g.const(f"ln_next_b_{i}", bias)], f"y_{i + 1}",
                 axis=-1, epsilon=eps)  # the next layer's LN1, after the last the output LN
    weights = g.op("Cast", [real], "real_f32", to=TensorProto.FLOAT)  # (B, T)
    floor = np.array(1.0, np.float32)
    if encoder.pool_logits is not None:  # softmax of the learned logit of each age, real only
        logits = g.op("Gather", [g.const("pool_logits", encoder.pool_logits), back], "age_logits",
                      axis=0)  # (B, T)
        masked_logits = g.op("Where", [real, logits, g.const("neg", np.array(-1e9, np.float32))],
                             "masked_logits")
        weights = g.op("Mul", [g.op("Softmax", [masked_logits], "softmax", axis=1), weights],
                       "pool_weights")
        floor = np.array(1e-6, np.float32)
    masked = g.op("Mul", [y, g.op("Unsqueeze", [weights, g.const("axis2", np.array([2],
                                                                               np.int64))],
                                  "weights")], "masked")  # (B, T, D)
    count = g.op("Max", [g.op("ReduceSum", [weights, axis1], "count_raw", keepdims=1),
                         g.const("floor_f32", floor)], "count")  # (B, 1)
    g.op("Div", [g.op("ReduceSum", [masked, axis1], "total", keepdims=0), count], "user")
    graph = helper.make_graph(
        g.nodes, "xmr_session_encoder",
        [helper.make_tensor_value_info("items", TensorProto.INT64, ["batch", "length"]),
         helper.make_tensor_value_info("item_emb", TensorProto.FLOAT, ["batch", "length", d])],
        [helper.make_tensor_value_info("user", TensorProto.FLOAT, ["batch", d])],
        g.initializers,
    )
    proto = helper.make_model(graph, producer_name="xmr", ir_version=IR_VERSION, opset_imports=[
        helper.make_opsetid("", ONNX_OPSET), helper.make_opsetid(MS, 1)])
    onnx.checker.check_model(proto)
    return proto


def export_onnx(model: Bert4XMR, market_row: int, path: Path) -> None:
    """Write the market's encoder (`onnx_model`) as an ONNX file."""
    path.write_bytes(onnx_model(model, market_row).SerializeToString())
