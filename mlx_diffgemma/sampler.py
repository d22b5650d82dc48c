"""The per-step math of DiffusionGemma's entropy-bounded denoising sampler.

One canvas is denoised over steps k = N, N-1, ..., 1 (k counts the steps that
remain). Each step the decoder's logits are divided by a temperature that falls
linearly with k, a token is sampled per position, the lowest-entropy positions
whose summed entropy stays under a bound are accepted, and every other position
is re-drawn uniformly from the vocabulary. The canvas stops early once its argmax
is stable across steps and its mean entropy is low.

Everything here is a plain function on `mx.array`s: no token loops and no host
syncs, so a step can stay lazy (or be compiled) end to end. Randomness comes
only from explicit keys; split one seeded key per generate call.

Tokens are int32 throughout: MLX's categorical/argmax return uint32, and mixing
the two would promote comparisons and `where`s to int64.
"""

from functools import partial
from typing import List, NamedTuple, Optional, Sequence, Tuple

import mlx.core as mx

TOKEN_DTYPE = mx.int32
# Vocabulary entries per block where a search over the vocabulary runs in two
# levels (sampling, top-k): blocks first, then within one.
TOP_K_BLOCK = 256


def temperature(step: int, max_denoising_steps: int, t_min: float, t_max: float) -> float:
    """Temperature at `step` (N at the first step, 1 at the last).

    Linear in the remaining steps: t_max at step N, falling towards t_min.
    """
    return t_min + (t_max - t_min) * step / max_denoising_steps


class Distribution(NamedTuple):
    """softmax(processed_logits) over the vocabulary, from one pass of exp.

    A step needs the distribution three times (the entropies, a sample, and
    the next step's self-conditioning); exp over [B, C, V] is by far its most
    expensive elementwise pass, so it is taken once.
    """

    shifted: mx.array  # logits - max, float32, <= 0
    weights: mx.array  # exp(shifted): unnormalised probabilities, max 1
    total: mx.array  # sum of weights, [..., 1], >= 1

    @property
    def probs(self) -> mx.array:
        return self.weights / self.total

    def log_prob(self, tokens: mx.array) -> mx.array:
        """log p(token) at each position, for ``tokens`` shaped like the positions."""
        picked = mx.take_along_axis(self.shifted, tokens[..., None].astype(mx.int32), axis=-1)
        return (picked - mx.log(self.total))[..., 0]

    @property
    def entropy(self) -> mx.array:
        # H = log Z - sum(w * s) / Z with s = x - max(x): both terms are >= 0,
        # so nothing cancels, and a one-hot row gives exactly 0. Shifting by
        # the max keeps the small entropies the accept and stop rules look at
        # accurate even for logits of ~75 (softcap 30 over t = 0.4). The sum
        # is a row-by-row dot product: one read of each array, no product
        # array written and read back.
        dot = (self.weights[..., None, :] @ self.shifted[..., :, None])[..., 0]
        return (mx.log(self.total) - dot / self.total)[..., 0]


@partial(mx.compile, shapeless=True)
def _shifted(logits: mx.array, top: mx.array, temperature: mx.array) -> mx.array:
    # One fused pass: (x - max x) / t is x / t - max(x / t), since t > 0.
    # A -inf logit gives weight 0; clamp so that 0 * shifted is 0, not NaN.
    return mx.maximum((logits - top) / temperature, mx.finfo(mx.float32).min)


def distribution(logits: mx.array, temperature: float = 1.0) -> Distribution:
    """softmax(logits / temperature), without writing logits / temperature out."""
    logits = logits.astype(mx.float32)
    shifted = _shifted(logits, logits.max(axis=-1, keepdims=True), mx.array(temperature, dtype=mx.float32))
    weights = mx.exp(shifted)
    return Distribution(shifted, weights, weights.sum(axis=-1, keepdims=True))


def token_entropy(processed_logits: mx.array) -> mx.array:
    """Entropy (nats) of softmax(processed_logits) over the vocabulary, float32."""
    return distribution(processed_logits).entropy


def entropy_bound_accept(entropy: mx.array, entropy_bound: float) -> mx.array:
    """Which positions to accept this step, as a bool mask shaped like `entropy`.

    Positions are taken in order of increasing entropy while the entropy summed
    over the positions taken *before* the current one stays <= entropy_bound.
    (The reference writes this as sum(H_1..H_k) - max(H_1..H_k) <= bound: an
    upper bound on the mutual information among the accepted tokens.) So the
    lowest-entropy position is always accepted when the bound is >= 0 and each
    step makes progress, and the last accepted position may itself have a
    large entropy.

    Ties: a run of equal entropies h > 0 can straddle the bound, in which case
    only the first few of them are accepted. MLX's argsort is stable, so ties go
    to the lower position index. The reference uses torch.sort(stable=False),
    whose order among ties is implementation defined (not stable on CPU for
    rows of 64 or more), so it may pick different members of such a run; the
    number accepted and their entropies agree.

    The prefix sum is computed as an exclusive cumsum rather than the
    reference's `cumsum(H) - H`: equal in exact arithmetic, but it avoids
    cancellation and is monotone, so the accepted set is always a prefix of the
    sorted order.
    """
    order = mx.argsort(entropy, axis=-1)
    sorted_entropy = mx.take_along_axis(entropy, order, axis=-1)
    entropy_before = mx.cumsum(sorted_entropy, axis=-1, inclusive=False)
    accept_sorted = entropy_before <= entropy_bound
    return mx.put_along_axis(mx.zeros(entropy.shape, dtype=mx.bool_), order, accept_sorted, axis=-1)


def _inverse_cdf(weights: mx.array, target: mx.array) -> mx.array:
    """How many entries of the cumulative sum of ``weights`` are <= ``target``."""
    return (mx.cumsum(weights, axis=-1) <= target).sum(axis=-1)


def sample_from(dist: Distribution, key: mx.array) -> mx.array:
    """One token per position by inverting the cumulative distribution.

    Like torch.multinomial (the reference's sampler), and it needs one uniform
    number per position instead of Gumbel noise over the whole vocabulary.
    A large vocabulary is searched in two levels, blocks of TOP_K_BLOCK
    first: the same token in exact arithmetic, but one cheap pass (the block
    sums) over the vocabulary instead of a cumulative sum written and read.
    """
    w = dist.weights
    V = w.shape[-1]
    u = mx.random.uniform(shape=w.shape[:-1] + (1,), key=key)
    n_blocks = V // TOP_K_BLOCK
    if V % TOP_K_BLOCK or n_blocks < 4:
        index = _inverse_cdf(w, u * dist.total)
        return mx.minimum(index, V - 1).astype(TOKEN_DTYPE)
    blocks = w.reshape(*w.shape[:-1], n_blocks, TOP_K_BLOCK)
    block_cdf = mx.cumsum(blocks.sum(axis=-1), axis=-1)
    target = u * block_cdf[..., -1:]
    block = mx.minimum((block_cdf <= target).sum(axis=-1), n_blocks - 1)
    before = mx.take_along_axis(block_cdf, mx.maximum(block - 1, 0)[..., None], axis=-1)
    before = mx.where(block[..., None] > 0, before, 0.0)
    inner = mx.take_along_axis(blocks, block[..., None, None], axis=-2)[..., 0, :]
    offset = mx.minimum(_inverse_cdf(inner, target - before), TOP_K_BLOCK - 1)
    return (block * TOP_K_BLOCK + offset).astype(TOKEN_DTYPE)


def top_k(weights: mx.array, k: int) -> Tuple[mx.array, mx.array]:
    """The ``k`` largest of ``weights`` [..., V] per row: (indices, values), in no order.

    Exact, in two passes instead of a selection over the whole vocabulary
    (which on a CPU costs more than the product it would save): the k blocks
    of TOP_K_BLOCK entries with the largest maxima hold the k largest entries
    (a block holding one of them has a maximum at least the k-th largest,
    and only k blocks can hold them), so the selection runs on k blocks.
    Ties at the k-th value may be broken differently from a full selection.
    """
    V = weights.shape[-1]
    n_blocks = V // TOP_K_BLOCK
    if V % TOP_K_BLOCK or n_blocks <= 2 * k:
        index = mx.argpartition(-weights, kth=k - 1, axis=-1)[..., :k]
        return index, mx.take_along_axis(weights, index, axis=-1)
    blocks = weights.reshape(*weights.shape[:-1], n_blocks, TOP_K_BLOCK)
    best_blocks = mx.argpartition(-blocks.max(axis=-1), kth=k - 1, axis=-1)[..., :k]
    # [..., k * TOP_K_BLOCK] vocabulary ids of the candidate entries.
    ids = (best_blocks[..., None] * TOP_K_BLOCK + mx.arange(TOP_K_BLOCK)).reshape(*weights.shape[:-1], -1)
    candidates = mx.take_along_axis(weights, ids, axis=-1)
    picked = mx.argpartition(-candidates, kth=k - 1, axis=-1)[..., :k]
    return mx.take_along_axis(ids, picked, axis=-1), mx.take_along_axis(candidates, picked, axis=-1)


def argmax_tokens(processed_logits: mx.array) -> mx.array:
    """Most likely token per position (first index on ties, as torch.argmax)."""
    return mx.argmax(processed_logits, axis=-1).astype(TOKEN_DTYPE)


def initial_canvas(key: mx.array, batch: int, canvas_length: int, vocab_size: int) -> mx.array:
    """A canvas of token ids drawn uniformly from [0, vocab_size)."""
    return mx.random.randint(0, vocab_size, (batch, canvas_length), dtype=TOKEN_DTYPE, key=key)


def renoise(canvas: mx.array, keep: mx.array, vocab_size: int, key: mx.array) -> mx.array:
    """Re-draw every position not in `keep` uniformly from the vocabulary."""
    noise = initial_canvas(key, canvas.shape[0], canvas.shape[1], vocab_size)
    return mx.where(keep, canvas, noise)


class DenoiseStep(NamedTuple):
    next_canvas: mx.array  # [B, C] decoder input for the next step
    argmax_canvas: mx.array  # [B, C] what gets committed if the canvas stops here
    entropy: mx.array  # [B, C] float32, reused by the stop check
    accepted: mx.array  # [B, C] bool
    weights: mx.array  # [B, C, V] float32 softmax of the processed logits, unnormalised (max 1)
    total: mx.array  # [B, C, 1] their sum
    # [B, C] float32: log-probability of each fixed position's token under the
    # processed logits (0 elsewhere); None without fixed positions. How much
    # the model agrees with the given text: infilling ranks gap lengths by it.
    fixed_logprob: Optional[mx.array] = None

    @property
    def probs(self) -> mx.array:
        return self.weights / self.total


class FixedPositions(NamedTuple):
    """Canvas positions whose tokens are given (infilling, editing).

    ``mask`` [B, C] bool marks them; ``tokens`` [B, C] holds their ids (read
    only where ``mask`` is set).
    """

    mask: mx.array
    tokens: mx.array

    def row(self, r: int) -> "FixedPositions":
        return FixedPositions(self.mask[r : r + 1], self.tokens[r : r + 1])


def threshold_accept(dist: Distribution, accept_threshold: float) -> mx.array:
    """Positions whose most likely token has probability >= ``accept_threshold``.

    Confidence-threshold parallel decoding (Fast-dLLM; mlx-vlm's default): a
    departure from the reference, which accepts by the entropy bound alone.
    The top probability is 1 / total, since the largest weight is exp(0).
    """
    return dist.total[..., 0] * accept_threshold <= 1.0


def denoise_step_update(
    logits: mx.array,
    entropy_bound: float,
    key: mx.array,
    fixed: Optional[FixedPositions] = None,
    temperature: float = 1.0,
    accept_threshold: float = 0.0,
) -> DenoiseStep:
    """Turn one step's logits [B, C, V] at ``temperature`` into the next canvas.

    The reference first puts the sampled tokens into the current canvas at the
    accepted positions and then renoises every other position, so the current
    canvas never survives into the next one: accepted positions hold the sample,
    all others fresh uniform noise. Hence no `current_canvas` argument. Accepted
    positions are not frozen; the next step may change them again.

    ``fixed`` positions are certain: their entropy counts as 0 (so they are
    accepted first and take none of the entropy budget, and they count as
    confident in the stop check), and they keep their token in the next canvas
    and the argmax canvas. ``accept_threshold`` > 0 also accepts every
    position at least that sure of its top token (``threshold_accept``).
    Without either the step is exactly the reference's.
    """
    sample_key, noise_key = mx.random.split(key)
    dist = distribution(logits, temperature)
    entropy = dist.entropy
    if fixed is not None:
        entropy = mx.where(fixed.mask, 0.0, entropy)
    accepted = entropy_bound_accept(entropy, entropy_bound)
    if accept_threshold:
        accepted = accepted | threshold_accept(dist, accept_threshold)
    sampled = sample_from(dist, sample_key)
    next_canvas = renoise(sampled, accepted, logits.shape[-1], noise_key)
    argmax = argmax_tokens(logits)  # a temperature does not move it
    fixed_logprob = None
    if fixed is not None:
        tokens = fixed.tokens.astype(TOKEN_DTYPE)
        accepted = accepted | fixed.mask
        next_canvas = mx.where(fixed.mask, tokens, next_canvas)
        argmax = mx.where(fixed.mask, tokens, argmax)
        fixed_logprob = mx.where(fixed.mask, dist.log_prob(tokens), 0.0)
    return DenoiseStep(next_canvas, argmax, entropy, accepted, dist.weights, dist.total, fixed_logprob)


def hold_finished_rows(finished: mx.array, previous: mx.array, updated: mx.array) -> mx.array:
    """Rows of `updated`, except finished rows keep `previous`.

    In a batch, a row that already stopped keeps its canvas, argmax canvas and
    self-conditioning logits while the other rows go on denoising. Works for
    [B, C] canvases and [B, C, V] logits alike.
    """
    finished = finished.reshape(finished.shape + (1,) * (updated.ndim - 1))
    return mx.where(finished, previous, updated)


def empty_argmax_history(stability_threshold: int, batch: int, canvas_length: int) -> mx.array:
    """The stop check's history at the start of a canvas: [S, B, C] of -1.

    -1 is never a token, so no canvas matches it and the first S steps cannot
    count as stable. S = 0 gives an empty history: always stable.
    """
    return mx.full((stability_threshold, batch, canvas_length), -1, dtype=TOKEN_DTYPE)


def stable_and_confident(
    argmax_canvas: mx.array,
    history: mx.array,
    entropy: mx.array,
    confidence_threshold: float,
) -> Tuple[mx.array, mx.array]:
    """Whether each row may stop denoising, and the history for the next step.

    Stable: `argmax_canvas` equals each of the last S argmax canvases held in
    `history` ([S, B, C], oldest first; see `empty_argmax_history`).
    Confident: the mean entropy over the canvas is below `confidence_threshold`.
    Returns (stop [B] bool, history with `argmax_canvas` appended and the oldest
    entry dropped). Rows that already stopped should pass their held argmax
    canvas (see `hold_finished_rows`), as the reference does.
    """
    # all() over an empty S axis is True, which is exactly "S = 0: always stable".
    stable = (history == argmax_canvas[None]).all(axis=-1).all(axis=0)
    confident = entropy.mean(axis=-1) < confidence_threshold
    history = mx.concatenate([history, argmax_canvas[None]], axis=0)[1:]
    return stable & confident, history


def commit_stable(
    argmax_canvas: mx.array,
    previous_argmax: mx.array,
    streak: mx.array,
    accepted: mx.array,
    entropy: mx.array,
    committed: mx.array,
    commit_after: int,
    confidence_threshold: float,
) -> Tuple[mx.array, mx.array]:
    """Per-position early commitment (a departure from the reference, which
    resamples every position every step): the canvas' stop rule applied to
    each position alone. Returns (streak, committed) after a step.

    ``streak`` [B, C] counts the steps a position's argmax has not changed
    (-1 before a canvas' first step); a position is committed once it is
    accepted, its streak is at least ``commit_after`` and its own entropy is
    under ``confidence_threshold``, and stays committed. The caller then
    holds it at its argmax as a fixed position.
    """
    streak = mx.where(argmax_canvas == previous_argmax, streak + 1, 0)
    ready = accepted & (streak >= commit_after) & (entropy < confidence_threshold)
    return streak, committed | ready


def split_at_eos(tokens: Sequence[int], eos_ids: Sequence[int]) -> Tuple[List[int], Optional[int]]:
    """A committed row's tokens before its first EOS, and that EOS (None if none).

    The reference keeps the row up to and including the first EOS and pads the
    rest; the caller counts the EOS but does not return it as text.
    """
    for i, t in enumerate(tokens):
        if t in eos_ids:
            return list(tokens[:i]), t
    return list(tokens), None
