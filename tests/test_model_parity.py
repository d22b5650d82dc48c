"""Our MLX model against transformers' DiffusionGemmaForBlockDiffusion, same weights.

Tolerance: 1e-4 max abs on float32 logits. Measured on these checkpoints, our
float32 logits and the reference's float32 logits are each about 4e-5 from a
float64 run of the reference, so 1e-4 leaves room for rounding noise but not
for a wrong operation (a misplaced norm or scale moves logits by > 1e-2).
"""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
import torch
from mlx_lm.models.switch_layers import QuantizedSwitchLinear, SwitchGLU, SwitchLinear
from reference import CANVAS, VOCAB, build_reference
from transformers import DynamicCache

from mlx_diffgemma import cpu_experts
from mlx_diffgemma.model import GeGLU
from mlx_diffgemma.utils import load_model

TOL = 1e-4
PROMPT = 20  # longer than the sliding window (8)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt")
    ref = build_reference(path)
    return ref, load_model(path)


def ref_cache(ref):
    return DynamicCache(config=ref.config.get_text_config(decoder=True))


def ref_encode(ref, cache, ids, attention_mask=None):
    with torch.no_grad():
        out = ref.model.encoder(
            input_ids=torch.tensor(ids),
            past_key_values=cache,
            attention_mask=None if attention_mask is None else torch.tensor(attention_mask),
        )
    return out.last_hidden_state.numpy()


def ref_denoise(ref, cache, canvas, sc=None, decoder_attention_mask=None):
    with torch.no_grad():
        out = ref(
            decoder_input_ids=torch.tensor(canvas),
            past_key_values=cache,
            self_conditioning_logits=None if sc is None else torch.tensor(sc),
            decoder_attention_mask=(None if decoder_attention_mask is None else torch.tensor(decoder_attention_mask)),
        )
    return out.logits.numpy()


def max_diff(ours, theirs):
    return float(np.abs(np.array(ours) - theirs).max())


def tokens(rng, *shape):
    return rng.integers(0, VOCAB, shape)


@pytest.fixture(params=["gather_mm", "grouped"])
def experts_path(request, monkeypatch):
    """Both ways of running the experts: SwitchGLU's gather_mm (Metal, and the
    CPU for few tokens) and per-expert groups in one batched matmul (the CPU
    for many)."""
    grouped = request.param == "grouped"
    monkeypatch.setattr(cpu_experts, "MIN_GROUPED_EXPERT_WEIGHTS", 0 if grouped else 10**12)
    if grouped and mx.default_device().type != mx.DeviceType.cpu:
        pytest.skip("the grouped experts run on the CPU only")
    return request.param


@pytest.mark.parametrize("batch", [1, 2])
def test_encoder_hidden_states_and_cache(checkpoint, batch, experts_path):
    ref, model = checkpoint
    ids = tokens(np.random.default_rng(batch), batch, PROMPT)
    rc = ref_cache(ref)
    expected = ref_encode(ref, rc, ids)
    cache = model.make_cache()
    hidden = model.encode(mx.array(ids), cache)
    assert max_diff(hidden, expected) < TOL
    for i, (ours, theirs) in enumerate(zip(cache, rc.layers)):
        # Sliding layers keep window - 1 = 7 tokens, full layers all 20.
        assert ours.keys.shape == tuple(theirs.keys.shape), i
        assert max_diff(ours.keys, theirs.keys.numpy()) < TOL, i
        assert max_diff(ours.values, theirs.values.numpy()) < TOL, i
    assert cache.offset == PROMPT


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("self_conditioning", [False, True])
def test_denoise_logits(checkpoint, batch, self_conditioning, experts_path):
    ref, model = checkpoint
    rng = np.random.default_rng(10 + batch)
    ids, canvas = tokens(rng, batch, PROMPT), tokens(rng, batch, CANVAS)
    sc = (rng.standard_normal((batch, CANVAS, VOCAB)) * 3).astype(np.float32) if self_conditioning else None

    rc = ref_cache(ref)
    ref_encode(ref, rc, ids)
    expected = ref_denoise(ref, rc, canvas, sc)

    cache = model.make_cache()
    model.encode(mx.array(ids), cache)
    logits = model.denoise(mx.array(canvas), cache, None if sc is None else mx.array(sc))
    assert logits.dtype == mx.float32
    assert logits.shape == (batch, CANVAS, VOCAB)
    assert max_diff(logits, expected) < TOL
    # The logits must carry signal, or the comparison above proves little.
    assert expected.std() > 0.5


def test_denoise_leaves_cache_unchanged(checkpoint):
    _, model = checkpoint
    rng = np.random.default_rng(3)
    cache = model.make_cache()
    model.encode(mx.array(tokens(rng, 1, PROMPT)), cache)
    before = [(c.offset, np.array(c.keys), np.array(c.values)) for c in cache]
    model.denoise(mx.array(tokens(rng, 1, CANVAS)), cache)
    for (offset, k, v), c in zip(before, cache):
        assert c.offset == offset
        np.testing.assert_array_equal(np.array(c.keys), k)
        np.testing.assert_array_equal(np.array(c.values), v)


def test_second_canvas(checkpoint):
    """Encode a finished canvas into the cache, then denoise the next one."""
    ref, model = checkpoint
    rng = np.random.default_rng(4)
    ids, first, second = tokens(rng, 2, PROMPT), tokens(rng, 2, CANVAS), tokens(rng, 2, CANVAS)
    sc = (rng.standard_normal((2, CANVAS, VOCAB)) * 3).astype(np.float32)

    rc = ref_cache(ref)
    ref_encode(ref, rc, ids)
    ref_encode(ref, rc, first)
    expected = ref_denoise(ref, rc, second, sc)

    cache = model.make_cache()
    model.encode(mx.array(ids), cache)
    model.encode(mx.array(first), cache)
    assert cache.offset == PROMPT + CANVAS
    logits = model.denoise(mx.array(second), cache, mx.array(sc))
    assert max_diff(logits, expected) < TOL


@pytest.mark.parametrize("chunks", [(5, 9, 6), (1, 1, 18), (7, 1, 12)])
def test_chunked_prompt_gives_the_same_cache(checkpoint, chunks):
    ref, model = checkpoint
    rng = np.random.default_rng(5)
    ids, canvas = tokens(rng, 2, PROMPT), tokens(rng, 2, CANVAS)

    rc = ref_cache(ref)
    ref_encode(ref, rc, ids)
    expected = ref_denoise(ref, rc, canvas)

    cache = model.make_cache()
    start = 0
    for n in chunks:
        model.encode(mx.array(ids[:, start : start + n]), cache)
        start += n
    for ours, theirs in zip(cache, rc.layers):
        assert max_diff(ours.keys, theirs.keys.numpy()) < TOL
        assert max_diff(ours.values, theirs.values.numpy()) < TOL
    assert max_diff(model.denoise(mx.array(canvas), cache), expected) < TOL


def test_encoder_and_decoder_layer_scalars_are_read_apart(tmp_path):
    ref = build_reference(tmp_path, seed=3, same_scalars=False)
    model = load_model(tmp_path)
    rng = np.random.default_rng(9)
    ids, canvas = tokens(rng, 1, PROMPT), tokens(rng, 1, CANVAS)
    rc = ref_cache(ref)
    hidden_ref = ref_encode(ref, rc, ids)
    expected = ref_denoise(ref, rc, canvas)
    cache = model.make_cache()
    assert max_diff(model.encode(mx.array(ids), cache), hidden_ref) < TOL
    assert max_diff(model.denoise(mx.array(canvas), cache), expected) < TOL


def test_left_padded_batch(checkpoint):
    """A left-padded row matches the reference run with its attention mask."""
    ref, model = checkpoint
    rng = np.random.default_rng(6)
    ids, canvas = tokens(rng, 2, PROMPT), tokens(rng, 2, CANVAS)
    pad = 5
    ids[0, :pad] = 0
    mask = np.ones((2, PROMPT), dtype=bool)
    mask[0, :pad] = False

    rc = ref_cache(ref)
    hidden_ref = ref_encode(ref, rc, ids, attention_mask=mask)
    dec_mask = np.concatenate([mask, np.ones((2, CANVAS), dtype=bool)], axis=1)
    expected = ref_denoise(ref, rc, canvas, decoder_attention_mask=dec_mask)

    cache = model.make_cache()
    hidden = model.encode(mx.array(ids), cache, left_padding=[pad, 0])
    assert max_diff(np.array(hidden)[:, pad:], hidden_ref[:, pad:]) < TOL
    logits = model.denoise(mx.array(canvas), cache)
    assert not np.isnan(np.array(logits)).any()
    assert max_diff(logits, expected) < TOL


def test_bfloat16_checkpoint(tmp_path):
    """bf16 weights: we agree with the reference run in bf16 as closely as bf16 allows.

    The bound is the reference's own bf16 rounding noise (its bf16 run against
    its float32 run on the same weights), doubled: a port that is right up to
    rounding lands inside it, a wrong operation lands far outside it.
    """
    ref32 = build_reference(tmp_path / "f32", seed=7)
    ref16 = build_reference(tmp_path / "bf16", dtype=torch.bfloat16, seed=7)
    model = load_model(tmp_path / "bf16")
    assert model.embed_tokens.weight.dtype == mx.bfloat16

    rng = np.random.default_rng(8)
    ids, canvas = tokens(rng, 1, PROMPT), tokens(rng, 1, CANVAS)
    sc = (rng.standard_normal((1, CANVAS, VOCAB)) * 3).astype(np.float32)

    def reference(ref):
        rc = ref_cache(ref)
        with torch.no_grad():
            ref.model.encoder(input_ids=torch.tensor(ids), past_key_values=rc)
            return (
                ref(
                    decoder_input_ids=torch.tensor(canvas),
                    past_key_values=rc,
                    self_conditioning_logits=torch.tensor(sc).to(torch.bfloat16),
                )
                .logits.float()
                .numpy()
            )

    expected16, expected32 = reference(ref16), reference(ref32)
    cache = model.make_cache()
    model.encode(mx.array(ids), cache)
    logits = np.array(model.denoise(mx.array(canvas), cache, mx.array(sc).astype(mx.bfloat16)))

    bf16_noise = np.abs(expected16 - expected32).max()
    ours = np.abs(logits - expected16).max()
    assert bf16_noise > 0
    assert ours <= 2 * bf16_noise, (ours, bf16_noise)
    # and the same argmax almost everywhere
    assert (logits.argmax(-1) == expected16.argmax(-1)).mean() > 0.9


def test_experts_fall_back_to_gather_mm_when_routing_is_uneven(monkeypatch):
    """Every token on one expert: padding the groups would cost more than
    gather_mm, so the layer runs SwitchGLU as it is."""
    monkeypatch.setattr(cpu_experts, "MIN_GROUPED_EXPERT_WEIGHTS", 0)
    glu = SwitchGLU(16, 8, 8, activation=GeGLU(), bias=False)
    x = mx.random.normal((1, 12, 16), key=mx.random.key(0))
    piled = mx.zeros((1, 12, 1), dtype=mx.int32)
    assert cpu_experts.expert_groups_on_host(glu, piled.size) == (mx.default_device() == mx.cpu)
    assert cpu_experts.grouped_switch_glu(glu, x, piled) is None
    assert mx.array_equal(cpu_experts.switch_glu(glu, x, piled), glu(x, piled))
    spread = mx.random.randint(0, 8, (1, 12, 1), key=mx.random.key(1))
    assert mx.allclose(cpu_experts.grouped_switch_glu(glu, x, spread), glu(x, spread), atol=1e-6)


def test_upcast_experts_on_any_module():
    """On the CPU every unquantized SwitchLinear in the tree goes to float32,
    mlx-vlm's class too; quantized experts and other layers keep their dtype."""
    if mx.default_device().type != mx.DeviceType.cpu:
        pytest.skip("experts are upcast on the CPU only")
    vlm = pytest.importorskip("mlx_vlm.models.switch_layers")
    tree = nn.Module()
    tree.blocks = [SwitchLinear(64, 32, 4, bias=False), vlm.SwitchLinear(64, 32, 4, bias=False)]
    tree.quantized = QuantizedSwitchLinear(64, 32, 4, bias=False)
    tree.dense = nn.Linear(64, 32)
    tree.set_dtype(mx.bfloat16)
    cpu_experts.upcast_experts(tree)
    assert [b.weight.dtype for b in tree.blocks] == [mx.float32, mx.float32]
    assert tree.quantized.weight.dtype == mx.uint32
    assert tree.quantized.scales.dtype == mx.bfloat16
    assert tree.dense.weight.dtype == mx.bfloat16
