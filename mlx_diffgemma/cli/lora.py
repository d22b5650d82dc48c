"""python -m mlx_diffgemma.lora: fine-tune with the block-diffusion objective.

The flags are mlx_lm.lora's; a YAML file (``-c``) may set any of them by its
long name with underscores, and also ``lora_parameters``, ``lr_schedule`` and
``optimizer_config`` as in mlx-lm. Flags given on the command line win.
"""

import argparse
import math
from pathlib import Path

from .. import cli
from ..tuner.adapters import FINE_TUNE_TYPES
from ..tuner.run import OPTIMIZERS, Progress, run_lora

# mlx_lm.lora's defaults, where the option means the same here.
DEFAULTS = {
    "model": None,
    "train": False,
    "data": "data",
    "fine_tune_type": "lora",
    "optimizer": "adam",
    "optimizer_config": {},
    "mask_prompt": False,
    # mlx_lm.lora's 16, or every layer of a smaller model: None until the
    # model is loaded (tuner.adapters.layer_count). A value given out of
    # range, by flag or YAML, is an error.
    "num_layers": None,
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
        prog=cli.prog("lora", "mlx_diffgemma.lora"),
        description="Fine-tune DiffusionGemma (LoRA, DoRA or full) with the block-diffusion objective.",
    )
    parser.add_argument("--model", metavar="PATH_OR_REPO", help="Model directory or Hugging Face repo.")
    parser.add_argument("--train", action="store_true", default=None, help="Train.")
    parser.add_argument(
        "--data", metavar="DIR", help="Directory with train.jsonl and valid.jsonl (test.jsonl for --test)."
    )
    parser.add_argument("--fine-tune-type", choices=FINE_TUNE_TYPES, help="lora (default), dora or full.")
    parser.add_argument("--optimizer", choices=sorted(OPTIMIZERS), help="Optimizer (default adam).")
    parser.add_argument(
        "--mask-prompt", action="store_true", default=None, help="No autoregressive loss on prompt tokens."
    )
    parser.add_argument(
        "--num-layers", type=int, help="Layers to fine-tune, counted from the last (default 16 or all; -1: all)."
    )
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


def _yaml_problem(e) -> str:
    # "file:line: not valid YAML (what)", the line and column of the mark.
    mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
    what = getattr(e, "problem", None) or str(e).splitlines()[0]
    where = f":{mark.line + 1}" if mark is not None else ""
    column = f" at column {mark.column + 1}" if mark is not None else ""
    return f"{where}: not valid YAML ({what}{column})"


def _read_config(path: str) -> dict:
    import yaml

    try:
        config = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except OSError as e:
        raise ValueError(f"{path}: cannot read ({e.strerror or e})") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e.reason})") from None
    except yaml.YAMLError as e:
        raise ValueError(f"{path}{_yaml_problem(e)}") from None
    if config is None:
        return {}
    if not isinstance(config, dict):
        raise ValueError(f"{path}: expected a mapping of options (name: value), got {type(config).__name__}")
    unknown = sorted(set(map(str, config)) - set(DEFAULTS))
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
        if value is None and name == "num_layers":
            continue  # not given: the default, once the model's layers are known
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
    if opts["fine_tune_type"] not in FINE_TUNE_TYPES:
        raise ValueError(f"--fine-tune-type {opts['fine_tune_type']!r}: expected lora, dora or full")
    for name in ("optimizer_config", "lr_schedule"):
        if opts[name] is not None and not isinstance(opts[name], dict):
            raise ValueError(f"{config_file}: {name} must be a mapping")
    for name in ("train", "test", "mask_prompt", "grad_checkpoint", "train_router"):
        if not isinstance(opts[name], bool):
            raise ValueError(f"{config_file}: {name} must be true or false (got {opts[name]!r})")
    for name in ("model", "data", "adapter_path", "resume_adapter_file"):
        if opts[name] is not None and not isinstance(opts[name], str):
            raise ValueError(f"{config_file}: {name} must be a string (got {opts[name]!r})")
    if opts["lora_parameters"] is not None and not isinstance(opts["lora_parameters"], dict):
        raise ValueError(f"{config_file}: lora_parameters must be a mapping (rank, scale, dropout, keys)")


def main(argv=None):
    progress = Progress()
    # Ctrl-C: one line saying what is on disk.
    cli.run(lambda: run_lora(options(argv), progress), interrupted=progress.interrupted)


if __name__ == "__main__":
    main()
