"""How long the host takes to build one denoising step's graph, against the step itself.

    python benchmarks/step_overhead.py [--preset tiny|mini] [--repeats 5]

The graph is what ``denoising.denoise_step`` builds before anything runs; its
building time is what the device would sit idle for between two steps if the
next step were not queued ahead (docs/generation.md). Random weights.
"""

import argparse
import statistics
import time

import mlx.core as mx

from mlx_diffgemma.benchmark import PRESETS, random_model, random_prompts
from mlx_diffgemma.denoising import CanvasState, denoise_step
from mlx_diffgemma.generate import RowKeys, noise_canvas
from mlx_diffgemma.prompts import encode_prompt
from mlx_diffgemma.sampler_params import SamplerParams


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    parser.add_argument("--prompt-tokens", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    model = random_model(PRESETS[args.preset], seed=0)
    params = SamplerParams.resolve(model, max_denoising_steps=8)
    cache = model.make_cache()
    encode_prompt(model, random_prompts(1, args.prompt_tokens, model.args.vocab_size, 0), cache)
    rng = RowKeys([0])
    state = CanvasState.start(noise_canvas(rng.next(), model.canvas_length, model.args.vocab_size), params)
    state, _ = denoise_step(model, cache, state, params, 1, rng.next())
    mx.eval(state)

    build, run = [], []
    for _ in range(args.repeats + 1):
        tic = time.perf_counter()
        nxt, update = denoise_step(model, cache, state, params, 2, rng.next())
        built = time.perf_counter()
        mx.eval(nxt, update.entropy, update.accepted)
        done = time.perf_counter()
        build.append(built - tic)
        run.append(done - built)
    build, run = statistics.median(build[1:]), statistics.median(run[1:])
    device = "gpu" if mx.default_device().type == mx.DeviceType.gpu else "cpu"
    print(
        f"{args.preset} on {device}: building a step's graph {build * 1e3:.2f} ms, "
        f"running it {run * 1e3:.1f} ms ({build / (build + run):.1%} of a step)"
    )


if __name__ == "__main__":
    main()
