"""What one pass over a denoising step's [canvas, vocab] logits costs here.

    python benchmarks/elementwise.py

At the mini preset's shape (256 x 65,536 float32): a plain arithmetic pass, the
transcendental functions a step needs (exp for the softmax, tanh for the
softcap), the sampler's cumsum, and the LM head's matmul for scale. Medians of 5, taking turns.
"""

import mlx.core as mx

from mlx_diffgemma import sampler
from mlx_diffgemma.benchmark import PRESETS
from mlx_diffgemma.benchmark.common import interleaved_medians

MINI = PRESETS["mini"]
CANVAS = MINI["canvas_length"]
VOCAB, HIDDEN = MINI["text_config"]["vocab_size"], MINI["text_config"]["hidden_size"]


def softcap(x):
    # mlx_diffgemma.model.softcap without its mx.compile, to time both.
    return mx.tanh(x / 30.0) * 30.0


def entropy_and_probs(x):
    dist = sampler.distribution(x)
    return dist.entropy, dist.probs


def main():
    x = mx.random.normal((CANVAS, VOCAB)) * 5
    hidden = mx.random.normal((CANVAS, HIDDEN))
    embedding = mx.random.normal((VOCAB, HIDDEN))
    mx.eval(x, hidden, embedding)
    compiled_softcap = mx.compile(softcap)
    compiled_entropy_and_probs = mx.compile(entropy_and_probs)
    ops = {
        "x / t (one arithmetic pass)": lambda: x / 0.7,
        "max over the vocabulary": lambda: x.max(axis=-1),
        "cumsum over the vocabulary": lambda: mx.cumsum(x, axis=-1),
        "exp": lambda: mx.exp(x),
        "tanh": lambda: mx.tanh(x),
        f"LM head matmul [{CANVAS},{HIDDEN}] @ [{HIDDEN},{VOCAB}]": lambda: hidden @ embedding.T,
        "softcap": lambda: softcap(x),
        "softcap, mx.compile": lambda: compiled_softcap(x),
        "sampler distribution (entropy, probs)": lambda: entropy_and_probs(x),
        "sampler distribution, mx.compile": lambda: compiled_entropy_and_probs(x),
    }
    print(f"device: {mx.default_device()}, {CANVAS * VOCAB / 1e6:.1f}M elements")
    for name, seconds in interleaved_medians(ops, repeats=5).items():
        print(f"{name:44s} {seconds * 1e3:8.1f} ms")


if __name__ == "__main__":
    main()
