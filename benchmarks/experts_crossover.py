"""When grouping the experts by expert beats SwitchGLU's gather_mm on this machine.

    python benchmarks/experts_crossover.py

Times one SwitchGLU call both ways (mlx-lm's gather_mm path, and
mlx_diffgemma.cpu_experts.grouped_switch_glu) at the widths of the benchmark presets
and the released model, and prints which one the model picks
(expert_groups_on_host). Random weights; medians of 5, taking turns.
"""

import mlx.core as mx
from mlx_lm.models.switch_layers import SwitchGLU

from mlx_diffgemma.benchmark.common import interleaved_medians
from mlx_diffgemma.cpu_experts import expert_groups_on_host, grouped_switch_glu
from mlx_diffgemma.model import GeGLU

CASES = [
    # name, experts, hidden, expert width, top-k, tokens
    ("tiny, canvas", 8, 128, 32, 2, 32),
    ("tiny, prompt", 8, 128, 32, 2, 512),
    ("mini, canvas", 32, 704, 176, 8, 256),
    ("mini, prompt", 32, 704, 176, 8, 512),
    ("full, 1 token", 128, 2816, 704, 8, 1),
    ("full, 8 tokens", 128, 2816, 704, 8, 8),
    ("full, 32 tokens", 128, 2816, 704, 8, 32),
    ("full, canvas", 128, 2816, 704, 8, 256),
]


def main():
    print(f"device: {mx.default_device()}")
    print(f"{'case':16s} {'pairs/expert':>12s} {'gather_mm ms':>13s} {'grouped ms':>11s} {'speedup':>8s}  chosen")
    for name, experts, hidden, width, k, tokens in CASES:
        glu = SwitchGLU(hidden, width, experts, activation=GeGLU(), bias=False)
        mx.eval(glu.parameters())
        x = mx.random.normal((1, tokens, hidden))
        # k distinct experts per token, as the router picks them.
        indices = mx.argsort(mx.random.uniform(shape=(1, tokens, experts)), axis=-1)[..., :k]
        mx.eval(x, indices)
        chosen = "grouped" if expert_groups_on_host(glu, tokens * k) else "gather_mm"
        if grouped_switch_glu(glu, x, indices) is None:
            # Too few pairs to fill the groups: the model runs gather_mm.
            gather = interleaved_medians({"gather": lambda: glu(x, indices)}, 5)["gather"] * 1e3  # noqa: B023
            print(f"{name:16s} {tokens * k / experts:12.1f} {gather:13.2f} {'-':>11s} {'-':>8s}  gather_mm")
            continue
        times = interleaved_medians(
            {"gather": lambda: glu(x, indices), "grouped": lambda: grouped_switch_glu(glu, x, indices)},  # noqa: B023
            5,
        )
        gather, grouped = times["gather"] * 1e3, times["grouped"] * 1e3
        print(
            f"{name:16s} {tokens * k / experts:12.1f} {gather:13.2f} {grouped:11.2f} {gather / grouped:7.2f}x  {chosen}"
        )


if __name__ == "__main__":
    main()
