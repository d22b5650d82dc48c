"""Config reading, checkpoint layouts, and clear errors for bad checkpoints."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from reference import build_reference
from safetensors.numpy import load_file, save_file

from mlx_diffgemma import load
from mlx_diffgemma.config import ConfigError, ModelArgs
from mlx_diffgemma.utils import LoadError, load_model

# The released checkpoint's published configs, and its tensor listing (weights.tsv).
RELEASED = Path(__file__).parent / "data/diffusiongemma-26B-A4B-it"


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    """A tiny checkpoint in several shards with an index, like the release."""
    path = tmp_path_factory.mktemp("sharded")
    ref = build_reference(path / "src")
    ref.save_pretrained(path / "ckpt", max_shard_size="1MB")
    assert len(list((path / "ckpt").glob("*.safetensors"))) > 1
    return path / "ckpt"


def copy_of(src: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "copy"
    shutil.copytree(src, dst)
    return dst


def shard_holding(path: Path, tensor: str) -> Path:
    index = json.loads((path / "model.safetensors.index.json").read_text())
    return path / index["weight_map"][tensor]


def error_of(path) -> str:
    with pytest.raises(LoadError) as e:
        load(str(path))
    message = str(e.value)
    assert "\n" not in message
    return message


def test_sharded_checkpoint_loads_without_tokenizer(sharded):
    model, tokenizer = load(str(sharded))
    assert tokenizer is None
    assert len(model.layers) == 5
    assert "max_denoising_steps" in model.generation_config  # transformers writes it


def test_released_config():
    config = json.loads((RELEASED / "config.json").read_text())
    args = ModelArgs.from_dict(config)
    full = [i for i, t in enumerate(args.layer_types) if t == "full_attention"]
    assert full == [5, 11, 17, 23, 29]
    assert [args.layer_head_dims[i] for i in (0, 5)] == [256, 512]
    assert [args.layer_kv_heads[i] for i in (0, 5)] == [8, 2]
    assert args.sliding_window == 1024 and args.canvas_length == 256
    assert args.num_experts == 128 and args.top_k_experts == 8


def test_both_config_forms_agree():
    config = json.loads((RELEASED / "config.json").read_text())
    text = dict(config["text_config"])
    gd, gkv = text.pop("global_head_dim"), text.pop("num_global_key_value_heads")
    text["per_layer_config"] = {
        str(i): {"head_dim": gd, "num_key_value_heads": gkv}
        for i, t in enumerate(text["layer_types"])
        if t == "full_attention"
    }
    assert ModelArgs.from_dict(dict(config, text_config=text)) == ModelArgs.from_dict(config)


@pytest.mark.parametrize(
    "change, words",
    [
        (lambda c: c.update(model_type="gemma4"), "model_type is 'gemma4'"),
        (lambda c: c.pop("text_config"), "text_config"),
        (lambda c: c["text_config"].pop("num_experts"), "num_experts"),
        (lambda c: c["text_config"].update(num_key_value_heads=3), "KV heads"),
    ],
)
def test_bad_configs(change, words):
    config = json.loads((RELEASED / "config.json").read_text())
    change(config)
    with pytest.raises(ConfigError, match=words):
        ModelArgs.from_dict(config)


def test_missing_config(sharded, tmp_path):
    path = copy_of(sharded, tmp_path)
    (path / "config.json").unlink()
    assert "config.json: missing" in error_of(path)


def test_not_diffusion_gemma(sharded, tmp_path):
    path = copy_of(sharded, tmp_path)
    config = json.loads((path / "config.json").read_text())
    config["model_type"] = "gemma4"
    (path / "config.json").write_text(json.dumps(config))
    assert "model_type is 'gemma4'" in error_of(path)


def test_nonexistent_path(tmp_path):
    assert "no such model directory" in error_of(tmp_path / "nothing-here")


def test_missing_shard(sharded, tmp_path):
    path = copy_of(sharded, tmp_path)
    shard = shard_holding(path, "model.decoder.norm.weight")
    shard.unlink()
    message = error_of(path)
    assert shard.name in message and "missing" in message


def test_truncated_shard(sharded, tmp_path):
    path = copy_of(sharded, tmp_path)
    shard = shard_holding(path, "model.decoder.embed_tokens.weight")
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    assert shard.name in error_of(path)


def rewrite(path: Path, tensor: str, edit):
    shard = shard_holding(path, tensor)
    tensors = load_file(shard)
    edit(tensors)
    save_file(tensors, shard, metadata={"format": "pt"})


def test_wrong_shape(sharded, tmp_path):
    path = copy_of(sharded, tmp_path)
    name = "model.decoder.layers.3.mlp.gate_proj.weight"
    rewrite(path, name, lambda t: t.update({name: np.zeros((95, 64), np.float32)}))
    message = error_of(path)
    assert name in message and "[95, 64]" in message and "[96, 64]" in message


def test_wrong_expert_shape(sharded, tmp_path):
    path = copy_of(sharded, tmp_path)
    name = "model.decoder.layers.1.experts.gate_up_proj"
    rewrite(path, name, lambda t: t.update({name: np.zeros((8, 46, 64), np.float32)}))
    assert name in error_of(path)


def test_missing_tensor(sharded, tmp_path):
    path = copy_of(sharded, tmp_path)
    name = "model.decoder.layers.2.self_attn.k_norm.weight"
    rewrite(path, name, lambda t: t.pop(name))
    # The index still lists it; the shard no longer holds it.
    message = error_of(path)
    assert "missing tensor" in message and "layers.2.self_attn.k_norm.weight" in message


def test_unknown_tensor(sharded, tmp_path):
    path = copy_of(sharded, tmp_path)
    name = "model.decoder.norm.weight"
    rewrite(path, name, lambda t: t.update({"model.decoder.extra.weight": np.ones(3, np.float32)}))
    message = error_of(path)
    assert "unexpected tensor model.decoder.extra.weight" in message


def test_value_projection_on_a_full_layer_is_unknown(sharded, tmp_path):
    """Full layers have no v_proj; a checkpoint that has one is not this model."""
    path = copy_of(sharded, tmp_path)
    name = "model.decoder.norm.weight"
    extra = "model.decoder.layers.2.self_attn.v_proj.weight"
    rewrite(path, name, lambda t: t.update({extra: np.ones((32, 64), np.float32)}))
    assert extra in error_of(path)


def test_vision_tower_is_skipped(sharded):
    # The tiny checkpoint carries a vision tower; loading succeeds without it.
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    assert any("vision_tower" in k for k in index["weight_map"])
    load_model(sharded)


def test_hub_id_is_downloaded_with_huggingface_hub(sharded, monkeypatch):
    calls = []

    def fake_download(repo_id, revision=None, allow_patterns=None):
        calls.append((repo_id, allow_patterns))
        return str(sharded)

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
    model, _ = load("google/diffusiongemma-26B-A4B-it")
    assert calls and calls[0][0] == "google/diffusiongemma-26B-A4B-it"
    assert "*.safetensors" in calls[0][1]
    assert len(model.layers) == 5


class StageOf:
    """What a pipeline stage asks of its group before any exchange: rank and size."""

    def __init__(self, rank, size):
        self._rank, self._size = rank, size

    def rank(self):
        return self._rank

    def size(self):
        return self._size


@pytest.mark.parametrize("rank", [0, 1])
def test_a_pipeline_stage_downloads_only_its_shards(sharded, tmp_path, monkeypatch, rank):
    """Each process of a pipeline fetches the config and index, then only the
    shards holding its stage's tensors: and those are all it needs to load."""
    import fnmatch

    import huggingface_hub

    calls = []

    def fake_download(repo_id, revision=None, allow_patterns=None):
        # A snapshot holding only what was asked for, as the Hub's would.
        calls.append(allow_patterns)
        out = tmp_path / f"snapshot{len(calls)}"
        out.mkdir()
        for f in sharded.iterdir():
            if any(fnmatch.fnmatch(f.name, p) for p in allow_patterns):
                shutil.copy(f, out / f.name)
        return str(out)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
    model, _ = load("google/diffusiongemma-26B-A4B-it", pipeline_group=StageOf(rank, 2))
    assert len(calls) == 2 and not any(p.endswith(".safetensors") for p in calls[0])
    fetched = {p for p in calls[1] if p.endswith(".safetensors")}
    index = json.loads((sharded / "model.safetensors.index.json").read_text())["weight_map"]
    layers = range(0, 3) if rank == 0 else range(3, 5)  # 5 layers: 3 + 2
    needed = {f for name, f in index.items() if any(f"layers.{i}." in name for i in layers)}
    assert needed <= fetched
    if rank == 1:  # the first shards hold the first layers and the vision tower: not its own
        assert fetched < set(index.values())
    assert model.stage.start == layers.start and len(model.layers) == len(layers)


def test_hub_failure_is_one_line(monkeypatch):
    import huggingface_hub

    def offline(*args, **kwargs):
        raise OSError("We couldn't connect to the Hub.\nCheck your connection.")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(LoadError) as e:
        load("someone/some-model")
    assert "someone/some-model" in str(e.value) and "\n" not in str(e.value)


def test_null_token_ids_fall_back_alike(tmp_path):
    """A null eos/pad id in generation_config.json or config.json means "not given" to
    the config, the sampler, the tokenizer's stop set and the training objective alike."""
    from mlx_diffgemma.config import eos_token_ids, pad_token_id
    from mlx_diffgemma.sampler_params import SamplerParams

    path = copy_of(Path(__file__).parents[1] / "examples/shift/model", tmp_path)
    generation = json.loads((path / "generation_config.json").read_text())
    (path / "generation_config.json").write_text(json.dumps(dict(generation, eos_token_id=None, pad_token_id=None)))
    config = json.loads((path / "config.json").read_text())
    text = dict(config["text_config"], eos_token_id=106)
    (path / "config.json").write_text(json.dumps(dict(config, eos_token_id=None, text_config=text)))

    model, tokenizer = load(str(path))
    assert model.args.eos_token_id == [106]  # the top level's null gives way to text_config's
    assert eos_token_ids(model.generation_config, model.args) == [106]
    assert pad_token_id(model.generation_config, model.args) == model.args.pad_token_id == 0
    params = SamplerParams.resolve(model)
    assert params.eos_token_id == [106] and params.pad_token_id == 0
    assert tokenizer.eos_token_ids == {tokenizer.eos_token_id, 106}  # mlx-lm adds the tokenizer's own

    (path / "generation_config.json").write_text(json.dumps(dict(generation, eos_token_id=[None, 50])))
    model, tokenizer = load(str(path))
    assert SamplerParams.resolve(model).eos_token_id == [50]
    assert tokenizer.eos_token_ids == {tokenizer.eos_token_id, 50}

    (path / "config.json").write_text(json.dumps(dict(config, eos_token_id="106")))
    assert error_of(path) == f"{path / 'config.json'}: eos_token_id must be a token id or a list of them"
