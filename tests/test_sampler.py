"""The sampler's per-step math against the transformers reference implementation."""

from types import SimpleNamespace

import mlx.core as mx
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers.generation import EosTokenCriteria, StoppingCriteriaList
from transformers.models.diffusion_gemma.generation_diffusion_gemma import (
    DiffusionGemmaGenerationMixin,
    EntropyBoundSampler,
    EntropyBoundSamplerConfig,
    LinearTemperatureScheduleLogitsProcessor,
    StableAndConfidentStoppingCriteria,
)

from mlx_diffgemma import sampler


def to_torch(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x))


def spread_logits(rng, batch, canvas, vocab):
    """Logits whose entropies spread from near 0 to near log(vocab)."""
    scale = rng.uniform(0.05, 12.0, size=(batch, canvas, 1))
    return (rng.standard_normal((batch, canvas, vocab)) * scale).astype(np.float32)


def reference_accept_mask(logits: np.ndarray, bound: float) -> np.ndarray:
    batch, canvas, vocab = logits.shape
    ref = EntropyBoundSampler(EntropyBoundSamplerConfig(entropy_bound=float(bound)), canvas, vocab, 10)
    current = torch.zeros((batch, canvas), dtype=torch.long)
    denoised = torch.ones((batch, canvas), dtype=torch.long)
    accepted_canvas = ref.accept_canvas(current, denoised, to_torch(logits), 5)
    mask = ref.accepted_token_mask.numpy()
    np.testing.assert_array_equal(accepted_canvas.numpy(), mask.astype(np.int64))
    return mask


def ours_accept_mask(logits: np.ndarray, bound: float) -> np.ndarray:
    entropy = sampler.token_entropy(mx.array(logits))
    return np.array(sampler.entropy_bound_accept(entropy, bound))


# ---------------------------------------------------------------- temperature


@pytest.mark.parametrize("t_min,t_max,steps", [(0.4, 0.8, 48), (0.1, 1.5, 7), (0.0, 1.0, 1), (0.25, 0.3, 256)])
def test_temperature_matches_reference_processor(t_min, t_max, steps):
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((2, 4, 11)).astype(np.float32) * 5
    proc = LinearTemperatureScheduleLogitsProcessor(t_min, t_max, steps)
    seen = set()
    for step in range(steps, 0, -1):
        t = sampler.temperature(step, steps, t_min, t_max)
        seen.add(round(t, 9))
        # _denoising_step passes the step as an int32 tensor; both forms must agree.
        for cur_step in (step, torch.tensor(step, dtype=torch.int32)):
            ref = proc(None, to_torch(logits), cur_step=cur_step).numpy()
            ours = np.array(mx.array(logits) / t)
            np.testing.assert_allclose(ours, ref, rtol=2e-7, atol=0)
    assert sampler.temperature(steps, steps, t_min, t_max) == pytest.approx(t_max)
    assert len(seen) == steps  # the schedule really moves


# -------------------------------------------------------------------- entropy


def reference_entropy(logits: np.ndarray) -> np.ndarray:
    return torch.distributions.Categorical(logits=to_torch(logits)).entropy().numpy()


@pytest.mark.parametrize("scale", [0.01, 1.0, 8.0, 60.0])
def test_entropy_matches_torch_on_random_logits(scale):
    rng = np.random.default_rng(1)
    logits = (rng.standard_normal((3, 32, 257)) * scale + 3.0).astype(np.float32)
    ours = np.array(sampler.token_entropy(mx.array(logits)))
    assert ours.dtype == np.float32 and ours.shape == (3, 32)
    np.testing.assert_allclose(ours, reference_entropy(logits), rtol=1e-5, atol=1e-5)


def float64_entropy(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    log_p = z - np.log(np.exp(z).sum(axis=-1, keepdims=True))
    return -(np.exp(log_p) * log_p).sum(axis=-1)


def test_entropy_small_values_accurate_for_large_logits():
    """Processed logits reach ~75 (softcap 30 / t 0.4). The low entropies that
    decide acceptance and stopping must not drown in rounding at that scale."""
    rng = np.random.default_rng(15)
    scale = rng.uniform(0.05, 75.0, size=(8, 64, 1))
    logits = (rng.standard_normal((8, 64, 1000)) * scale + 20.0).astype(np.float32)
    exact = float64_entropy(logits)
    ours = np.array(sampler.token_entropy(mx.array(logits)))
    torch_err = np.abs(reference_entropy(logits) - exact)
    small = exact < 0.2
    assert small.sum() > 50
    ours_err = np.abs(ours - exact)
    # float32 gives ~1e-5 relative plus a few 1e-7 absolute (log of a sum near
    # 1); a logsumexp rounded at ~75 would cost up to ~1.5e-5 absolute, as much
    # as the entropies that decide the confidence stop (mean < 0.005).
    assert (ours_err[small] <= 2e-5 * exact[small] + 5e-7).all()
    assert ours_err[small].max() * 3 < torch_err[small].max()
    np.testing.assert_allclose(ours, exact, rtol=1e-5, atol=2e-6)


def test_entropy_peaked_uniform_and_masked_logits():
    rng = np.random.default_rng(2)
    vocab = 300
    base = rng.standard_normal((4, 16, vocab)).astype(np.float32)
    hot = rng.integers(0, vocab, size=(4, 16))
    rows = []
    for boost in (1e4, 200.0, 25.0, 12.0):  # exp(-boost) from underflowing to ~1e-5
        x = base.copy()
        np.put_along_axis(x, hot[..., None], boost, axis=-1)
        rows.append(x)
    peaked = np.stack(rows).reshape(-1, 16, vocab)
    uniform = np.zeros((2, 16, vocab), np.float32)
    masked = base[:2].copy()
    masked[..., ::3] = -np.inf  # e.g. banned tokens
    for logits in (peaked, uniform, masked):
        ours = np.array(sampler.token_entropy(mx.array(logits)))
        ref = reference_entropy(logits)
        assert np.isfinite(ours).all() and (ours >= 0).all()
        np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.array(sampler.token_entropy(mx.array(uniform))), np.log(vocab), rtol=5e-6)
    # The hugely peaked rows are exactly deterministic.
    assert (np.array(sampler.token_entropy(mx.array(peaked[:4]))) == 0).all()


# ----------------------------------------------------------------- acceptance


@pytest.mark.parametrize("bound", [1e-6, 0.01, 0.1, 0.5, 2.0, 10.0, 1e9])
def test_accept_mask_matches_reference_on_random_logits(bound):
    rng = np.random.default_rng(3)
    logits = spread_logits(rng, 4, 64, 200)
    ours = ours_accept_mask(logits, bound)
    ref = reference_accept_mask(logits, bound)
    np.testing.assert_array_equal(ours, ref)
    counts = ours.sum(axis=-1)
    assert (counts >= 1).all()
    if bound == 1e-6:
        assert (counts == 1).all()
    if bound == 1e9:
        assert ours.all()
    if 0.01 <= bound <= 10.0:
        assert (counts > 1).any() and (counts < 64).all()


def test_accept_only_first_position_for_tiny_bound():
    """The lowest-entropy position is accepted for any bound >= 0; with all
    entropies > 0 and a tiny bound, nothing else is."""
    rng = np.random.default_rng(4)
    logits = spread_logits(rng, 3, 40, 100)
    entropy = sampler.token_entropy(mx.array(logits))
    for bound in (1e-6, 0.0):
        ours = np.array(sampler.entropy_bound_accept(entropy, bound))
        expected = np.zeros_like(ours)
        expected[np.arange(3), np.argmin(np.array(entropy), axis=-1)] = True
        np.testing.assert_array_equal(ours, expected)
    np.testing.assert_array_equal(ours_accept_mask(logits, 1e-6), reference_accept_mask(logits, 1e-6))
    assert not np.array(sampler.entropy_bound_accept(entropy, -1e-3)).any()


def test_zero_entropy_positions_are_free_and_one_more_is_accepted():
    """Deterministic positions add nothing to the sum, so all are accepted, plus
    the next-lowest position whatever its entropy (the `- max` in the rule)."""
    rng = np.random.default_rng(5)
    vocab, canvas = 64, 32
    logits = rng.standard_normal((2, canvas, vocab)).astype(np.float32) * 3
    peaked = rng.random((2, canvas)) < 0.5
    hot = rng.integers(0, vocab, size=(2, canvas))
    boosted = logits.copy()
    np.put_along_axis(boosted, hot[..., None], 1e4, axis=-1)
    logits = np.where(peaked[..., None], boosted, logits)
    entropy = np.array(sampler.token_entropy(mx.array(logits)))
    assert (entropy[peaked] == 0).all() and (entropy[~peaked] > 1e-3).all()
    expected = peaked.copy()
    for b in range(2):
        free = np.where(~peaked[b])[0]
        expected[b, free[np.argmin(entropy[b, free])]] = True
    np.testing.assert_array_equal(ours_accept_mask(logits, 0.1), expected)
    np.testing.assert_array_equal(reference_accept_mask(logits, 0.1), expected)


def test_ties_straddling_the_bound():
    """A run of equal entropies can be split by the bound. We give it to the lower
    positions; the reference's unstable torch.sort may pick others, but accepts
    as many, with the same entropies."""
    rng = np.random.default_rng(6)
    vocab, canvas = 50, 96  # >= 64: torch's CPU sort is not stable here
    kinds = rng.standard_normal((4, vocab)).astype(np.float32) * np.array([[0.5], [1.0], [2.0], [4.0]], np.float32)
    which = rng.integers(0, 4, size=(2, canvas))
    logits = kinds[which]  # many positions share bit-identical logits
    entropy = np.array(sampler.token_entropy(mx.array(logits)))
    assert len(np.unique(entropy)) == 4
    bound = float(np.sort(entropy[0])[:20].sum() - 1e-3)  # inside a tie run
    ours = ours_accept_mask(logits, bound)
    ref = reference_accept_mask(logits, bound)
    np.testing.assert_array_equal(ours.sum(-1), ref.sum(-1))
    for b in range(2):
        np.testing.assert_array_equal(np.sort(entropy[b][ours[b]]), np.sort(entropy[b][ref[b]]))
        order = np.argsort(entropy[b], kind="stable")
        expected = np.zeros(canvas, bool)
        expected[order[: ours[b].sum()]] = True
        np.testing.assert_array_equal(ours[b], expected)
    # The split is real: some tied positions are accepted and some are not.
    h_edge = np.sort(entropy[0])[19]
    tied = entropy[0] == h_edge
    assert ours[0][tied].any() and not ours[0][tied].all()


def entropy_rule(entropy: np.ndarray, bound: float):
    """Plain restatement of the rule in float64, plus the positions that sit so
    close to the bound that float32 rounding may decide them either way."""
    order = np.argsort(entropy, axis=-1, kind="stable")
    h = np.take_along_axis(entropy.astype(np.float64), order, axis=-1)
    before = np.cumsum(h, axis=-1) - h
    tol = 1e-5 * (1.0 + h.sum(-1, keepdims=True) + abs(bound))
    accept, unsure = np.zeros(entropy.shape, bool), np.zeros(entropy.shape, bool)
    np.put_along_axis(accept, order, before <= bound, axis=-1)
    np.put_along_axis(unsure, order, np.abs(before - bound) <= tol, axis=-1)
    return accept, unsure, order


entropy_values = st.one_of(
    st.sampled_from([0.0, 0.0, 1e-7, 0.01, 0.05, 0.1, 0.3, 1.0, 5.0, 12.47]),
    st.floats(0.0, 13.0, width=32),
)


@settings(max_examples=300, deadline=None)
@given(
    data=st.data(),
    batch=st.integers(1, 3),
    length=st.integers(1, 64),
    bound=st.one_of(
        st.sampled_from([0.0, 1e-9, 0.05, 0.1, 0.3, 1.0, 1e6]),
        st.floats(1e-9, 1e6),
    ),
)
def test_accept_mask_follows_the_rule(data, batch, length, bound):
    rows = data.draw(
        st.lists(
            st.lists(entropy_values, min_size=length, max_size=length),
            min_size=batch,
            max_size=batch,
        )
    )
    entropy = np.array(rows, np.float32)
    ours = np.array(sampler.entropy_bound_accept(mx.array(entropy), bound))
    accept, unsure, order = entropy_rule(entropy, bound)
    np.testing.assert_array_equal(ours[~unsure], accept[~unsure])
    # Always a prefix of the stable entropy order, never empty.
    in_order = np.take_along_axis(ours, order, axis=-1)
    assert (np.diff(in_order.astype(int), axis=-1) <= 0).all()
    assert in_order[:, 0].all()


# -------------------------------------------------------------------- the step


def test_deterministic_limit_accepts_everything_as_argmax():
    rng = np.random.default_rng(7)
    vocab = 120
    logits = rng.standard_normal((3, 48, vocab)).astype(np.float32)
    hot = rng.integers(0, vocab, size=(3, 48))
    np.put_along_axis(logits, hot[..., None], 1e3, axis=-1)
    out = sampler.denoise_step_update(mx.array(logits), 0.1, mx.random.key(0))
    assert np.array(out.accepted).all()
    np.testing.assert_array_equal(np.array(out.argmax_canvas), hot)
    np.testing.assert_array_equal(np.array(out.next_canvas), hot)
    assert out.next_canvas.dtype == mx.int32 and out.argmax_canvas.dtype == mx.int32


def test_argmax_and_entropy_outputs():
    rng = np.random.default_rng(8)
    logits = spread_logits(rng, 2, 32, 90)
    logits[0, 0, [3, 7]] = 100.0  # tie: first index, as torch.argmax
    out = sampler.denoise_step_update(mx.array(logits), 0.1, mx.random.key(1))
    np.testing.assert_array_equal(np.array(out.argmax_canvas), torch.argmax(to_torch(logits), dim=-1).numpy())
    np.testing.assert_allclose(np.array(out.entropy), reference_entropy(logits), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(np.array(out.accepted), reference_accept_mask(logits, 0.1))


def test_mixed_canvas_peaked_positions_keep_their_token_rest_is_noise():
    rng = np.random.default_rng(9)
    batch, canvas, vocab = 64, 64, 50
    peaked = rng.random((batch, canvas)) < 0.3
    peaked[:, 0] = False  # every row has a high-entropy position
    hot = rng.integers(0, vocab, size=(batch, canvas))
    logits = np.zeros((batch, canvas, vocab), np.float32)  # uniform
    boosted = logits.copy()
    np.put_along_axis(boosted, hot[..., None], 1e3, axis=-1)
    logits = np.where(peaked[..., None], boosted, logits)

    out = sampler.denoise_step_update(mx.array(logits), 0.1, mx.random.key(2))
    accepted, nxt = np.array(out.accepted), np.array(out.next_canvas)
    # All peaked positions plus the first uniform one (ties -> lowest index).
    expected = peaked.copy()
    expected[np.arange(batch), np.argmax(~peaked, axis=-1)] = True
    np.testing.assert_array_equal(accepted, expected)
    np.testing.assert_array_equal(accepted.sum(-1), reference_accept_mask(logits, 0.1).sum(-1))
    np.testing.assert_array_equal(nxt[peaked], hot[peaked])
    # Renoised positions: uniform over the vocabulary, unrelated to the argmax.
    noise = nxt[~accepted]
    assert noise.min() >= 0 and noise.max() < vocab
    counts = np.bincount(noise, minlength=vocab)
    expected_count = noise.size / vocab
    chi2 = ((counts - expected_count) ** 2 / expected_count).sum()
    assert chi2 < 100, chi2  # 49 dof: p < 1e-4
    assert np.mean(noise == hot[~accepted]) < 0.05


def test_accepted_positions_are_sampled_not_argmax():
    batch, canvas = 64, 64
    probs = np.array([0.5, 0.3, 0.2, 0.0, 0.0])
    with np.errstate(divide="ignore"):
        logits = np.broadcast_to(np.log(probs), (batch, canvas, 5)).astype(np.float32)
    out = sampler.denoise_step_update(mx.array(logits), 1e6, mx.random.key(3))
    assert np.array(out.accepted).all()
    tokens = np.array(out.next_canvas).ravel()
    freq = np.bincount(tokens, minlength=5) / tokens.size
    np.testing.assert_allclose(freq, probs, atol=0.03)
    assert (np.array(out.argmax_canvas) == 0).all()


def test_renoise_keeps_kept_positions_and_redraws_the_rest():
    rng = np.random.default_rng(10)
    batch, canvas, vocab = 64, 64, 40
    canvas_ids = np.full((batch, canvas), 7, np.int32)
    keep = rng.random((batch, canvas)) < 0.4
    out = np.array(sampler.renoise(mx.array(canvas_ids), mx.array(keep), vocab, mx.random.key(4)))
    assert (out[keep] == 7).all()
    redrawn = out[~keep]
    assert redrawn.min() >= 0 and redrawn.max() < vocab
    assert np.mean(redrawn == 7) < 2.0 / vocab
    counts = np.bincount(redrawn, minlength=vocab)
    expected_count = redrawn.size / vocab
    assert ((counts - expected_count) ** 2 / expected_count).sum() < 85  # 39 dof


def test_same_key_same_step_different_key_different_step():
    logits = mx.zeros((2, 32, 100))
    a = sampler.denoise_step_update(logits, 0.1, mx.random.key(11))
    b = sampler.denoise_step_update(logits, 0.1, mx.random.key(11))
    c = sampler.denoise_step_update(logits, 0.1, mx.random.key(12))
    np.testing.assert_array_equal(np.array(a.next_canvas), np.array(b.next_canvas))
    assert np.mean(np.array(a.next_canvas) != np.array(c.next_canvas)) > 0.8
    # The key is split, not used directly for the noise nor for the samples (a
    # reused key would give correlated draws from one stream).
    key = mx.random.key(11)
    noise_pos = ~np.array(a.accepted)
    direct_noise = np.array(sampler.initial_canvas(key, 2, 32, 100))
    assert np.mean(direct_noise[noise_pos] == np.array(a.next_canvas)[noise_pos]) < 0.1
    all_sampled = sampler.denoise_step_update(logits, 1e9, key).next_canvas
    direct_samples = np.array(sampler.sample_from(sampler.distribution(logits), key))
    assert np.mean(direct_samples == np.array(all_sampled)) < 0.1


def test_initial_canvas_uniform_and_seeded():
    vocab = 64
    a = sampler.initial_canvas(mx.random.key(0), 32, 64, vocab)
    b = sampler.initial_canvas(mx.random.key(0), 32, 64, vocab)
    c = sampler.initial_canvas(mx.random.key(1), 32, 64, vocab)
    assert a.shape == (32, 64) and a.dtype == mx.int32
    a, b, c = np.array(a), np.array(b), np.array(c)
    np.testing.assert_array_equal(a, b)
    assert np.mean(a != c) > 0.9
    assert a.min() >= 0 and a.max() < vocab
    counts = np.bincount(a.ravel(), minlength=vocab)
    assert len(counts) == vocab
    expected_count = a.size / vocab
    assert ((counts - expected_count) ** 2 / expected_count).sum() < 120  # 63 dof


def test_hold_finished_rows_matches_reference_freezing():
    rng = np.random.default_rng(12)
    finished = np.array([True, False, True])
    old_c, new_c = rng.integers(0, 9, (2, 3, 5))
    old_l, new_l = rng.standard_normal((2, 3, 5, 7)).astype(np.float32)
    f = torch.tensor(finished)
    np.testing.assert_array_equal(
        np.array(sampler.hold_finished_rows(mx.array(finished), mx.array(old_c), mx.array(new_c))),
        torch.where(f[:, None], to_torch(old_c), to_torch(new_c)).numpy(),
    )
    np.testing.assert_array_equal(
        np.array(sampler.hold_finished_rows(mx.array(finished), mx.array(old_l), mx.array(new_l))),
        torch.where(f[:, None, None], to_torch(old_l), to_torch(new_l)).numpy(),
    )


# ----------------------------------------------------------------- stop check


def stop_sequence(rng, steps, batch, canvas, vocab):
    """Argmax canvases and logits over a run of steps: row 0 settles early, row 1
    keeps changing, row 2 alternates between runs of two canvases; confidence
    switches on and off."""
    a, b = rng.integers(0, vocab, (2, canvas))
    canvases, logits = [], []
    for s in range(steps):
        c = np.empty((batch, canvas), np.int64)
        c[0] = a if s >= 2 else rng.integers(0, vocab, canvas)
        c[1] = rng.integers(0, vocab, canvas)
        c[2] = a if (s // 3) % 2 == 0 else b
        for r in range(3, batch):
            c[r] = a
        sharp = rng.random((batch, 1, 1)) < 0.7
        x = rng.standard_normal((batch, canvas, vocab)).astype(np.float32)
        peaked = x.copy()
        np.put_along_axis(peaked, c[..., None], 40.0, axis=-1)
        canvases.append(c)
        logits.append(np.where(sharp, peaked, x))
    return canvases, logits


@pytest.mark.parametrize("stability_threshold", [0, 1, 2, 3])
def test_stop_check_matches_reference_over_steps(stability_threshold):
    rng = np.random.default_rng(13 + stability_threshold)
    batch, canvas, vocab, steps = 4, 16, 40, 14
    canvases, logits = stop_sequence(rng, steps, batch, canvas, vocab)
    ref = StableAndConfidentStoppingCriteria(stability_threshold, 0.005)
    history = sampler.empty_argmax_history(stability_threshold, batch, canvas)
    stops = []
    for c, x in zip(canvases, logits):
        expected = ref(to_torch(c), to_torch(x)).numpy()
        entropy = sampler.token_entropy(mx.array(x))
        stop, history = sampler.stable_and_confident(mx.array(c, dtype=mx.int32), history, entropy, 0.005)
        assert history.shape == (stability_threshold, batch, canvas)
        np.testing.assert_array_equal(np.array(stop), expected)
        stops.append(expected)
    stops = np.array(stops)
    assert stops.any() and not stops.all()
    if stability_threshold > 0:
        assert not stops[:stability_threshold].any()  # no history yet
        assert not stops[:, 1].any()  # row 1 never repeats


def test_stop_check_after_reset_starts_without_history():
    """A new canvas starts from empty history, as the reference's reset()."""
    canvas = mx.array([[1, 2, 3]], dtype=mx.int32)
    entropy = mx.zeros((1, 3))
    history = sampler.empty_argmax_history(1, 1, 3)
    stop, history = sampler.stable_and_confident(canvas, history, entropy, 0.005)
    assert not stop.item()
    stop, history = sampler.stable_and_confident(canvas, history, entropy, 0.005)
    assert stop.item()
    stop, _ = sampler.stable_and_confident(canvas, history, mx.full((1, 3), 0.006), 0.005)
    assert not stop.item()  # stable but not confident
    stop, _ = sampler.stable_and_confident(canvas, sampler.empty_argmax_history(1, 1, 3), entropy, 0.005)
    assert not stop.item()


# --------------------------------------------------------------- end of text


def reference_finalize(canvas: np.ndarray, eos_ids, pad_id) -> np.ndarray:
    batch, length = canvas.shape
    prompt = np.full((batch, 3), 9, np.int64)
    input_ids = to_torch(np.concatenate([prompt, canvas], axis=1).astype(np.int64))
    out, finished = DiffusionGemmaGenerationMixin._finalize_canvas(
        input_ids=input_ids,
        finished_sequences=torch.zeros(batch, dtype=torch.bool),
        generation_config=SimpleNamespace(pad_token_id=pad_id, eos_token_id=eos_ids),
        stopping_criteria=StoppingCriteriaList([EosTokenCriteria(eos_ids)]),
        canvas_length=length,
        eos_tensor=torch.tensor(eos_ids),
    )
    assert (out[:, :3] == 9).all()
    return out[:, -length:].numpy()


def finalize(rows, eos_ids, pad_id):
    """What generation commits per row (split_at_eos: tokens, then the EOS),
    written back in the reference's form: the row through its first EOS, padded."""
    out = np.full_like(rows, pad_id)
    for r, row in enumerate(rows.tolist()):
        ids, stop = sampler.split_at_eos(row, eos_ids)
        kept = ids + ([stop] if stop is not None else [])
        out[r, : len(kept)] = kept
    return out


def test_split_at_eos_matches_reference_cases():
    eos, pad = [1, 106, 50], 0
    rows = np.array(
        [
            [1, 5, 6, 7, 8, 9, 10, 11],  # EOS first
            [5, 6, 7, 106, 8, 9, 10, 11],  # middle
            [5, 6, 7, 8, 9, 10, 11, 50],  # last
            [5, 6, 7, 8, 9, 10, 11, 12],  # none
            [5, 50, 7, 1, 8, 106, 10, 11],  # several different EOS ids
            [5, 6, 1, 1, 1, 9, 10, 11],  # repeated EOS
            [0, 0, 1, 0, 7, 0, 0, 3],  # pad ids around
        ]
    )
    expected = reference_finalize(rows, eos, pad)
    ours = finalize(rows, eos, pad)
    np.testing.assert_array_equal(ours, expected)
    np.testing.assert_array_equal(ours[1], [5, 6, 7, 106, 0, 0, 0, 0])
    np.testing.assert_array_equal(ours[3], rows[3])


@pytest.mark.parametrize("eos", [2, [2], [2, 3, 4]])
def test_split_at_eos_matches_reference_random(eos):
    rng = np.random.default_rng(14)
    rows = rng.integers(0, 40, size=(64, 32))
    eos_list = [eos] if isinstance(eos, int) else eos
    expected = reference_finalize(rows, eos_list, 0)
    ours = finalize(rows, eos_list, 0)
    np.testing.assert_array_equal(ours, expected)
    assert (ours != rows).any()
