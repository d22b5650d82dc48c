"""The trained model shipped in examples/fill/model is in the released model's
regime: its canvases take many steps, its answers are checkable, and infill
with the suffix beats writing left to right.

The held-out problems are the task's own (test.jsonl and infill.jsonl are
rebuilt by its seeded generator), answered at the released checkpoint's
sampler settings with fixed seeds (the problem's index), exactly as
examples/fill/evaluate.py scores them. The numbers are examples/fill/README.md's.
"""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from mlx_diffgemma import load

ROOT = Path(__file__).resolve().parents[1]
FILL = ROOT / "examples" / "fill"
PROBLEMS = 20  # the first problems of each held-out set

# Measured on the first 20 problems of each set (examples/fill/evaluate.py --limit 20):
# rows right 82.5%, a median of 34.5 steps a canvas; infill 85% right, left to right 65%.
MEASURED_ROW_ACCURACY = 0.825
MEASURED_MEDIAN_STEPS = 34.5
MEASURED_INFILL, MEASURED_BASELINE = 0.85, 0.65
MARGIN = 0.1  # 8 of 80 rows, 2 of 20 gaps


def module(name):
    spec = importlib.util.spec_from_file_location(f"fill_{name}", FILL / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def build():
    return module("build")


@pytest.fixture(scope="module")
def evaluate():
    return module("evaluate")


@pytest.fixture(scope="module")
def shipped():
    return load(str(FILL / "model"))


@pytest.fixture(scope="module")
def data(build, tmp_path_factory):
    out = tmp_path_factory.mktemp("fill-data")
    build.write_data(out)
    return out


def test_every_built_answer_solves_its_puzzle_and_a_changed_one_does_not(build, data):
    rows = [json.loads(line)["messages"] for line in (data / "test.jsonl").read_text().splitlines()]
    for question, answer in ((m[0]["content"], m[1]["content"]) for m in rows):
        assert build.score(question, answer) == {"right": True, "rows": build.ROWS, "of": build.ROWS}
        assert build.check(question, answer, answer) == 1.0
    question, answer = rows[0][0]["content"], rows[0][1]["content"]
    width = len(build.LETTERS)
    blank = question.index(build.BLANK)  # in the first row
    given = next(i for i in range(width) if question[i] != build.BLANK)
    other = next(c for c in build.LETTERS if c != answer[blank])
    twice = answer[:blank] + other + answer[blank + 1 :]  # a letter twice in its row
    assert build.score(question, twice)["rows"] == build.ROWS - 1
    row = list(answer[:width])
    row[blank], row[given] = row[given], row[blank]  # still a permutation, but a given letter moved
    assert build.score(question, "".join(row) + answer[width:])["rows"] == build.ROWS - 1


def test_every_infill_problem_cuts_a_right_answer_at_a_blank(build, data):
    for line in (data / "infill.jsonl").read_text().splitlines():
        row = json.loads(line)
        assert build.score(row["question"], row["prefix"] + row["middle"] + row["suffix"])["right"]
        assert row["question"][len(row["prefix"])] == build.BLANK
        assert 1 <= len(row["middle"]) <= build.MAX_GAP and "\n" not in row["middle"]


def test_the_build_is_seeded(build, data, tmp_path):
    build.write_data(tmp_path)
    for name in ("train.jsonl", "test.jsonl", "infill.jsonl"):
        assert (tmp_path / name).read_bytes() == (data / name).read_bytes()


def test_the_shipped_model_has_the_real_structure(shipped):
    model, tokenizer = shipped
    args = model.args
    assert {"sliding_attention", "full_attention"} == set(args.layer_types)
    assert args.top_k_experts > 1 and args.num_experts > args.top_k_experts
    assert "self_conditioning" in dict(model.named_modules())
    assert model.canvas_length >= 64
    assert model.generation_config["max_denoising_steps"] == 48  # the released sampler settings


def test_its_canvases_take_many_steps_and_its_answers_are_mostly_right(shipped, data, evaluate):
    from mlx_diffgemma.benchmark.work import read_problems
    from mlx_diffgemma.sampler_params import SamplerParams

    model, tokenizer = shipped
    result = evaluate.answers(
        model, tokenizer, read_problems(data / "test.jsonl", PROBLEMS), SamplerParams.resolve(model)
    )
    assert result["median_steps_per_canvas"] >= 8  # the bar for the released regime
    assert abs(result["median_steps_per_canvas"] - MEASURED_MEDIAN_STEPS) <= 4
    assert abs(result["row_accuracy"] - MEASURED_ROW_ACCURACY) <= MARGIN


def test_infill_with_the_suffix_beats_left_to_right(shipped, data, evaluate):
    from mlx_diffgemma.sampler_params import SamplerParams

    model, tokenizer = shipped
    rows = [json.loads(line) for line in (data / "infill.jsonl").read_text().splitlines()][:PROBLEMS]
    result = evaluate.gaps(model, tokenizer, rows, SamplerParams.resolve(model))
    assert result["infill"] > result["baseline"] + MARGIN
    assert abs(result["infill"] - MEASURED_INFILL) <= MARGIN
    assert abs(result["baseline"] - MEASURED_BASELINE) <= 2 * MARGIN


def test_the_benchmark_scores_by_the_task_s_check(build):
    """The check counts any right filling, not only the reference's."""
    rng = np.random.default_rng(0)
    question, answer = build.problem(rng)
    rows = answer.split("\n")
    puzzle = question.split("\n")
    blanks = [i for i, c in enumerate(puzzle[0]) if c == build.BLANK]
    swapped = list(rows[0])
    swapped[blanks[0]], swapped[blanks[1]] = swapped[blanks[1]], swapped[blanks[0]]
    other = "\n".join(["".join(swapped)] + rows[1:])
    assert other != answer and build.check(question, other, answer) == 1.0
    assert build.check(question, "\n".join(rows[:2]), answer) == 0.5
