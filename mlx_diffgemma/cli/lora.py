"""python -m mlx_diffgemma.lora: fine-tune with the block-diffusion objective.

The flags are mlx_lm.lora's; a YAML file (``-c``) may set any of them by its
long name with underscores, and also ``lora_parameters``, ``lr_schedule`` and
``optimizer_config`` as in mlx-lm. Flags given on the command line win.
"""

import argparse
import math
import tempfile
import time
from pathlib import Path

import mlx.core as mx
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten
from mlx_lm.tuner.utils import build_schedule

from .. import cli
from ..tuner import adapters
from ..tuner.datasets import DataError, load_dataset
from ..tuner.objective import ObjectiveArgs, example_length
from ..tuner.trainer import TrainingArgs, evaluate, train
from ..utils import load

OPTIMIZERS = {
    "adam": optim.Adam,
    "adamw": optim.AdamW,
    "muon": optim.Muon,
    "sgd": optim.SGD,
    "adafactor": optim.Adafactor,
}

# mlx_lm.lora's defaults, where the option means the same here.
DEFAULTS = {
    "model": None,
    "train": False,
    "data": "data",
    "fine_tune_type": "lora",
    "optimizer": "adam",
    "optimizer_config": {},
    "mask_prompt": False,
    "num_layers": 16,
    "batch_size": 4,
    "iters": 1000,
    "val_batches": 25,
    "learning_rate": 1e-5,
    "steps_per_report": 10,
    "steps_per_eval": 200,
    "resume_adapter_file": None,
    "adapter_path": "adapters",
    "save_every": 100,
    "test": False,
    "test_batches": 500,
    "max_seq_length": 2048,
    "grad_checkpoint": False,
    "seed": 0,
    "lr_schedule": None,
    "lora_parameters": None,
    # Ours: the objective's autoregressive weight, and whether the router trains.
    "ar_weight": 1.0,
    "train_router": False,
}

# Options that must be whole numbers of at least 1, or -1 meaning "all".
_COUNTS = ("batch_size", "iters", "steps_per_report", "steps_per_eval", "save_every", "max_seq_length")
_COUNTS_OR_ALL = ("val_batches", "test_batches", "num_layers")


def setup_arg_parser():
    parser = cli.ArgumentParser(
        prog="mlx_diffgemma.lora",
        description="Fine-tune DiffusionGemma (LoRA, DoRA or full) with the block-diffusion objective.",
    )
    parser.add_argument("--model", metavar="PATH_OR_REPO", help="Model directory or Hugging Face repo.")
    parser.add_argument("--train", action="store_true", default=None, help="Train.")
    parser.add_argument("--data", metavar="DIR", help="Directory with train.jsonl, valid.jsonl, test.jsonl.")
    parser.add_argument("--fine-tune-type", choices=adapters.FINE_TUNE_TYPES, help="lora (default), dora or full.")
    parser.add_argument("--optimizer", choices=sorted(OPTIMIZERS), help="Optimizer (default adam).")
    parser.add_argument(
        "--mask-prompt", action="store_true", default=None, help="No autoregressive loss on prompt tokens."
    )
    parser.add_argument("--num-layers", type=int, help="Layers to fine-tune, counted from the last (-1: all).")
    parser.add_argument("--batch-size", type=int, help="Minibatch size (default 4).")
    parser.add_argument("--iters", type=int, help="Iterations to train for (default 1000).")
    parser.add_argument("--val-batches", type=int, help="Validation batches (-1: the whole validation set).")
    parser.add_argument("--learning-rate", type=float, help="Learning rate (default 1e-5).")
    parser.add_argument("--steps-per-report", type=int, help="Steps between loss reports.")
    parser.add_argument("--steps-per-eval", type=int, help="Steps between validations.")
    parser.add_argument("--resume-adapter-file", metavar="FILE", help="Start from these adapter weights.")
    parser.add_argument("--adapter-path", metavar="DIR", help="Where adapters are saved / loaded (default adapters).")
    parser.add_argument("--save-every", type=int, help="Save the adapters every N iterations.")
    parser.add_argument("--test", action="store_true", default=None, help="Evaluate on test.jsonl (after training).")
    parser.add_argument("--test-batches", type=int, help="Test batches (-1: the whole test set).")
    parser.add_argument("--max-seq-length", type=int, help="Longest example, in tokens after cutting into canvases.")
    parser.add_argument("-c", "--config", metavar="YAML", help="A YAML file of options.")
    parser.add_argument(
        "--grad-checkpoint",
        action="store_true",
        default=None,
        help="Recompute each layer's MLP and experts in the backward pass (less memory).",
    )
    parser.add_argument("--seed", type=int, help="Seed of the noise, batch order and LoRA initialisation.")
    parser.add_argument("--ar-weight", type=float, help="Weight of the encoder's autoregressive loss (default 1).")
    parser.add_argument(
        "--train-router", action="store_true", default=None, help="Train the routers too (frozen by default)."
    )
    return parser


def _read_config(path: str) -> dict:
    import yaml

    try:
        config = yaml.safe_load(Path(path).read_text())
    except OSError as e:
        raise ValueError(f"{path}: cannot read ({e.strerror or e})") from None
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if config is None:
        return {}
    if not isinstance(config, dict):
        raise ValueError(f"{path}: expected a mapping of options")
    unknown = sorted(set(config) - set(DEFAULTS))
    if unknown:
        raise ValueError(f"{path}: unknown option {unknown[0]!r}")
    return config


def options(argv=None) -> argparse.Namespace:
    """Command line over the YAML file over the defaults, checked."""
    args = vars(setup_arg_parser().parse_args(argv))
    config_file = args.pop("config")
    config = _read_config(config_file) if config_file else {}
    merged = {k: (args[k] if args.get(k) is not None else config.get(k, default)) for k, default in DEFAULTS.items()}
    check_options(merged, config_file)
    return argparse.Namespace(**merged)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def check_options(opts: dict, config_file=None):
    for name in _COUNTS + _COUNTS_OR_ALL:
        value = opts[name]
        allowed = value == -1 and name in _COUNTS_OR_ALL
        if isinstance(value, bool) or not isinstance(value, int) or (value < 1 and not allowed):
            more = " or -1 for all" if name in _COUNTS_OR_ALL else ""
            raise ValueError(f"{_flag(name)} must be a whole number >= 1{more} (got {value!r})")
    for name in ("learning_rate", "ar_weight"):
        value = opts[name]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise ValueError(f"{_flag(name)} must be a number >= 0 (got {value!r})")
    if not opts["model"]:
        raise ValueError("--model is required (a model directory or Hugging Face repo)")
    if not (opts["train"] or opts["test"]):
        raise ValueError("nothing to do: pass --train, --test or both")
    if opts["optimizer"] not in OPTIMIZERS:
        raise ValueError(f"--optimizer {opts['optimizer']!r}: expected one of {', '.join(sorted(OPTIMIZERS))}")
    if opts["fine_tune_type"] not in adapters.FINE_TUNE_TYPES:
        raise ValueError(f"--fine-tune-type {opts['fine_tune_type']!r}: expected lora, dora or full")
    for name in ("optimizer_config", "lr_schedule"):
        if opts[name] is not None and not isinstance(opts[name], dict):
            raise ValueError(f"{config_file}: {name} must be a mapping")
    if opts["lora_parameters"] is not None and not isinstance(opts["lora_parameters"], dict):
        raise ValueError(f"{config_file}: lora_parameters must be a mapping (rank, scale, dropout, keys)")


def writable_directory(path: Path, flag: str) -> Path:
    """``path``, created if needed, after checking a file can be written in it."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-test."):
            pass
    except OSError as e:
        raise ValueError(f"{flag} {path}: cannot write there ({e.strerror or e})") from None
    return path


def check_lengths(examples, canvas_length: int, limit: int, flag: str):
    for ex in examples:
        n = example_length(ex, canvas_length)
        if n > limit:
            blocks = (n - len(ex.prompt)) // canvas_length
            raise DataError(
                f"{ex.source}: the example is {n} tokens (prompt {len(ex.prompt)} + {blocks} canvases of "
                f"{canvas_length}), more than {flag} {limit}"
            )


def build_optimizer(opts):
    lr = build_schedule(opts.lr_schedule) if opts.lr_schedule else opts.learning_rate
    # As in mlx-lm: settings per optimizer name, e.g. {"adamw": {"weight_decay": 0.01}}.
    settings = (opts.optimizer_config or {}).get(opts.optimizer, {})
    try:
        return OPTIMIZERS[opts.optimizer](learning_rate=lr, **settings)
    except TypeError as e:
        raise ValueError(f"optimizer_config.{opts.optimizer}: {e}") from None


def run_lora(opts) -> int:
    data_dir = Path(opts.data).expanduser()
    if not data_dir.is_dir():
        raise DataError(f"--data {opts.data}: no such directory (expected train.jsonl, valid.jsonl, test.jsonl)")
    adapter_path = Path(opts.adapter_path).expanduser()
    if opts.train:
        writable_directory(adapter_path, "--adapter-path")
    np.random.seed(opts.seed)
    mx.random.seed(opts.seed)

    print("Loading pretrained model")
    model, tokenizer = load(opts.model)
    if tokenizer is None:
        raise ValueError(f"{opts.model}: no tokenizer files (tokenizer.json or tokenizer.model)")
    print("Loading datasets")
    required = (("train", "valid") if opts.train else ()) + (("test",) if opts.test else ())
    data = load_dataset(str(data_dir), tokenizer, required=required)
    C = model.canvas_length
    limit = min(opts.max_seq_length, model.args.max_position_embeddings)
    flag = "--max-seq-length" if limit == opts.max_seq_length else "the model's max_position_embeddings"
    for split in data.values():
        if split:
            check_lengths(split, C, limit, flag)
    eos = model.generation_config.get("eos_token_id", model.args.eos_token_id)
    objective = ObjectiveArgs(
        canvas_length=C,
        vocab_size=model.args.vocab_size,
        eos_ids=eos if isinstance(eos, list) else [eos],
        pad_id=model.generation_config.get("pad_token_id", model.args.pad_token_id),
        mask_prompt=opts.mask_prompt,
    )

    if opts.train:
        for split in ("train", "valid"):
            if len(data[split]) < opts.batch_size:
                raise ValueError(
                    f"--batch-size {opts.batch_size}: {data_dir / (split + '.jsonl')} has only "
                    f"{len(data[split])} examples"
                )
        opts.lora_parameters = adapters.prepare(
            model, opts.fine_tune_type, opts.num_layers, opts.lora_parameters, opts.train_router
        )
        if opts.resume_adapter_file:
            resume = Path(opts.resume_adapter_file).expanduser()
            try:
                weights = mx.load(str(resume))
            except Exception as e:
                raise ValueError(f"--resume-adapter-file {resume}: cannot read ({str(e).splitlines()[0]})") from None
            adapters.check_adapter_weights(model, weights, resume, full=opts.fine_tune_type == "full")
            model.load_weights(list(weights.items()), strict=False)
            print(f"Loading fine-tuned weights from {resume}")
        total = sum(v.size for _, v in tree_flatten(model.parameters()))
        trainable = sum(v.size for v in adapters.trainable_weights(model).values())
        print(f"Trainable parameters: {100 * trainable / total:.3f}% ({trainable / 1e6:.3f}M/{total / 1e6:.3f}M)")
        config = dict(vars(opts), num_layers=opts.num_layers, canvas_length=C)
        adapters.save_adapter_config(config, adapter_path / adapters.CONFIG_FILE)
        args = TrainingArgs(
            batch_size=opts.batch_size,
            iters=opts.iters,
            val_batches=opts.val_batches,
            steps_per_report=opts.steps_per_report,
            steps_per_eval=opts.steps_per_eval,
            steps_per_save=opts.save_every,
            adapter_file=adapter_path / adapters.ADAPTER_FILE,
            grad_checkpoint=opts.grad_checkpoint,
            ar_weight=opts.ar_weight,
            seed=opts.seed,
        )
        print("Training")
        tic = time.perf_counter()
        train(model, build_optimizer(opts), data["train"], data["valid"], objective, args)
        print(f"Trained in {time.perf_counter() - tic:.1f}s")
    elif opts.test and (adapter_path / adapters.CONFIG_FILE).exists():
        adapters.load_adapters(model, adapter_path)

    if opts.test:
        print("Testing")
        model.eval()
        test_loss = evaluate(
            model, data["test"], opts.batch_size, opts.test_batches, objective, opts.ar_weight, opts.seed
        )
        print(f"Test loss {test_loss:.3f}, Test ppl {math.exp(min(test_loss, 700)):.3f}.")
    return 0


def main(argv=None):
    cli.run(lambda: run_lora(options(argv)))


if __name__ == "__main__":
    main()
