"""`mlx_diffgemma.convert`: quantized logits within measured bounds, output layout,
bounded streaming, nothing half-written, one-line CLI errors, mlx-vlm interop.

Error bounds. Each (recipe, bits) conversion of the tiny checkpoint below is
compared with the float model on the same logits (tests/convert_reference.py:
4 prompts, two denoising steps of a 16-token canvas). The bounds are the values
measured on this checkpoint on CPU (``MEASURED``) with a little headroom for
other backends' rounding: x1.15 on RMS, x1.3 on max abs, -0.1 on top-1.
Deliberately broken converters fail them:
- gate and up swapped in the expert split: RMS 1.34-1.39 for 8, 4, 3 bits in
  the mixed and experts-only recipes (bounds 0.10-0.80), so 8 of the 9 cases
  fail (uniform 3-bit, itself at 1.47, does not), and so do the float and
  mlx-vlm comparisons;
- the router quantized at the expert bits: mixed 8/4/3 bits give RMS
  0.134/0.543/0.803 against bounds 0.111/0.476/0.792; experts-only
  0.109/0.531/0.806 against 0.095/0.471/0.798. All six fail.
"""

import hashlib
import importlib
import json
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from convert_reference import build_quantization_reference, logit_error, quantization_logits
from mlx_lm.models.switch_layers import QuantizedSwitchLinear
from reference import build_reference
from tokenizer_fixture import write_test_tokenizer

from mlx_diffgemma import load
from mlx_diffgemma.convert import ConvertError, convert
from mlx_diffgemma.recipes import piece
from mlx_diffgemma.utils import load_model

# The modules themselves (the package exports the function under the module's
# name): the writer's block and shard sizes and the steps the interruption tests replace.
convert_module = importlib.import_module("mlx_diffgemma.convert")
convert_weights = importlib.import_module("mlx_diffgemma.convert_weights")

# (recipe, bits) -> (logit RMS, max abs, top-1 agreement) measured against the
# float model on this file's checkpoint (seed 0, PROMPTS prompts), on CPU.
MEASURED = {
    ("mixed", 8): (0.0968, 1.112, 0.953),
    ("mixed", 4): (0.4137, 4.146, 0.906),
    ("mixed", 3): (0.6889, 5.375, 0.773),
    ("uniform", 8): (0.1344, 1.906, 0.953),
    ("uniform", 4): (0.9952, 7.463, 0.719),
    ("uniform", 3): (1.4699, 7.965, 0.664),
    ("experts-only", 8): (0.0827, 1.218, 0.992),
    ("experts-only", 4): (0.4092, 3.864, 0.914),
    ("experts-only", 3): (0.6935, 5.526, 0.766),
}
PROMPTS = 4


def bounds(recipe, bits):
    rms, max_abs, top1 = MEASURED[recipe, bits]
    return 1.15 * rms, 1.3 * max_abs, top1 - 0.1


def tree_digest(path: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(path.rglob("*")):
        h.update(str(f.relative_to(path)).encode())
        if f.is_file():
            h.update(f.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A tiny fp32 checkpoint in two shards, with tokenizer files."""
    path = tmp_path_factory.mktemp("hf") / "tiny-diffusiongemma"
    ref = build_quantization_reference(path / "whole")
    ref.save_pretrained(path, max_shard_size="200KB")
    for f in (path / "whole").iterdir():
        f.unlink()
    (path / "whole").rmdir()
    write_test_tokenizer(path)
    assert len(list(path.glob("*.safetensors"))) > 1
    return path


@pytest.fixture(scope="module")
def float_logits(source):
    return quantization_logits(load_model(source), prompts=PROMPTS)


@pytest.fixture(scope="module")
def converted(source, tmp_path_factory):
    """(recipe, bits) -> converted directory, made once per module."""
    out_root = tmp_path_factory.mktemp("mlx")
    made = {}

    def get(recipe="mixed", bits=4, **kwargs):
        key = (recipe, bits, tuple(sorted(kwargs.items())))
        if key not in made:
            name = f"{recipe}-{bits}-{len(made)}"
            made[key] = convert(str(source), str(out_root / name), q_bits=bits, recipe=recipe, progress=False, **kwargs)
        return made[key]

    return get


def measure(path: Path, float_logits):
    return logit_error(quantization_logits(load_model(path), prompts=PROMPTS), float_logits)


@pytest.mark.parametrize("bits", [8, 4, 3])
@pytest.mark.parametrize("recipe", ["mixed", "uniform", "experts-only"])
def test_quantized_logits_within_measured_bounds(converted, float_logits, recipe, bits):
    rms, max_abs, top1 = measure(converted(recipe, bits), float_logits)
    rms_bound, max_bound, top1_bound = bounds(recipe, bits)
    print(f"{recipe} {bits}: rms {rms:.4f} max {max_abs:.4f} top1 {top1:.3f}")
    assert rms <= rms_bound and max_abs <= max_bound and top1 >= top1_bound, (rms, max_abs, top1)


def test_more_bits_less_error(converted, float_logits):
    errors = [measure(converted("mixed", b), float_logits)[0] for b in (3, 4, 8)]
    assert errors[0] > errors[1] > errors[2]


@pytest.mark.parametrize(
    "recipe, expect",
    [
        ("mixed", dict(experts=3, router=None, embedding=8, attention=8, mlp=8, self_conditioning=8, vision=None)),
        ("uniform", dict(experts=3, router=3, embedding=3, attention=3, mlp=3, self_conditioning=3, vision=3)),
        (
            "experts-only",
            dict(experts=3, router=None, embedding=None, attention=None, mlp=None, self_conditioning=None, vision=None),
        ),
    ],
)
def test_recipes_quantize_what_they_say(converted, recipe, expect):
    out = converted(recipe, 3)
    model = load_model(out)
    seen = set()
    for path, module in model.named_modules():
        quantized = "scales" in module
        if quantized or hasattr(module, "to_quantized"):
            kind = piece(path)
            seen.add(kind)
            assert (module.bits if quantized else None) == expect[kind], path
    assert seen == set(expect)
    assert isinstance(model.layers[0].experts.switch_glu.gate_proj, QuantizedSwitchLinear)
    # Norms, router and per-expert scales, layer scalars stay float, in the dtype.
    for name, value in mx.load(str(out / "model.safetensors")).items():
        if name.endswith(("norm.weight", "router.scale", "per_expert_scale", "layer_scalar")):
            assert value.dtype == mx.float32, name
    config = json.loads((out / "config.json").read_text())
    assert config["quantization"] == config["quantization_config"]


def test_output_layout(source, converted):
    out = converted("mixed", 4)
    names = {f.name for f in out.iterdir()}
    for f in (
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "chat_template.jinja",
        "generation_config.json",
        "README.md",
        "model.safetensors.index.json",
        "config.json",
    ):
        assert f in names, f
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {"model.safetensors"}
    assert not any(k.startswith("model.") for k in index["weight_map"])
    # The vision tower is kept, in our layout, and so is its config.
    assert "vision_tower.patch_embedder.input_proj.weight" in index["weight_map"]
    assert "embed_vision.embedding_projection.weight" in index["weight_map"]
    # Encoder and decoder weights once; the encoder's scalars beside the decoder's.
    assert "layers.0.encoder_layer_scalar" in index["weight_map"]
    assert index["metadata"]["total_size"] == sum(v.nbytes for v in mx.load(str(out / "model.safetensors")).values())
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "diffusion_gemma" and "vision_config" in config
    assert config["quantization"]["bits"] == 4 and config["quantization"]["group_size"] == 64
    _, tokenizer = load(str(out))
    assert tokenizer is not None


def test_generation_runs_on_the_quantized_model(converted):
    from mlx_diffgemma.generate import generate, stream_generate

    model, tokenizer = load(str(converted("mixed", 4)))
    events = list(stream_generate(model, None, [2, 5, 7], max_tokens=16, max_denoising_steps=4, seed=0))
    committed = [t for e in events for t in e.token_ids]
    assert 1 <= len(events) and all(0 <= t < model.args.vocab_size for t in committed)
    assert events[-1].finish_reason in ("stop", "length")
    assert isinstance(generate(model, tokenizer, [2, 5, 7], max_tokens=16, max_denoising_steps=4), str)


def test_small_blocks_and_shards_give_the_same_model(source, converted, tmp_path, monkeypatch):
    """Reading in blocks of a few rows and writing many shards changes nothing."""
    monkeypatch.setattr(convert_weights, "BLOCK_BYTES", 4096)
    monkeypatch.setattr(convert_weights, "SHARD_BYTES", 64 << 10)
    out = convert(str(source), str(tmp_path / "small"), q_bits=4, progress=False)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 3
    whole = mx.load(str(converted("mixed", 4) / "model.safetensors"))
    pieces = {}
    for shard in set(index["weight_map"].values()):
        pieces.update(mx.load(str(out / shard)))
    assert pieces.keys() == whole.keys()
    for name in whole:
        assert mx.array_equal(pieces[name], whole[name]), name


def test_float_conversion_is_exact(source, float_logits, tmp_path):
    out = convert(str(source), str(tmp_path / "fp32"), progress=False)
    assert np.array_equal(quantization_logits(load_model(out), prompts=PROMPTS), float_logits)
    out = convert(str(source), str(tmp_path / "bf16"), dtype="bfloat16", progress=False)
    model = load_model(out)
    assert model.embed_tokens.weight.dtype == mx.bfloat16
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"


def test_bfloat16_scales(source, float_logits, tmp_path):
    out = convert(str(source), str(tmp_path / "bf16q"), q_bits=4, dtype="bfloat16", progress=False)
    model = load_model(out)
    assert model.layers[0].experts.switch_glu.down_proj.scales.dtype == mx.bfloat16
    rms = logit_error(quantization_logits(model, prompts=PROMPTS), float_logits)[0]
    assert rms < bounds("mixed", 4)[0] * 1.5


def test_dequantize_gives_the_quantized_values(converted, tmp_path):
    quantized = converted("mixed", 4)
    out = convert(str(quantized), str(tmp_path / "deq"), dequantize=True, progress=False)
    assert "quantization" not in json.loads((out / "config.json").read_text())
    a = quantization_logits(load_model(quantized), prompts=PROMPTS)
    b = quantization_logits(load_model(out), prompts=PROMPTS)
    assert np.abs(a - b).max() < 1e-3


@pytest.mark.parametrize("mode, bits", [("mxfp4", 4), ("nvfp4", 4), ("mxfp8", 8)])
def test_float_formats(source, float_logits, tmp_path, mode, bits):
    out = convert(str(source), str(tmp_path / mode), q_mode=mode, progress=False)
    config = json.loads((out / "config.json").read_text())
    assert (config["quantization"]["mode"], config["quantization"]["bits"]) == (mode, bits)
    model = load_model(out)
    assert model.layers[0].experts.switch_glu.up_proj.mode == mode
    rms = logit_error(quantization_logits(model, prompts=PROMPTS), float_logits)[0]
    assert rms < 1.0


@pytest.mark.parametrize(
    "kwargs, words",
    [
        (dict(q_bits=7), "takes 2, 3, 4, 5, 6, 8 bits, not 7"),
        (dict(q_mode="mxfp4", q_bits=8), "mxfp4 quantization takes 4 bits, not 8"),
        (dict(q_mode="nvfp4", q_group_size=32), "nvfp4 quantization takes group size 16, not 32"),
        (dict(q_group_size=16), "affine quantization takes group size 32, 64, 128, not 16"),
        (dict(q_bits=4, dequantize=True), "not both"),
        (dict(dequantize=True), "not quantized"),
        (dict(recipe="fancy"), "unknown recipe"),
    ],
)
def test_bad_options(source, tmp_path, kwargs, words):
    with pytest.raises(ConvertError, match=words):
        convert(str(source), str(tmp_path / "out"), progress=False, **kwargs)
    assert not (tmp_path / "out").exists()


def test_quantizing_a_quantized_model_is_refused(converted, tmp_path):
    with pytest.raises(ConvertError, match="already quantized"):
        convert(str(converted("mixed", 4)), str(tmp_path / "again"), q_bits=3, progress=False)


def test_default_output_name(source, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert convert(str(source), q_bits=4, progress=False) == Path("tiny-diffusiongemma-4bit")
    assert convert(str(source), q_mode="mxfp4", recipe="uniform", progress=False) == Path(
        "tiny-diffusiongemma-mxfp4-uniform"
    )
    assert convert(str(source), dtype="bfloat16", progress=False) == Path("tiny-diffusiongemma-bf16")


def leftovers(parent: Path, name: str):
    return [p.name for p in parent.iterdir() if p.name.startswith(f".{name}.")]


@pytest.mark.parametrize("error", [KeyboardInterrupt, RuntimeError])
def test_interrupted_conversion_leaves_nothing(source, tmp_path, monkeypatch, error):
    calls = []
    real = convert_weights.convert_arrays

    def failing(arrays, rules):
        calls.append(1)
        if len(calls) == 40:  # in the middle of the layers
            raise error("stop")
        return real(arrays, rules)

    monkeypatch.setattr(convert_weights, "convert_arrays", failing)
    with pytest.raises(error):
        convert(str(source), str(tmp_path / "out"), q_bits=4, progress=False)
    assert len(calls) == 40
    assert not (tmp_path / "out").exists()
    assert leftovers(tmp_path, "out") == []


def test_force_replaces_only_a_complete_model(source, tmp_path, monkeypatch):
    target = tmp_path / "out"
    convert(str(source), str(target), q_bits=8, progress=False)  # an older model
    (target / "old-model.txt").write_text("keep me")
    with pytest.raises(ConvertError, match="already exists"):
        convert(str(source), str(target), q_bits=4, progress=False)

    def failing(*args):
        raise RuntimeError("disk on fire")

    with monkeypatch.context() as m:
        m.setattr(convert_module, "write_weights", failing)
        with pytest.raises(RuntimeError):
            convert(str(source), str(target), q_bits=4, force=True, progress=False)
    assert (target / "old-model.txt").read_text() == "keep me"
    assert leftovers(tmp_path, "out") == []

    convert(str(source), str(target), q_bits=4, force=True, progress=False)
    assert not (target / "old-model.txt").exists()
    assert load_model(target) is not None
    assert leftovers(tmp_path, "out") == []


def test_source_is_never_modified(source, tmp_path):
    before = tree_digest(source)
    with pytest.raises(ConvertError, match="outside the source"):
        convert(str(source), str(source), q_bits=4, force=True, progress=False)
    with pytest.raises(ConvertError, match="outside the source"):
        convert(str(source), str(source.parent), q_bits=4, force=True, progress=False)
    convert(str(source), str(tmp_path / "out"), q_bits=4, progress=False)
    assert tree_digest(source) == before


def test_upload(source, tmp_path, monkeypatch):
    import huggingface_hub

    calls = []

    class FakeApi:
        def create_repo(self, repo_id, exist_ok):
            calls.append(("create", repo_id))

        def upload_folder(self, folder_path, repo_id, repo_type):
            calls.append(("upload", folder_path, repo_id, repo_type))

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    out = convert(str(source), str(tmp_path / "up"), q_bits=4, upload_repo="me/tiny-4bit", progress=False)
    assert calls == [("create", "me/tiny-4bit"), ("upload", str(out), "me/tiny-4bit", "model")]
    card = (out / "README.md").read_text()
    assert 'load("me/tiny-4bit")' in card and "library_name: mlx" in card


# --- The command line ---------------------------------------------------------


def run_cli(*args, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "mlx_diffgemma.convert", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=300,
    )


def assert_one_line_error(result, words):
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert words in lines[0], lines[0]


@pytest.fixture
def small_source(tmp_path):
    """A tiny checkpoint that a test may break (in a shard or its config)."""
    path = tmp_path / "src"
    build_reference(path, **{"intermediate_size": 128, "moe_intermediate_size": 64})
    return path


def test_cli_converts(small_source, tmp_path):
    result = run_cli("--hf-path", small_source, "--mlx-path", tmp_path / "out", "--q-bits", "4")
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    model = load_model(tmp_path / "out")
    assert model.layers[0].experts.switch_glu.down_proj.bits == 4


def test_cli_text_only_leaves_the_vision_tower_out(small_source, tmp_path):
    kept = load_model(small_source)
    result = run_cli("--hf-path", small_source, "--mlx-path", tmp_path / "text", "--text-only")
    assert result.returncode == 0, result.stderr
    index = json.loads((tmp_path / "text" / "model.safetensors.index.json").read_text())
    assert not any(k.startswith(("vision_tower.", "embed_vision.")) for k in index["weight_map"])
    assert "vision_config" not in json.loads((tmp_path / "text" / "config.json").read_text())
    model = load_model(tmp_path / "text")
    assert model.args.vision is None and kept.args.vision is not None
    # The text model is the same.
    assert np.array_equal(quantization_logits(model, prompts=1), quantization_logits(kept, prompts=1))


def test_cli_help_explains_each_flag():
    result = run_cli("--help")
    assert result.returncode == 0
    for flag in (
        "--hf-path",
        "--mlx-path",
        "--quantize",
        "--q-bits",
        "--q-group-size",
        "--q-mode",
        "--recipe",
        "--dtype",
        "--dequantize",
        "--upload-repo",
        "--force",
        "--text-only",
    ):
        assert flag in result.stdout, flag


def _truncate(path):
    shard = path / "model.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) * 2 // 3])


def _retype(path):
    config = json.loads((path / "config.json").read_text())
    config["model_type"] = "gemma4"
    (path / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize(
    "breakage, args, words",
    [
        (lambda p: (p / "config.json").unlink(), ["--q-bits", "4"], "config.json: missing"),
        (_retype, ["--q-bits", "4"], "model_type is 'gemma4'"),
        (_truncate, ["--q-bits", "4"], "truncated"),
        (None, ["--q-bits", "7"], "invalid choice: 7"),
        (None, ["--q-mode", "mxfp4", "--q-bits", "8"], "mxfp4 quantization takes 4 bits"),
        (None, ["--q-bits", "4", "--dequantize"], "not both"),
    ],
)
def test_cli_bad_input(small_source, tmp_path, breakage, args, words):
    if breakage:
        breakage(small_source)
    out = tmp_path / "out"
    result = run_cli("--hf-path", small_source, "--mlx-path", out, *args)
    assert_one_line_error(result, words)
    assert not out.exists()
    assert leftovers(tmp_path, "out") == []


def test_cli_refuses_an_existing_output(small_source, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("x")
    result = run_cli("--hf-path", small_source, "--mlx-path", out, "--q-bits", "4")
    assert_one_line_error(result, "already exists (pass --force to replace it)")
    assert [p.name for p in out.iterdir()] == ["mine.txt"]


def test_cli_missing_source(tmp_path):
    result = run_cli("--hf-path", tmp_path / "nothing", "--mlx-path", tmp_path / "out")
    assert_one_line_error(result, "no such model directory")
    assert not (tmp_path / "out").exists()


# --- mlx-vlm interop ------------------------------------------------------------


@pytest.fixture(scope="module")
def vlm_source(tmp_path_factory):
    """A tiny checkpoint whose config has the release's form.

    mlx-vlm 0.7.10 reads global_head_dim / num_global_key_value_heads but not
    per_layer_config (the form transformers >= 5.23 writes), so the test uses
    the form of the released config.json, which both read.
    """
    pytest.importorskip("mlx_vlm.models.diffusion_gemma")
    path = tmp_path_factory.mktemp("vlm") / "src"
    build_quantization_reference(path)
    write_test_tokenizer(path)
    config = json.loads((path / "config.json").read_text())
    text = config["text_config"]
    per_layer = text.pop("per_layer_config")
    full = next(iter(per_layer.values()))
    text["global_head_dim"] = full["head_dim"]
    text["num_global_key_value_heads"] = full["num_key_value_heads"]
    (path / "config.json").write_text(json.dumps(config, indent=2))
    return path


def vlm_convert(src, dst, *args):
    result = subprocess.run(
        [sys.executable, "-m", "mlx_vlm", "convert", "--hf-path", str(src), "--mlx-path", str(dst), *args],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return dst


# mlx-vlm's DiffusionGemma quant_predicate: embedding, attention, dense MLP and
# router at 8-bit (group 64); experts and self-conditioning at the requested bits.
VLM_RECIPE = dict(
    experts="requested",
    router="high",
    embedding="high",
    attention="high",
    mlp="high",
    self_conditioning="requested",
    vision=None,  # mlx-vlm keeps vision towers in float
)


def test_mlx_vlm_float_checkpoint_loads_exactly(vlm_source, tmp_path):
    out = vlm_convert(vlm_source, tmp_path / "vlm-fp32")
    ref = quantization_logits(load_model(vlm_source), prompts=PROMPTS)
    assert np.array_equal(quantization_logits(load_model(out), prompts=PROMPTS), ref)
    # Its vision tower comes along: the same soft tokens for an image.
    source, theirs = load_model(vlm_source), load_model(out)
    assert theirs.args.vision is not None
    rng = np.random.default_rng(0)
    pixels = mx.array(rng.random((54, 768)).astype(np.float32))
    positions = mx.array(np.stack(np.meshgrid(np.arange(9), np.arange(6)), -1).reshape(-1, 2))
    expected = source.encode_image(pixels, positions, (6, 9))
    assert np.array_equal(np.array(theirs.encode_image(pixels, positions, (6, 9))), np.array(expected))


def test_mlx_vlm_quantized_checkpoint(vlm_source, tmp_path):
    vlm = vlm_convert(vlm_source, tmp_path / "vlm-4bit", "-q", "--q-bits", "4")
    ours = convert(str(vlm_source), str(tmp_path / "ours"), q_bits=4, recipe=VLM_RECIPE, progress=False)
    ref = quantization_logits(load_model(vlm_source), prompts=PROMPTS)
    from_vlm = quantization_logits(load_model(vlm), prompts=PROMPTS)
    # The same recipe quantizes the same weights to the same values.
    assert np.abs(from_vlm - quantization_logits(load_model(ours), prompts=PROMPTS)).max() < 1e-4
    rms, _, _ = logit_error(from_vlm, ref)
    assert rms < bounds("mixed", 4)[0] * 1.5
    # Our converter rewrites it in our layout (unchanged values) or back to float.
    mine = convert(str(vlm), str(tmp_path / "relaid"), progress=False)
    assert np.array_equal(quantization_logits(load_model(mine), prompts=PROMPTS), from_vlm)
    config = json.loads((mine / "config.json").read_text())
    assert config["quantization"]["layers.0.router.proj"]["bits"] == 8
    dense = convert(str(vlm), str(tmp_path / "dense"), dequantize=True, progress=False)
    assert np.abs(quantization_logits(load_model(dense), prompts=PROMPTS) - from_vlm).max() < 1e-3
    # Its vision tower, kept in float by mlx-vlm, is read and carried through both.
    for path in (vlm, mine, dense):
        assert load_model(path).args.vision is not None, path
