"""The serving encoder computes what the training module computes, for every model option."""

from __future__ import annotations

import random
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import onnx
import pytest
import torch

from service.encoder import (
    CudaGraphEncoder,
    SessionEncoder,
    bucket_shape,
)
from service.export import export_onnx
from service.onnx_encoder import OnnxEncoder
from training.checkpoint import Manifest, read_checkpoint_info, save_checkpoint
from training.evaluate import pad_sessions
from training.item_table import MarketItems
from training.model import Bert4XMR, ModelConfig
from training.vocab import Vocab

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def trained_looking(config: ModelConfig, seed: int) -> Bert4XMR:
    """A model whose every weight, norms included, is away from its initial value."""
    torch.manual_seed(seed)
    model = Bert4XMR(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name != "market_emb.weight" or config.market_embedding:
                param.add_(torch.randn_like(param) * 0.3)
        model.item_emb.weight[0].zero_()
    return model.eval()


def sessions(n_rows: int, max_len: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    lengths = [1, 2, max_len, max_len + 7, *(rng.randint(1, max_len) for _ in range(12))]
    return [[rng.randrange(1, n_rows) for _ in range(n)] for n in lengths]


OPTIONS = [
    {},
    {"market_embedding": False},
    {"position_embedding": True},
    {"output_projection": True, "n_layers": 1, "n_heads": 4},
    {"n_layers": 3, "d_model": 32, "d_ff": 64, "max_len": 8, "position_embedding": True},
    {"pooling": "recency"},
    {"pooling": "recency", "position_embedding": True, "market_placement": "output"},
    {"market_placement": "input", "max_len": 8, "pooling": "recency"},
]


def module_reference(config: ModelConfig, seed: int, batch: list[list[int]],
                     market: int) -> torch.Tensor:
    """User vectors of the training module, in float64 on the CPU."""
    reference = trained_looking(config, seed).double()
    with torch.inference_mode():
        items = torch.zeros(len(batch), config.max_len, dtype=torch.long)
        for b, s in enumerate(batch):
            tail = s[-config.max_len:]
            items[b, : len(tail)] = torch.tensor(tail)
        return reference.encode(items, torch.full((len(batch),), market))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("options", OPTIONS)
def test_serving_encoder_equals_module(options: dict[str, object], device: str) -> None:
    """Against the module in float64 on the CPU: on CUDA the module's own eval path (the
    nested-tensor fast path of nn.TransformerEncoder) is off by up to 3.5e-4 from that reference
    while the serving encoder stays within 1.3e-6 (measured on an H100, torch 2.11)."""
    config = ModelConfig(n_rows=300, n_markets=3, **options)  # type: ignore[arg-type]
    model = trained_looking(config, seed=len(options)).to(device)
    for market in range(config.n_markets):
        batch = sessions(config.n_rows, config.max_len, seed=market)
        encoder = SessionEncoder(model, market)
        got = encoder.encode(batch)
        want = module_reference(config, len(options), batch, market)
        assert got.shape == (len(batch), config.d_model) and got.device.type == device
        torch.testing.assert_close(got.cpu().double(), want, rtol=1e-4, atol=1e-5)
        # alone or in a padded batch, a session gets the same vector
        torch.testing.assert_close(encoder.encode(batch[4:5])[0], got[4], rtol=1e-4, atol=1e-5)


def test_serving_encoder_refuses_other_layer_shapes() -> None:
    model = Bert4XMR(ModelConfig(n_rows=10, n_markets=1))
    model.encoder.layers[0].norm_first = False
    with pytest.raises(ValueError, match="pre-norm"):
        SessionEncoder(model, 0)


def market_items(model: Bert4XMR, market: int, tmp_path: Path) -> MarketItems:
    """The market's items as the service reads them: from a checkpoint of `model`."""
    codes = [f"m{m}" for m in range(model.config.n_markets)]
    vocab = Vocab([f"I{n}" for n in range(1, model.config.n_rows)])
    manifest = Manifest(kind="market", model_config=model.config, markets=codes,
                        market=codes[market])
    save_checkpoint(tmp_path / "ckpt", model, vocab, manifest, {"I1": 1})
    items = read_checkpoint_info(tmp_path / "ckpt").items
    assert items is not None
    return items


@pytest.mark.parametrize("options", OPTIONS)
def test_onnx_encoder_equals_module(options: dict[str, object], tmp_path) -> None:
    config = ModelConfig(n_rows=300, n_markets=3, **options)  # type: ignore[arg-type]
    model = trained_looking(config, seed=len(options))
    for market in range(config.n_markets):
        export_onnx(model, market, tmp_path / f"encoder-{market}.onnx")
        # loadable by every ONNX Runtime the project admits (>= 1.18 reads IR <= 10)
        assert onnx.load(tmp_path / f"encoder-{market}.onnx").ir_version == 8
        encoder = OnnxEncoder(tmp_path / f"encoder-{market}.onnx",
                              market_items(model, market, tmp_path), config.max_len)
        assert encoder.kind == "onnx"
        batch = sessions(config.n_rows, config.max_len, seed=market)
        got = torch.from_numpy(encoder.encode(batch))  # numpy: the ONNX path has no torch
        assert got.shape == (len(batch), config.d_model) and got.dtype == torch.float32
        want = module_reference(config, len(options), batch, market)
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5)
        # alone, one item, or in a padded batch, a session gets the same vector
        torch.testing.assert_close(torch.from_numpy(encoder.encode(batch[4:5]))[0], got[4],
                                   rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(torch.from_numpy(encoder.encode([batch[0]]))[0], got[0],
                                   rtol=1e-4, atol=1e-5)


def test_bucket_shapes() -> None:
    assert bucket_shape(1, 1, 50, 64) == (1, 8)
    assert bucket_shape(3, 9, 50, 64) == (4, 16)
    assert bucket_shape(8, 48, 50, 64) == (8, 48)
    assert bucket_shape(33, 49, 50, 64) == (64, 50)  # never past max_len
    assert bucket_shape(65, 5, 50, 64) is None  # eager above max_batch


def test_bucket_padding_leaves_real_rows_unchanged() -> None:
    """What a CUDA graph replay computes: the batch padded with all-PAD rows and PAD columns
    to its bucket shape; the real rows' vectors are those of the unpadded batch."""
    config = ModelConfig(n_rows=300, n_markets=3, position_embedding=True)
    encoder = SessionEncoder(trained_looking(config, seed=3), 1)
    batch = sessions(config.n_rows, config.max_len, seed=5)[4:9]  # 5 sessions
    items = pad_sessions(batch, config.max_len)
    shape = bucket_shape(*items.shape, config.max_len, 64)
    assert shape is not None and shape > items.shape
    padded = torch.zeros(shape, dtype=torch.long)
    padded[: items.shape[0], : items.shape[1]] = items
    with torch.inference_mode():
        got = encoder._encode(padded)[: len(batch)]
    torch.testing.assert_close(got, encoder.encode(batch), rtol=1e-5, atol=1e-6)


def test_cuda_graphs_need_a_cuda_encoder() -> None:
    with pytest.raises(ValueError, match="CUDA"):
        CudaGraphEncoder(SessionEncoder(Bert4XMR(ModelConfig(n_rows=10, n_markets=1)), 0))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_graph_replays_equal_eager_calls() -> None:
    config = ModelConfig(n_rows=300, n_markets=3, position_embedding=True)
    eager = SessionEncoder(trained_looking(config, seed=4).cuda(), 2)
    graphed = CudaGraphEncoder(eager, max_batch=8)
    every = sessions(config.n_rows, config.max_len, seed=9)  # 16 sessions, lengths 1..57
    for batch in (every[:1], every[2:3], every[:5], every[3:11], every, every[:1], every[:5]):
        got = graphed.encode(batch)  # the last two replay graphs captured before
        assert got.device.type == "cuda" and got.shape == (len(batch), config.d_model)
        torch.testing.assert_close(got, eager.encode(batch), rtol=1e-4, atol=1e-5)
    assert set(graphed._graphs) == {(1, 8), (1, 50), (8, 50)}  # 16 sessions > 8: eager
    # calls from two threads at once (the encoder thread and a readiness probe) stay correct
    want = [eager.encode([s]) for s in every]
    with ThreadPoolExecutor(2) as pool:
        got_all = list(pool.map(lambda s: graphed.encode([s]), every * 4))
    for i, got in enumerate(got_all):
        torch.testing.assert_close(got, want[i % len(every)], rtol=1e-4, atol=1e-5)
    # at load every shape is captured: 1, 2, 4, 8 sessions x lengths 8, 16, ..., 48, 50
    assert graphed.capture_all() == 4 * 7
    torch.testing.assert_close(graphed.encode(every[5:8]), eager.encode(every[5:8]),
                               rtol=1e-4, atol=1e-5)
