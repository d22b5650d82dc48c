"""The benchmark harness reports every field with sane values (not a speed test)."""

import ast
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from mlx_diffgemma import benchmark
from mlx_diffgemma.benchmark import breakdown
from mlx_diffgemma.cli import benchmark as benchmark_cli
from mlx_diffgemma.config import ModelArgs
from mlx_diffgemma.sampler_params import SamplerParams

TINY = benchmark.PRESETS["tiny"]
CANVAS = TINY["canvas_length"]
STEPS = 3  # canvases of 2 steps are not timed (their second read waits for nothing)
# Two canvases, the second cut short by max_tokens.
FAST = dict(preset="tiny", prompt_tokens=24, max_tokens=CANVAS + 8, fixed_steps=STEPS, repeats=1)

GENERATION_FIELDS = (
    "flops_per_token",
    "denoise_flops_per_token",
    "prompt_time_s",
    "prompt_tps",
    "step_time_s",
    "denoising_steps",
    "canvases",
    "steps_per_canvas",
    "tokens_per_forward",
    "generation_tokens",
    "generation_tps",
    "end_to_end_tps",
    "canvas_positions_per_s",
    "peak_memory_gb",
)


def check_generation(g: dict, fixed_steps=STEPS, max_tokens=FAST["max_tokens"]):
    for name in GENERATION_FIELDS:
        assert g[name] is not None and g[name] > 0, name
    canvases = math.ceil(max_tokens / CANVAS)
    assert g["canvases"] == canvases
    assert g["generation_tokens"] == max_tokens
    if fixed_steps:
        assert g["denoising_steps"] == fixed_steps * canvases
        assert g["steps_per_canvas"] == fixed_steps
        # Each canvas is committed in full (EOS off) over fixed_steps forwards.
        assert g["tokens_per_forward"] == pytest.approx(CANVAS / fixed_steps)
    else:
        assert canvases <= g["denoising_steps"] <= SamplerParams().max_denoising_steps * canvases
    assert all(t > 0 for t in g["step_times_s"])
    assert g["canvas_positions_per_s"] == pytest.approx(CANVAS / g["step_time_s"])
    assert g["end_to_end_tps"] <= g["generation_tps"]


def check_breakdown(b: dict):
    parts = b["components"]
    assert set(parts) == set(benchmark.COMPONENTS) | {"remainder"}
    assert b["not_called"] == []
    assert b["step_time_s"] > 0 and b["cache_length"] == FAST["prompt_tokens"]
    for name in benchmark.COMPONENTS:
        assert parts[name]["time_s"] > 0, name
        assert 0 < parts[name]["share"], name
    for name in ("attention", "dense_mlp", "experts", "lm_head", "self_conditioning"):
        assert parts[name]["gflop"] > 0 and parts[name]["floor_s"] > 0, name
        assert parts[name]["gflops_per_s"] > 0, name
    assert parts["sampler"]["gflop"] == 0
    assert sum(p["share"] for p in parts.values()) == pytest.approx(1.0)
    assert b["matmul_floor_s"] == pytest.approx(sum(p["floor_s"] for p in parts.values()))
    assert b["step_over_floor"] > 0


def test_run_benchmark_in_process():
    result = benchmark.run_benchmark(benchmark.Options(breakdown=True, **FAST))
    check_generation(result["generation"])
    check_breakdown(result["breakdown"])
    assert result["machine"]["cores"] >= 1 and result["machine"]["blas"]
    assert result["model"]["canvas_length"] == CANVAS
    assert result["settings"]["sampler"]["max_denoising_steps"] == STEPS
    assert "compare" not in result
    json.dumps(result)  # JSON-ready
    assert "Generation" in benchmark.format_report(result)


def test_cli_json_subprocess():
    cmd = [
        sys.executable,
        "-m",
        "mlx_diffgemma.benchmark",
        "--preset",
        "tiny",
        "-p",
        str(FAST["prompt_tokens"]),
        "-g",
        str(FAST["max_tokens"]),
        "--fixed-steps",
        str(STEPS),
        "--breakdown",
        "--repeats",
        "1",
        "--format",
        "json",
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    check_generation(result["generation"])
    check_breakdown(result["breakdown"])


def test_checkpoint_sampler_stays_within_its_step_limit():
    options = benchmark.Options(preset="tiny", prompt_tokens=16, max_tokens=CANVAS)
    g = benchmark.run_benchmark(options)["generation"]
    check_generation(g, fixed_steps=None, max_tokens=CANVAS)


def test_compare_autoregressive():
    result = benchmark.run_benchmark(benchmark.Options(compare=["ar"], **FAST))
    ar = result["compare"]["ar"]
    assert ar["generation_tokens"] == FAST["max_tokens"]
    for name in (
        "token_time_s",
        "prompt_tps",
        "generation_tps",
        "end_to_end_tps",
        "break_even_tokens_per_forward",
        "ours_faster_generation",
        "ours_faster_end_to_end",
    ):
        assert ar[name] > 0, name
    assert "Autoregressive" in benchmark.format_report(result)


def test_compare_reference_implementations():
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    pytest.importorskip("mlx_vlm")
    # Three steps: mlx-vlm's last step per canvas takes only the argmax, so two
    # full steps give one interval to time.
    result = benchmark.run_benchmark(
        benchmark.Options(compare=["transformers", "mlx-vlm"], **dict(FAST, fixed_steps=3))
    )
    for name in ("transformers", "mlx-vlm"):
        c = result["compare"][name]
        assert c["generation_tokens"] == FAST["max_tokens"], name
        for key in ("step_time_s", "prompt_tps", "end_to_end_tps", "ours_faster_step", "ours_faster_end_to_end"):
            assert c[key] > 0, (name, key)
    assert "transformers" in benchmark.format_report(result)


def test_compare_needs_fixed_steps(capsys):
    with pytest.raises(SystemExit) as e:
        benchmark_cli.main(["--preset", "tiny", "--compare", "ar"])
    assert e.value.code == 2
    assert "--fixed-steps" in capsys.readouterr().err


def test_flop_count_matches_the_formulas():
    args = ModelArgs.from_dict(TINY)
    B, T = 2, 300
    shapes = breakdown.matmul_shapes(args, B, T)
    N, D, V = B * args.canvas_length, args.hidden_size, args.vocab_size
    assert breakdown.matmul_flops(shapes["lm_head"]) == 2 * N * D * V
    I, L = args.intermediate_size, args.num_hidden_layers
    assert breakdown.matmul_flops(shapes["dense_mlp"]) == L * 6 * N * D * I
    experts = 2 * N * D * args.num_experts + args.top_k_experts * 6 * N * D * args.moe_intermediate_size
    assert breakdown.matmul_flops(shapes["experts"]) == L * experts
    # Sliding layers see window - 1 cached keys, the full layer all of them.
    H, C = args.num_attention_heads, args.canvas_length
    core = 0
    for i, kind in enumerate(args.layer_types):
        K = (min(T, args.sliding_window - 1) if kind == "sliding_attention" else T) + C
        core += 4 * B * H * C * K * args.layer_head_dims[i]
    projections = sum(
        2 * N * D * (2 * H * d + g * d * (2 if kind == "sliding_attention" else 1))
        for kind, d, g in zip(args.layer_types, args.layer_head_dims, args.layer_kv_heads)
    )
    assert breakdown.matmul_flops(shapes["attention"]) == core + projections


def test_step_intervals_skip_each_canvas_first_step():
    marks = [(0, 1.0), (0, 1.5), (0, 2.5), (1, 4.0), (1, 4.25)]
    assert benchmark.common.step_intervals(marks) == [0.5, 1.0, 0.25]


def test_torch_and_transformers_are_imported_only_for_comparisons():
    # mlx-lm may import transformers (and it torch) on its own; the benchmark
    # itself needs them only to write and run the reference checkpoint.
    top_level = set()
    for module in Path(benchmark.__file__).parent.glob("*.py"):
        for node in ast.parse(module.read_text()).body:
            if isinstance(node, ast.Import):
                top_level |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                top_level.add(node.module.split(".")[0])
    assert "mlx" in top_level  # the modules were read
    assert not top_level & {"torch", "transformers", "mlx_vlm"}


def test_a_missing_comparison_package_fails_before_any_timing(monkeypatch):
    import importlib.util

    from mlx_diffgemma.benchmark import compare

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        compare.importlib.util, "find_spec", lambda name, *a: None if name == "mlx_vlm" else find_spec(name, *a)
    )
    with pytest.raises(ValueError, match=r"--compare mlx-vlm needs mlx-vlm==0.7.10: pip install"):
        benchmark.validate(benchmark.Options(compare=["mlx-vlm"], **FAST))


@pytest.mark.parametrize("where", ["no-such-dir/out.json", "."])
def test_an_unwritable_json_path_is_refused_before_the_run(tmp_path, where):
    cmd = [sys.executable, "-m", "mlx_diffgemma.benchmark", "--preset", "tiny", "--json", str(tmp_path / where)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and "--json" in done.stderr and "Traceback" not in done.stderr
    assert "Timing" not in done.stderr  # refused before any work
