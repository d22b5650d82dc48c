"""The training loop: batches, steps, reports, validation and saves.

Reports use mlx-lm's wording, one line each, so logs read the same:
``Iter 10: Train loss 2.345, Learning Rate 1.000e-04, It/sec 1.234,
Tokens/sec 567.890, Trained Tokens 12345, Peak mem 0.123 GB`` and
``Iter 1: Val loss 2.345, Val took 1.234s``. The step is not compiled: the
batch's length changes with the blocks chosen, and MLX would retrace anyway.
"""

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, List, Optional

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .adapters import save_adapters
from .datasets import Example
from .objective import Batch, ObjectiveArgs, example_length, loss, make_batch


@dataclass
class TrainingArgs:
    batch_size: int = 4
    iters: int = 1000
    val_batches: int = 25
    steps_per_report: int = 10
    steps_per_eval: int = 200
    steps_per_save: int = 100
    adapter_file: Optional[Path] = None
    # Written beside adapter_file with every save of it (adapter_config.json),
    # so the two on disk always come from the same run.
    adapter_config: Optional[dict] = None
    grad_checkpoint: bool = False
    ar_weight: float = 1.0
    seed: int = 0


def _batch_indices(examples: List[Example], batch_size: int, canvas_length: int) -> List[List[int]]:
    # As mlx-lm: sort by length so a batch's rows pad little, then batch.
    order = sorted(range(len(examples)), key=lambda i: example_length(examples[i], canvas_length))
    return [order[i : i + batch_size] for i in range(0, len(order) - batch_size + 1, batch_size)]


def iterate_batches(
    examples: List[Example],
    batch_size: int,
    objective: ObjectiveArgs,
    rng: np.random.Generator,
    loop: bool = False,
) -> Iterator[Batch]:
    """Batches in a random order, each with its own noise; forever if ``loop``."""
    if len(examples) < batch_size:
        raise ValueError(f"--batch-size {batch_size}: the data has only {len(examples)} examples")
    batches = _batch_indices(examples, batch_size, objective.canvas_length)
    while True:
        for i in rng.permutation(len(batches)):
            yield make_batch([examples[j] for j in batches[i]], objective, rng)
        if not loop:
            return


def evaluate(
    model,
    examples: List[Example],
    batch_size: int,
    num_batches: int,
    objective: ObjectiveArgs,
    ar_weight: float = 1.0,
    seed: int = 0,
) -> float:
    """Mean loss per token over ``num_batches`` batches (-1: all).

    The noise comes from ``seed`` alone, so every evaluation of the same
    model sees the same corrupted blocks and the losses compare.
    """
    rng = np.random.default_rng(seed)
    total, tokens = 0.0, 0
    batches = iterate_batches(examples, batch_size, objective, rng)
    for n, batch in enumerate(batches):
        if num_batches != -1 and n >= num_batches:
            break
        value, ntokens = loss(model, batch, ar_weight)
        total += value.item() * ntokens
        tokens += ntokens
    return total / tokens


def checkpoint_feed_forward(model):
    """Recompute each layer's MLP and experts in the backward pass instead of
    keeping their activations (the attention, which writes the cache, is kept)."""
    for layer in model.layers:

        def inner(params, h, layer=layer):
            layer.update(params)
            return type(layer).feed_forward(layer, h)

        checkpointed = mx.checkpoint(inner)
        layer.feed_forward = lambda h, layer=layer, fn=checkpointed: fn(layer.trainable_parameters(), h)


def train(
    model,
    optimizer,
    train_set: List[Example],
    val_set: Optional[List[Example]],
    objective: ObjectiveArgs,
    args: TrainingArgs,
    report: Callable[[str], None] = print,
    on_save: Optional[Callable[[int], None]] = None,
) -> List[dict]:
    """Train in place; returns the reports as dicts (the training curve).

    ``on_save(iteration)`` is called once ``args.adapter_file`` holds that
    iteration's weights (the command line says so when interrupted)."""
    if args.grad_checkpoint:
        checkpoint_feed_forward(model)
    value_and_grad = nn.value_and_grad(model, loss)
    rng = np.random.default_rng(args.seed)
    history = []

    def validate(it):
        tic = time.perf_counter()
        val_loss = evaluate(model, val_set, args.batch_size, args.val_batches, objective, args.ar_weight, args.seed)
        took = time.perf_counter() - tic
        report(f"Iter {it}: Val loss {val_loss:.3f}, Val took {took:.3f}s")
        history.append({"iteration": it, "val_loss": val_loss, "val_time": took})

    def saved(it):
        if on_save:
            on_save(it)

    def save(it):
        save_adapters(model, args.adapter_file, args.adapter_config)
        saved(it)
        numbered = args.adapter_file.with_name(f"{it:07d}_{args.adapter_file.name}")
        save_adapters(model, numbered)
        report(f"Iter {it}: Saved adapter weights to {args.adapter_file} and {numbered}.")

    model.train()
    losses, tokens, steps, elapsed, trained = 0.0, 0, 0, 0.0, 0
    batches = iterate_batches(train_set, args.batch_size, objective, rng, loop=True)
    for it, batch in zip(range(1, args.iters + 1), batches):
        if val_set and (it == 1 or it % args.steps_per_eval == 0 or it == args.iters):
            validate(it)
        tic = time.perf_counter()
        (value, ntokens), grad = value_and_grad(model, batch, args.ar_weight)
        optimizer.update(model, grad)
        mx.eval(model.parameters(), optimizer.state, value)
        if not np.isfinite(value.item()):
            raise ValueError(f"iteration {it}: the loss is {value.item()}; lower --learning-rate")
        elapsed += time.perf_counter() - tic
        losses += value.item()
        tokens += ntokens
        steps += 1
        if it % args.steps_per_report == 0 or it == args.iters:
            trained += tokens
            record = {
                "iteration": it,
                "train_loss": losses / steps,
                "learning_rate": optimizer.learning_rate.item(),
                "iterations_per_second": steps / elapsed,
                "tokens_per_second": tokens / elapsed,
                "trained_tokens": trained,
                "peak_memory": mx.get_peak_memory() / 1e9,
            }
            history.append(record)
            report(
                f"Iter {it}: Train loss {record['train_loss']:.3f}, "
                f"Learning Rate {record['learning_rate']:.3e}, "
                f"It/sec {record['iterations_per_second']:.3f}, "
                f"Tokens/sec {record['tokens_per_second']:.3f}, "
                f"Trained Tokens {trained}, "
                f"Peak mem {record['peak_memory']:.3f} GB"
            )
            losses, tokens, steps, elapsed = 0.0, 0, 0, 0.0
        if args.adapter_file and it % args.steps_per_save == 0 and it != args.iters:
            save(it)
    if args.adapter_file:
        save_adapters(model, args.adapter_file, args.adapter_config)
        saved(args.iters)
        report(f"Saved final weights to {args.adapter_file}.")
    return history
