"""A tiny checkpoint trained (by our own trainer) to answer three conversations.

Random weights never converge, so they cannot show a thought channel, a tool
call or a canvas settling. ``build_trained_checkpoint(path)`` writes the tiny
reference checkpoint with the test tokenizer, then a full fine-tune
(``path/adapters``) that has memorised ``CONVERSATIONS``: one answer thinks and
calls a tool, one thinks and answers, one answers plainly. Served with
``--adapter-path``, the model writes them back (the server tests check it
against ``generate`` on the same prompt).
"""

import shutil
from pathlib import Path

import mlx.core as mx
import mlx.optimizers as optim
from reference import build_reference
from tokenizer_fixture import write_test_tokenizer

from mlx_diffgemma import load
from mlx_diffgemma.chat_template import render
from mlx_diffgemma.tuner import adapters
from mlx_diffgemma.tuner.datasets import Example
from mlx_diffgemma.tuner.objective import ObjectiveArgs
from mlx_diffgemma.tuner.trainer import TrainingArgs, train

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The weather in a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    }
]

# (messages, template arguments, the answer as the model writes it, its stop token)
CONVERSATIONS = [
    (
        [{"role": "user", "content": "What is the weather in Lisbon?"}],
        {"tools": TOOLS, "enable_thinking": True},
        "<|channel>thought\nThe user wants the weather.<channel|>"
        '<|tool_call>call:get_weather{city:<|"|>Lisbon<|"|>}<tool_call|>',
        "<|tool_response>",
    ),
    (
        [{"role": "user", "content": "Think about the fox."}],
        {"enable_thinking": True},
        "<|channel>thought\nThe fox is quick.<channel|>The quick brown fox jumps over the lazy dog.",
        "<turn|>",
    ),
    ([{"role": "user", "content": "hi"}], {}, "Hello! How can I help you today?", "<turn|>"),
]
ITERS = 250
RELEASED = Path(__file__).parent / "data" / "diffusiongemma-26B-A4B-it"


def build_trained_checkpoint(path: Path, iters: int = ITERS) -> Path:
    """Write the checkpoint and its adapters; returns the adapter directory."""
    path = Path(path)
    build_reference(path, seed=3)
    write_test_tokenizer(path)
    # The released generation settings: end of turn and tool response end answers too.
    shutil.copy(RELEASED / "generation_config.json", path / "generation_config.json")
    model, tokenizer = load(str(path))
    examples = []
    for messages, kwargs, answer, stop in CONVERSATIONS:
        prompt = render(tokenizer, messages, True, **kwargs)
        completion = list(tokenizer.encode(answer, add_special_tokens=False))
        completion.append(tokenizer.convert_tokens_to_ids(stop))
        examples.append(Example(prompt, completion, "memorised"))
    objective = ObjectiveArgs(
        canvas_length=model.canvas_length,
        vocab_size=model.args.vocab_size,
        eos_ids=model.generation_config["eos_token_id"],
        pad_id=model.args.pad_token_id,
    )
    adapter_dir = path / "adapters"
    adapter_dir.mkdir(exist_ok=True)
    adapters.prepare(model, "full", -1, train_router=True)
    mx.random.seed(0)
    args = TrainingArgs(
        batch_size=3,
        iters=iters,
        val_batches=0,
        steps_per_report=iters,
        steps_per_eval=iters + 1,
        steps_per_save=iters,
        adapter_file=adapter_dir / adapters.ADAPTER_FILE,
        seed=0,
    )
    schedule = optim.cosine_decay(3e-3, iters, 3e-4)
    train(model, optim.Adam(learning_rate=schedule), examples * 4, None, objective, args, report=lambda line: None)
    adapters.save_adapter_config(
        {"fine_tune_type": "full", "num_layers": -1, "train_router": True}, adapter_dir / adapters.CONFIG_FILE
    )
    return adapter_dir
