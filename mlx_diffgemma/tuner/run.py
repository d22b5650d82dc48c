"""What ``python -m mlx_diffgemma.lora`` does once its options are checked.

Apart from the command line (``cli.lora``) so that the command's entry point
stays light: the libraries load inside its Ctrl-C handler.
"""

import math
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import mlx.core as mx
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten
from mlx_lm.tuner.utils import build_schedule

from ..config import eos_token_ids, pad_token_id
from ..utils import load
from . import adapters
from .datasets import DataError, check_data_directory, load_dataset
from .objective import ObjectiveArgs, example_length
from .trainer import TrainingArgs, evaluate, train

OPTIMIZERS = {
    "adam": optim.Adam,
    "adamw": optim.AdamW,
    "muon": optim.Muon,
    "sgd": optim.SGD,
    "adafactor": optim.Adafactor,
}


@dataclass
class Progress:
    """How far a run got, for the line Ctrl-C prints."""

    adapter_file: Optional[Path] = None
    save_every: int = 0
    training: bool = False
    trained: bool = False
    saved: Optional[int] = None  # the iteration adapter_file holds, from this run

    def interrupted(self) -> str:
        if self.adapter_file is None:  # options not read yet, or --test alone
            return "interrupted; nothing was written"
        if not self.training:
            return "interrupted before training started; nothing was written"
        where = self.adapter_file.parent
        if self.trained:
            return f"interrupted after training; the trained adapters are in {where}"
        if self.saved is None:
            return (
                f"training interrupted before its first save (every {self.save_every} iterations); "
                f"nothing was written to {where}"
            )
        return f"training interrupted; the last saved adapters (iteration {self.saved}) are in {where}"


def check_writable_directory(path: Path, flag: str):
    """Fail now, before the model loads, if ``path`` cannot hold the adapters.

    Directories made for the check are removed again: the adapters'
    directory appears with the first save, so a run that fails or is
    interrupted before it leaves nothing behind."""
    made = [p for p in (path, *path.parents) if not p.exists()]
    try:
        if path.exists() and not path.is_dir():
            raise ValueError(f"{flag} {path}: a file, not a directory")
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-test."):
            pass
    except OSError as e:
        raise ValueError(f"{flag} {path}: cannot write there ({e.strerror or e})") from None
    finally:
        for p in made:  # deepest first
            try:
                p.rmdir()
            except OSError:
                pass


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


def _report(line: str):
    # Flushed: a log piped to a file or `tee` shows each line as it comes.
    print(line, flush=True)


def run_lora(opts, progress: Progress) -> int:
    data_dir = check_data_directory(opts.data)
    adapter_path = Path(opts.adapter_path).expanduser()
    if opts.train:
        progress.adapter_file = adapter_path / adapters.ADAPTER_FILE
        progress.save_every = opts.save_every
        check_writable_directory(adapter_path, "--adapter-path")
    np.random.seed(opts.seed)
    mx.random.seed(opts.seed)

    _report("Loading pretrained model")
    model, tokenizer = load(opts.model)
    if tokenizer is None:
        raise ValueError(f"{opts.model}: no tokenizer files (tokenizer.json or tokenizer.model)")
    _report("Loading datasets")
    required = ("train",) if opts.train else ()
    data = load_dataset(str(data_dir), tokenizer, required=required + (("test",) if opts.test else ()))
    if opts.train and data["valid"] is None:
        # As mlx_lm.lora: no validation set is not an error.
        print(f"warning: {data_dir / 'valid.jsonl'} not found; training without validation", file=sys.stderr)
    C = model.canvas_length
    limit = min(opts.max_seq_length, model.args.max_position_embeddings)
    flag = "--max-seq-length" if limit == opts.max_seq_length else "the model's max_position_embeddings"
    for split in data.values():
        if split:
            check_lengths(split, C, limit, flag)
    objective = ObjectiveArgs(
        canvas_length=C,
        vocab_size=model.args.vocab_size,
        eos_ids=eos_token_ids(model.generation_config, model.args),
        pad_id=pad_token_id(model.generation_config, model.args),
        mask_prompt=opts.mask_prompt,
    )

    if opts.train:
        for split in ("train", "valid"):
            if data[split] is not None and len(data[split]) < opts.batch_size:
                raise ValueError(
                    f"--batch-size {opts.batch_size}: {data_dir / (split + '.jsonl')} has only "
                    f"{len(data[split])} examples"
                )
        opts.lora_parameters = adapters.prepare(
            model, opts.fine_tune_type, opts.num_layers, opts.lora_parameters, opts.train_router
        )
        # What adapter_config.json records: the layers really adapted.
        num_layers = -1 if opts.num_layers == -1 else adapters.layer_count(model, opts.num_layers)
        if opts.resume_adapter_file:
            resume = Path(opts.resume_adapter_file).expanduser()
            try:
                weights = mx.load(str(resume))
            except Exception as e:
                raise ValueError(f"--resume-adapter-file {resume}: cannot read ({str(e).splitlines()[0]})") from None
            routers = adapters.router_layers(model, opts.num_layers) if opts.train_router else ()
            adapters.check_adapter_weights(
                model,
                weights,
                resume,
                full=opts.fine_tune_type == "full",
                routers=routers,
                router_hint="a router's weight: resume with --train-router",
            )
            model.load_weights(list(weights.items()), strict=False)
            _report(f"Loading fine-tuned weights from {resume}")
        total = sum(v.size for _, v in tree_flatten(model.parameters()))
        trainable = sum(v.size for v in adapters.trainable_weights(model).values())
        _report(f"Trainable parameters: {100 * trainable / total:.3f}% ({trainable / 1e6:.3f}M/{total / 1e6:.3f}M)")
        args = TrainingArgs(
            batch_size=opts.batch_size,
            iters=opts.iters,
            val_batches=opts.val_batches,
            steps_per_report=opts.steps_per_report,
            steps_per_eval=opts.steps_per_eval,
            steps_per_save=opts.save_every,
            adapter_file=progress.adapter_file,
            adapter_config=dict(vars(opts), num_layers=num_layers, canvas_length=C),
            grad_checkpoint=opts.grad_checkpoint,
            ar_weight=opts.ar_weight,
            seed=opts.seed,
        )
        _report("Training")
        progress.training = True
        tic = time.perf_counter()

        def saved(it):
            progress.saved = it

        train(model, build_optimizer(opts), data["train"], data["valid"], objective, args, _report, saved)
        progress.trained = True
        _report(f"Trained in {time.perf_counter() - tic:.1f}s")
    elif opts.test and (adapter_path / adapters.CONFIG_FILE).exists():
        adapters.load_adapters(model, adapter_path)

    if opts.test:
        _report("Testing")
        model.eval()
        test_loss = evaluate(
            model, data["test"], opts.batch_size, opts.test_batches, objective, opts.ar_weight, opts.seed
        )
        _report(f"Test loss {test_loss:.3f}, Test ppl {math.exp(min(test_loss, 700)):.3f}.")
    return 0
