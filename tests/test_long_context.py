"""Attention in blocks of queries (model.attention) gives what one call gives,
and keeps a long chunk's peak memory below its whole scores."""

import gc

import mlx.core as mx
import numpy as np
import pytest

from mlx_diffgemma import model as model_module
from mlx_diffgemma.benchmark import PRESETS, random_model

TINY = PRESETS["tiny"]
HEADS = TINY["text_config"]["num_attention_heads"]
# One query's scores, softmax and sum do not depend on the other queries, so
# blocks change only the matmuls' rounding: measured up to 8e-5 here after six
# layers, on values up to 5. Blocks given the wrong mask rows move them by > 1.
TOL = 5e-4
UNBLOCKED = 1 << 40  # one block at any size here


@pytest.fixture(scope="module")
def model():
    return random_model(TINY, seed=0)


def ids(batch, length, seed):
    return mx.random.randint(3, TINY["text_config"]["vocab_size"], (batch, length), key=mx.random.key(seed))


def run(model, budget, monkeypatch, left_padding=None):
    """(hidden states of two encoder calls, the second at an offset; a canvas' logits)."""
    monkeypatch.setattr(model_module, "ATTENTION_BLOCK_BYTES", budget)
    batch = 1 if left_padding is None else len(left_padding)
    cache = model.make_cache()
    # 150 + 60 tokens: past the sliding window (128), so its cache is cut and its mask bites.
    first = model.encode(ids(batch, 150, 1), cache, left_padding=left_padding)
    second = model.encode(ids(batch, 60, 2), cache)
    logits = model.denoise(ids(batch, model.canvas_length, 3), cache)
    mx.eval(first, second, logits)
    return [np.array(a) for a in (first, second, logits)]


@pytest.mark.parametrize("left_padding", [None, [0, 37]], ids=["one row", "left padded"])
@pytest.mark.parametrize("budget", [1, 64_000], ids=["one query per block", "blocks of 16-26 queries"])
def test_blocked_attention_matches_one_call(model, monkeypatch, left_padding, budget):
    whole = run(model, UNBLOCKED, monkeypatch, left_padding)
    blocked = run(model, budget, monkeypatch, left_padding)
    for name, a, b in zip(("encode", "encode at an offset", "denoise"), whole, blocked):
        assert np.isfinite(a).all(), name
        np.testing.assert_allclose(b, a, rtol=TOL, atol=TOL, err_msg=name)


def test_blocks_cover_every_query_with_its_mask_rows(monkeypatch):
    # Rows of 3 over 10 queries (the last block short), a mask differing per row.
    q, k, v = (mx.random.normal((2, 4, n, 8), key=mx.random.key(i)) for i, n in enumerate((10, 13, 13)))
    mask = mx.random.uniform(shape=(2, 1, 10, 13), key=mx.random.key(5)) < 0.7
    mask = mask | (mx.arange(13) == 0)  # no empty row
    expected = mx.fast.scaled_dot_product_attention(q, k, v, scale=1.0, mask=mask)
    monkeypatch.setattr(model_module, "ATTENTION_BLOCK_BYTES", 3 * 2 * 4 * 13 * 4)
    got = model_module.attention(q, k, v, mask)
    np.testing.assert_allclose(np.array(got), np.array(expected), rtol=TOL, atol=TOL)
    # A mask broadcast over the queries (training's) is given whole to every block.
    row = mask[:, :, :1]
    expected = mx.fast.scaled_dot_product_attention(q, k, v, scale=1.0, mask=row)
    np.testing.assert_allclose(np.array(model_module.attention(q, k, v, row)), np.array(expected), rtol=TOL, atol=TOL)


def encode_peak(model, length: int) -> int:
    """Memory allocated above what was in use, encoding ``length`` tokens in one call."""
    tokens = ids(1, length, 4)
    mx.eval(tokens)
    gc.collect()
    mx.synchronize()
    mx.clear_cache()
    before = mx.get_active_memory()
    mx.reset_peak_memory()
    cache = model.make_cache()
    mx.eval(model.encode(tokens, cache), [c.state for c in cache])
    mx.synchronize()
    return mx.get_peak_memory() - before


def test_blocked_encode_stays_below_its_scores(model, monkeypatch):
    length = 2048
    scores = HEADS * length * length * 4  # one layer's float32 scores, 64 MiB
    monkeypatch.setattr(model_module, "ATTENTION_BLOCK_BYTES", UNBLOCKED)
    whole = encode_peak(model, length)
    monkeypatch.setattr(model_module, "ATTENTION_BLOCK_BYTES", 2 * 2**20)
    blocked = encode_peak(model, length)
    assert whole > scores  # the measurement sees the scores when they are whole
    # Blocks evaluated one at a time save about all of them (measured: 64 MiB);
    # left lazy, many blocks were allocated at once and saved 22 MiB.
    assert blocked < whole - scores / 2, (blocked, whole)
