"""What self-conditioning costs per step: the product over the whole
vocabulary against the top-k of the probabilities (opt-in).

    python benchmarks/self_conditioning.py [--top-k 8]

At the mini preset's shapes (256 positions, vocabulary 65,536, hidden 704):
the reference's soft embedding (probabilities [C, V] times the embedding
[V, D]) beside ``self_conditioning_top_k``'s (the two-pass top-k of the
sampler's weights, then k gathered rows per position). Medians of 5, taking turns.
"""

import argparse

import mlx.core as mx

from mlx_diffgemma import sampler
from mlx_diffgemma.benchmark import PRESETS, random_model
from mlx_diffgemma.benchmark.common import interleaved_medians


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--top-k", type=int, default=8)
    args = parser.parse_args()
    model = random_model(PRESETS["mini"], seed=0)
    C, V = model.canvas_length, model.args.vocab_size
    # Peaked rows, as a denoised canvas has (entropies of about a nat).
    dist = sampler.distribution(mx.random.normal((1, C, V), key=mx.random.key(0)) * 4.0)
    probs, weights = dist.probs, dist.weights
    mx.eval(probs, weights)
    k = args.top_k
    ops = {
        "whole vocabulary: probs @ embedding": lambda: model.soft_embedding(probs),
        f"top-{k}: selection": lambda: sampler.top_k(weights, k),
        f"top-{k}: selection + gathered rows": lambda: model.sparse_soft_embedding(*sampler.top_k(weights, k)),
        f"top-{k}: argpartition over the vocabulary": lambda: mx.argpartition(-weights, kth=k - 1, axis=-1)[..., :k],
    }
    print(f"device: {mx.default_device()}; [{C}, {V}] probabilities, hidden {model.args.hidden_size}")
    for name, seconds in interleaved_medians(ops, repeats=5).items():
        print(f"  {name:44s} {seconds * 1e3:8.1f} ms")


if __name__ == "__main__":
    main()
