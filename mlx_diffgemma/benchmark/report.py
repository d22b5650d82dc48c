"""The benchmark's result as the text the command prints."""

from typing import List, Optional

from .breakdown import COMPONENT_NAMES, COMPONENTS
from .work import VARIANT_HELP


def _fmt(value, spec: str = ".3g", unit: str = "") -> str:
    if value is None:
        return "-"
    return f"{value:{spec}}{unit}"


def _fmt_bytes(gb: Optional[float]) -> str:
    if gb is None:
        return "-"
    return f"{gb:.2f} GB" if gb >= 1 else f"{gb * 1e3:.0f} MB"


def _rows(rows: List[List[str]]) -> List[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for r in rows:
        cells = [r[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(r[1:], widths[1:])]
        lines.append("  " + "  ".join(cells).rstrip())
    return lines


def _load_warning(machine: dict) -> List[str]:
    start, end = machine.get("load_average_start"), machine.get("load_average_end")
    if start is None:
        return []
    line = (
        f"Load average (1 min): {start:.2f} before the run, {_fmt(end, '.2f')} after it "
        f"(the run itself adds up to {machine['cores']})"
    )
    if start > 0.5:
        line += (
            "; the machine was busy in the minute before (an earlier run, or other processes, "
            "which would inflate these timings)"
        )
    return [line]


def format_report(result: dict) -> str:
    m, mod, s, g = result["machine"], result["model"], result["settings"], result["generation"]
    ram = f"{m['ram_gb']:.0f} GB RAM" if m["ram_gb"] else "RAM unknown"
    lines = [
        f"Machine: {m['cpu']}, {m['cores']} cores, {ram}; MLX {m['mlx']} on {m['device']}; BLAS: {m['blas']}",
        f"Model: {mod['source']}, {mod['dtype']}"
        + (f", {mod['quantization']}" if mod["quantization"] else "")
        + f", {_fmt_bytes(mod['weights_gb'])} of weights"
        + (f" per process ({mod['processes']} processes, {mod['split']} split)" if mod.get("split") else ""),
        *_load_warning(m),
        f"Run: batch {s['batch_size']} x {s['prompt_tokens']} prompt tokens, {s['max_tokens']} new tokens, {s['mode']}",
        "",
        "Generation",
    ]
    lines += _rows(
        [
            ["prompt encode", f"{_fmt(g['prompt_tps'], '.1f')} tok/s", f"({_fmt(g['prompt_time_s'], '.3f')} s)"],
            [
                "denoising step (median)",
                f"{_fmt(g['step_time_s'], '.3f')} s",
                f"({len(g['step_times_s'])} steps timed)"
                if g["step_times_s"]
                else "(canvases of 2 steps are not timed: --breakdown times one)",
            ],
            [
                "denoising steps per canvas",
                _fmt(g["steps_per_canvas"], ".1f"),
                f"({g['denoising_steps']} steps, {g['canvases']} canvas{'es' if g['canvases'] != 1 else ''})",
            ],
            ["tokens per forward", _fmt(g["tokens_per_forward"], ".2f"), ""],
            [
                "committed tokens/s",
                _fmt(g["generation_tps"], ".2f"),
                f"({g['generation_tokens']} tokens; {_fmt(g['end_to_end_tps'], '.2f')} end to end)",
            ],
            ["canvas positions/s", _fmt(g["canvas_positions_per_s"], ".1f"), "(batch x canvas / step time)"],
            [
                "GFLOP per committed token",
                _fmt(g["flops_per_token"] / 1e9, ".4g"),
                f"({_fmt(g['denoise_flops_per_token'] / 1e9, '.4g')} denoising, the rest encoding canvases)",
            ],
            ["peak memory", _fmt_bytes(g["peak_memory_gb"]), ""],
        ]
    )

    b = result.get("breakdown")
    if b:
        lines += [
            "",
            f"One denoising step, by part (median of {b['repeats']}; cache {b['cache_length']} tokens; "
            f"self-conditioning from {b['self_conditioning_from']})",
        ]
        rows = [["part", "ms", "share", "GFLOP", "GFLOP/s", "matmul floor ms", "x floor"]]
        for name in COMPONENTS + ("remainder",):
            c = b["components"][name]
            rows.append(
                [
                    COMPONENT_NAMES[name],
                    _fmt(c["time_s"] and c["time_s"] * 1e3, ".1f"),
                    _fmt(c["share"] and c["share"] * 100, ".1f", "%"),
                    _fmt(c["gflop"] or None, ".2f"),
                    _fmt(c["gflops_per_s"], ".1f"),
                    _fmt(c["floor_s"] * 1e3 if c["floor_s"] else None, ".1f"),
                    _fmt(c["over_floor"], ".1f"),
                ]
            )
        rows.append(
            [
                "whole step",
                _fmt(b["step_time_s"] * 1e3, ".1f"),
                "100%",
                _fmt(b["gflop"], ".2f"),
                _fmt(b["gflops_per_s"], ".1f"),
                _fmt(b["matmul_floor_s"] * 1e3, ".1f"),
                _fmt(b["step_over_floor"], ".1f"),
            ]
        )
        t = b["transcendental_s"]
        lines += _rows(rows)
        lines.append(
            f"  floor with one exp ({_fmt(t['exp'] * 1e3, '.1f')} ms) and one tanh ({_fmt(t['tanh'] * 1e3, '.1f')} ms) "
            f"over the logits, each timed alone: {_fmt(b['full_floor_s'] * 1e3, '.1f')} ms; "
            f"the step is x{_fmt(b['step_over_full_floor'], '.2f')} of it"
        )
        if b["not_called"]:
            lines.append(f"  (not called as a submodule, so not timed: {', '.join(b['not_called'])})")

    e = result.get("evaluation")
    if e:
        lines += [
            "",
            f"Accuracy and work per committed token ({e['problems']} problems of {e['data']}; "
            "'x fewer' = the reference's FLOPs per token over the variant's; tok/s: committed tokens "
            "over the whole evaluation's time, prompts included)",
        ]
        rows = [
            [
                "variant",
                "accuracy" if e.get("metric", "exact") != "exact" else "exact match",
                "steps/canvas",
                "tokens/forward",
                "MFLOP/token",
                "x fewer",
                "denoising MFLOP/token",
                "x fewer",
                "tok/s",
            ]
        ]
        for name, v in e["variants"].items():
            rows.append(
                [
                    name,
                    f"{100 * v['accuracy']:.1f}%",
                    _fmt(v["steps_per_canvas"], ".3f"),
                    _fmt(v["tokens_per_forward"], ".2f"),
                    _fmt(v["flops_per_token"] / 1e6, ".2f"),
                    _fmt(v["fewer_flops_than_reference"], ".2f"),
                    _fmt(v["denoise_flops_per_token"] / 1e6, ".2f"),
                    _fmt(v["fewer_denoise_flops_than_reference"], ".2f"),
                    _fmt(v["tokens_per_s"], ".1f"),
                ]
            )
        lines += _rows(rows)
        lines += [f"  {name}: {VARIANT_HELP[name]}" for name in e["variants"]]

    comparisons = result.get("compare")
    if comparisons:
        lines += ["", "Comparison (same weights, prompt and step count; 'x' = how many times faster mlx_diffgemma is)"]
        rows = [["implementation", "step s", "x", "prompt tok/s", "x", "end-to-end tok/s", "x"]]
        rows.append(
            [
                "mlx_diffgemma",
                _fmt(g["step_time_s"], ".3f"),
                "",
                _fmt(g["prompt_tps"], ".1f"),
                "",
                _fmt(g["end_to_end_tps"], ".2f"),
                "",
            ]
        )
        for key in ("transformers", "mlx-vlm"):
            c = comparisons.get(key)
            if c:
                rows.append(
                    [
                        c["implementation"],
                        _fmt(c["step_time_s"], ".3f"),
                        _fmt(c["ours_faster_step"], ".2f"),
                        _fmt(c["prompt_tps"], ".1f"),
                        _fmt(c.get("ours_faster_prompt"), ".2f"),
                        _fmt(c["end_to_end_tps"], ".2f"),
                        _fmt(c["ours_faster_end_to_end"], ".2f"),
                    ]
                )
        lines += _rows(rows)
        ar = comparisons.get("ar")
        if ar:
            lines += ["", f"Autoregressive: {ar['implementation']}"]
            lines += _rows(
                [
                    ["time per token (one forward)", f"{_fmt(ar['token_time_s'], '.4f')} s", ""],
                    [
                        "decode tokens/s",
                        _fmt(ar["generation_tps"], ".2f"),
                        f"(mlx_diffgemma {_fmt(g['generation_tps'], '.2f')}: "
                        f"x{_fmt(ar['ours_faster_generation'], '.2f')})",
                    ],
                    [
                        "end-to-end tokens/s",
                        _fmt(ar["end_to_end_tps"], ".2f"),
                        f"(mlx_diffgemma {_fmt(g['end_to_end_tps'], '.2f')}: "
                        f"x{_fmt(ar['ours_faster_end_to_end'], '.2f')})",
                    ],
                    ["prompt tok/s", _fmt(ar["prompt_tps"], ".1f"), f"(x{_fmt(ar['ours_faster_prompt'], '.2f')})"],
                    [
                        "break-even tokens per forward",
                        _fmt(ar["break_even_tokens_per_forward"], ".1f"),
                        f"(diffusion step / AR token time; we commit {_fmt(g['tokens_per_forward'], '.1f')})",
                    ],
                ]
            )
    return "\n".join(lines)
