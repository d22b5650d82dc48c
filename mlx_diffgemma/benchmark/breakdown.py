"""Where a denoising step spends its time: each part of ``denoising.denoise_step``
timed on the inputs it received in a real step, beside its matrix products
timed alone (the floor)."""

import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Dict, List, NamedTuple, Optional

import mlx.core as mx
import mlx.nn as nn

from ..cache import PromptCache
from ..config import ModelArgs
from ..denoising import CanvasState, denoise_step, sample_step, uses_probs
from ..generate import RowKeys, noise_canvas
from ..model import Model
from ..prompts import encode_prompt, row_seeds
from ..sampler_params import SamplerParams
from .common import interleaved_medians

COMPONENTS = ("attention", "dense_mlp", "experts", "lm_head", "self_conditioning", "sampler")

COMPONENT_NAMES = {
    "attention": "attention (all layers)",
    "dense_mlp": "dense MLP",
    "experts": "experts (router + SwitchGLU)",
    "lm_head": "LM head",
    "self_conditioning": "self-conditioning",
    "sampler": "sampler + stop check",
    "remainder": "remainder (norms, embed, glue)",
}


class _Recorder(nn.Module):
    """Stands in for a submodule during one model call, keeping its calls.

    Anything but calling it is passed through to the real module.
    """

    def __init__(self, inner: nn.Module, calls: list):
        super().__init__()
        object.__setattr__(self, "_inner", inner)
        object.__setattr__(self, "_calls", calls)

    def __getattr__(self, key):
        return getattr(object.__getattribute__(self, "_inner"), key)

    def __call__(self, *args, **kwargs):
        out = self._inner(*args, **kwargs)
        self._calls.append((self._inner, args, kwargs, out))
        return out


@contextmanager
def recording(model: Model):
    """Record what each layer's attention, MLP, router and experts (and the
    model's self-conditioning block and final norm) receive in a call."""
    calls = {name: [] for name in ("self_attn", "mlp", "router", "experts", "self_conditioning", "norm")}
    swapped = []
    owners = [(layer, ("self_attn", "mlp", "router", "experts")) for layer in model.layers]
    owners.append((model, ("self_conditioning", "norm")))
    try:
        for owner, names in owners:
            for name in names:
                inner = getattr(owner, name)
                setattr(owner, name, _Recorder(inner, calls[name]))
                swapped.append((owner, name, inner))
        yield calls
    finally:
        for owner, name, inner in swapped:
            setattr(owner, name, inner)


def _arrays(tree) -> List[mx.array]:
    if isinstance(tree, mx.array):
        return [tree]
    if isinstance(tree, (list, tuple)):
        return [a for t in tree for a in _arrays(t)]
    if isinstance(tree, dict):
        return [a for t in tree.values() for a in _arrays(t)]
    return []


class Product(NamedTuple):
    """``count`` matrix products ``a @ b`` (``a @ b.T`` if ``transposed``: b is stored
    as [out, in], as Linear weights and cached keys are)."""

    a: tuple
    b: tuple
    count: int = 1
    transposed: bool = True

    @property
    def flops(self) -> int:
        out = self.b[-2] if self.transposed else self.b[-1]
        return 2 * math.prod(self.a) * out * self.count


def layer_shapes(
    args: ModelArgs, batch: int, queries: int, cache_len: int, rows: Optional[int] = None
) -> Dict[str, List[Product]]:
    """The layers' matrix products for ``queries`` new positions per row after
    ``cache_len`` cached ones (a canvas being denoised, or tokens being encoded).

    Per layer: q/k/(v)/o projections and, per query head, scores q @ k^T and
    values p @ v over the K keys the queries see (cached keys, at most
    window - 1 on sliding layers, plus the new positions; encoding computes
    the causal half too, so it is counted); grouped KV heads are counted once
    per query head, as computed. The experts are counted as their equal-FLOP
    dense products: top_k x N rows through one expert's gate, up and down.
    ``rows`` (an approximate denoising step) of the ``queries`` positions go
    through the layer; all of them through the q/k/v projections.
    """
    Q, D, H = queries, args.hidden_size, args.num_attention_heads
    I, M = args.intermediate_size, args.moe_intermediate_size
    A = Q if rows is None else rows
    N, NA = batch * Q, batch * A
    shapes = {"attention": [], "dense_mlp": [], "experts": []}
    for i, kind in enumerate(args.layer_types):
        d, g = args.layer_head_dims[i], args.layer_kv_heads[i]
        sliding = kind == "sliding_attention"
        K = (min(cache_len, args.sliding_window - 1) if sliding else cache_len) + Q
        shapes["attention"] += [
            Product((N, D), (H * d, D)),
            Product((N, D), (g * d, D), 2 if sliding else 1),  # k, and v on sliding layers
            Product((NA, H * d), (D, H * d)),
            Product((batch, H, A, d), (batch, H, K, d)),  # scores
            Product((batch, H, A, K), (batch, H, K, d), transposed=False),  # values
        ]
        shapes["dense_mlp"] += _mlp(NA, D, I)
        shapes["experts"] += [Product((NA, D), (args.num_experts, D))] + _mlp(NA * args.top_k_experts, D, M)
    return shapes


def _mlp(rows: int, dims: int, hidden: int) -> List[Product]:
    return [Product((rows, dims), (hidden, dims), 2), Product((rows, hidden), (dims, hidden))]


def matmul_shapes(
    args: ModelArgs,
    batch: int,
    cache_len: int,
    self_conditioning: bool = True,
    top_k: int = 0,
    rows: Optional[int] = None,
) -> Dict[str, List[Product]]:
    """The matrix products of one denoising step, per component.

    The layers' as ``layer_shapes`` counts them for the canvas, then the LM
    head. ``self_conditioning`` is False for a canvas' first step (no
    signal, no products); otherwise probabilities [N, V] times the embedding
    [V, D], or with ``top_k`` the k gathered rows per position weighted and
    summed (2 N k D, counted as one [N, k] x [k, D] product), then its MLP.
    ``rows``: an approximate step computing that many positions per row.
    """
    C, D, V = args.canvas_length, args.hidden_size, args.vocab_size
    N = batch * (C if rows is None else rows)
    shapes = {name: [] for name in COMPONENTS}
    shapes.update(layer_shapes(args, batch, C, cache_len, rows))
    shapes["lm_head"] = [Product((N, D), (V, D))]
    if self_conditioning:
        soft = Product((N, top_k), (top_k, D), transposed=False) if top_k else Product((N, V), (V, D), transposed=False)
        shapes["self_conditioning"] = [soft] + _mlp(N, D, args.intermediate_size)
    return shapes


def matmul_flops(shapes: List[Product]) -> int:
    return sum(p.flops for p in shapes)


def matmul_floor(shapes: List[Product], dtype: mx.Dtype) -> Callable[[], List[mx.array]]:
    """The products alone, as plain ``mx.matmul``s on random operands (made now)."""
    key = mx.random.key(0)
    operands = []
    for p in shapes:
        key, ka, kb = mx.random.split(key, 3)
        a = mx.random.normal(p.a, key=ka).astype(dtype)
        b = mx.random.normal(p.b, key=kb).astype(dtype)
        operands.append((a, mx.swapaxes(b, -1, -2) if p.transposed else b, p.count))
    mx.eval([(a, b) for a, b, _ in operands])
    return lambda: [mx.matmul(a, b) for a, b, count in operands for _ in range(count)]


TRANSCENDENTAL = ("exp", "tanh")


def transcendental_floor(batch: int, canvas: int, vocab: int) -> Dict[str, Callable[[], mx.array]]:
    """One exp and one tanh pass over float32 logits [B, C, V], as timed functions."""
    logits = mx.random.normal((batch, canvas, vocab), key=mx.random.key(1))
    mx.eval(logits)
    return {"floor/exp": lambda: mx.exp(logits), "floor/tanh": lambda: mx.tanh(logits)}


@dataclass
class StepInputs:
    """What a canvas' second denoising step starts from: the prompt's cache
    and the state the first step left."""

    cache: PromptCache
    state: CanvasState
    keys: List[mx.array]
    step: int


def prepare_step(model: Model, prompts: List[List[int]], params: SamplerParams, seed: int) -> StepInputs:
    cache = model.make_cache()
    encode_prompt(model, prompts, cache)
    rng = RowKeys(row_seeds(seed, len(prompts)))
    canvas = noise_canvas(rng.next(), model.canvas_length, model.args.vocab_size)
    state, _ = denoise_step(model, cache, CanvasState.start(canvas, params), params, 1, rng.next())
    mx.eval(state)
    return StepInputs(cache, state, rng.next(), min(2, params.max_denoising_steps))


def _outputs(result) -> List[mx.array]:
    state, update = result
    return [*state, update.entropy, update.accepted]


def step_functions(model: Model, step: StepInputs, params: SamplerParams) -> Dict[str, Optional[Callable]]:
    """The whole step and each part of it, as functions returning what they compute.

    The whole step is ``denoising.denoise_step``, the sampler part its
    ``sample_step``: the code generation runs. The other parts run on what
    their submodules received in one real step; a part whose submodule was
    not called maps to None.
    """

    def whole_step():
        return _outputs(denoise_step(model, step.cache, step.state, params, step.step, step.keys))

    with recording(model) as calls:
        mx.eval(whole_step(), _arrays([c[1:] for name in calls for c in calls[name]]))

    # The LM head's input is the final norm's output (its values do not change its cost).
    final_hidden = calls["norm"][-1][3]
    logits = model.logits(final_hidden)
    mx.eval(logits)

    def replay(*names):
        if not calls[names[-1]]:
            return None
        return lambda: [inner(*a, **kw) for name in names for inner, a, kw, _ in calls[name]]

    def self_conditioning_part():
        ((block, (embeds, _), _, _),) = calls["self_conditioning"]
        # With a float32 model the decoder gets the sampler's probabilities;
        # otherwise it takes the softmax of the processed logits itself.
        signal = step.state.signal
        if params.self_conditioning_top_k:  # the signal is the soft embedding itself
            return block(embeds, signal)
        probs = signal if uses_probs(model) else mx.softmax(signal.astype(mx.float32), axis=-1)
        return block(embeds, model.soft_embedding(probs))

    return {
        "step": whole_step,
        "attention": replay("self_attn"),
        "dense_mlp": replay("mlp"),
        "experts": replay("router", "experts"),
        "lm_head": lambda: model.logits(final_hidden),
        "self_conditioning": self_conditioning_part if calls["self_conditioning"] else None,
        "sampler": lambda: _outputs(sample_step(model, logits, step.state, params, step.step, step.keys)),
    }


def run_breakdown(model: Model, prompts: List[List[int]], params: SamplerParams, repeats: int, seed: int) -> dict:
    """Time a real denoising step, each of its parts on the step's own inputs,
    and the same step's matrix products alone."""
    step = prepare_step(model, prompts, params, seed)
    functions = step_functions(model, step, params)
    shapes = matmul_shapes(model.args, len(prompts), step.cache.offset, True, params.self_conditioning_top_k)
    # Quantized weights leave the norms in the float dtype the products run in.
    floors = {f"floor/{name}": matmul_floor(shapes[name], model.dtype) for name in COMPONENTS if shapes[name]}
    floors.update(transcendental_floor(len(prompts), model.canvas_length, model.args.vocab_size))
    times = interleaved_medians({**{k: f for k, f in functions.items() if f}, **floors}, repeats)
    del floors
    mx.clear_cache()

    step_time = times["step"]
    components = {}
    for name in COMPONENTS:
        seconds = times.get(name)
        flops = matmul_flops(shapes[name])
        floor = times.get(f"floor/{name}", 0.0)
        components[name] = dict(
            time_s=seconds,
            share=seconds / step_time if seconds is not None else None,
            gflop=flops / 1e9,
            gflops_per_s=flops / seconds / 1e9 if seconds and flops else None,
            floor_s=floor,
            over_floor=seconds / floor if seconds and floor else None,
        )
    rest = step_time - sum(c["time_s"] for c in components.values() if c["time_s"] is not None)
    components["remainder"] = dict(
        time_s=rest, share=rest / step_time, gflop=0.0, gflops_per_s=None, floor_s=0.0, over_floor=None
    )
    floor_total = sum(c["floor_s"] for c in components.values())
    flops_total = sum(c["gflop"] for c in components.values())
    transcendental = {name: times[f"floor/{name}"] for name in TRANSCENDENTAL}
    return dict(
        step_time_s=step_time,
        cache_length=step.cache.offset,
        repeats=repeats,
        self_conditioning_from=f"the top {params.self_conditioning_top_k} of the sampler probabilities"
        if params.self_conditioning_top_k
        else "sampler probabilities"
        if uses_probs(model)
        else "processed logits (softmax counted here)",
        components=components,
        gflop=flops_total,
        gflops_per_s=flops_total / step_time,
        matmul_floor_s=floor_total,
        step_over_floor=step_time / floor_total if floor_total else None,
        # The step's one exp (sampler) and one tanh (softcap) over the logits,
        # each timed alone: transcendental passes no implementation avoids.
        transcendental_s=transcendental,
        full_floor_s=floor_total + sum(transcendental.values()),
        step_over_full_floor=step_time / (floor_total + sum(transcendental.values())),
        not_called=[name for name in COMPONENTS if functions[name] is None],
    )
