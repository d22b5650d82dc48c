"""Block-diffusion generation: canvases denoised one after another.

For each canvas: start from uniform noise, denoise it for up to
``max_denoising_steps`` steps (stopping early once it is stable and confident),
commit its argmax tokens, and encode them into the cache so the next canvas
sees them. The per-step math lives in ``sampler``; this module runs the loop.
"""

import argparse
import math
import secrets
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, Iterator, List, Optional, Sequence, Union

import mlx.core as mx

from . import sampler
from .cache import PromptCache
from .model import Model

PREFILL_STEP = 2048

Prompt = Union[str, Sequence[int]]


@dataclass
class SamplerParams:
    """The diffusion sampler's settings, named as in transformers.

    The defaults are the reference's, used where the checkpoint's
    generation_config.json leaves a value unset (transformers writes nulls).
    """

    max_denoising_steps: int = 48
    entropy_bound: float = 0.1
    t_min: float = 0.4
    t_max: float = 0.8
    stability_threshold: int = 1
    confidence_threshold: float = 0.005
    eos_token_id: List[int] = field(default_factory=lambda: [1])
    pad_token_id: int = 0

    @classmethod
    def resolve(cls, model: Model, **overrides) -> "SamplerParams":
        """Defaults from the checkpoint's generation config, then ``overrides``."""
        gen = dict(getattr(model, "generation_config", None) or {})
        sampler_config = gen.get("sampler_config") or {}
        values = asdict(cls())
        for name in values:
            source = sampler_config if name == "entropy_bound" else gen
            if source.get(name) is not None:
                values[name] = source[name]
        eos = values["eos_token_id"] if gen.get("eos_token_id") is not None else model.args.eos_token_id
        values["eos_token_id"] = list(eos) if isinstance(eos, (list, tuple)) else [eos]
        if gen.get("pad_token_id") is None:
            values["pad_token_id"] = model.args.pad_token_id
        for name, value in overrides.items():
            if name not in values:
                raise TypeError(f"unknown generation parameter {name!r}")
            if value is not None:
                values[name] = value
        params = cls(**values)
        params.validate()
        return params

    def validate(self):
        if not isinstance(self.max_denoising_steps, int) or self.max_denoising_steps < 1:
            raise ValueError(
                f"max_denoising_steps must be a positive integer (got {self.max_denoising_steps})"
            )
        if self.t_min < 0:
            raise ValueError(f"t_min must be >= 0 (got {self.t_min})")
        if self.t_max <= self.t_min:
            raise ValueError(f"t_max must be greater than t_min (got t_max={self.t_max}, t_min={self.t_min})")
        if self.entropy_bound <= 0:
            raise ValueError(f"entropy_bound must be > 0 (got {self.entropy_bound})")
        if not isinstance(self.stability_threshold, int) or self.stability_threshold < 0:
            raise ValueError(
                f"stability_threshold must be an integer >= 0 (got {self.stability_threshold})"
            )
        if self.confidence_threshold <= 0:
            raise ValueError(f"confidence_threshold must be > 0 (got {self.confidence_threshold})")

    def temperature(self, step: int) -> float:
        return sampler.temperature(step, self.max_denoising_steps, self.t_min, self.t_max)


@dataclass
class GenerationResponse:
    """One event of ``stream_generate``: a denoising step or a committed canvas.

    ``text`` and ``token_ids`` are what this event commits (empty during
    denoising); ``draft`` is the current argmax canvas as text, decoded only
    when read.
    """

    text: str
    token_ids: List[int]
    canvas_index: int
    step: int  # counts down from max_denoising_steps to 1 within a canvas
    max_denoising_steps: int
    prompt_tokens: int
    prompt_tps: float
    generation_tokens: int
    generation_tps: float
    denoising_steps: int
    tokens_per_forward: float
    peak_memory: float
    finish_reason: Optional[str]
    stop_token: Optional[int] = None  # the EOS id that ended the row, if any
    row: int = 0
    draft_ids: List[int] = field(default_factory=list, repr=False)
    _tokenizer: Any = field(default=None, repr=False)

    @property
    def draft(self) -> str:
        if self._tokenizer is None or not self.draft_ids:
            return ""
        return self._tokenizer.decode(self.draft_ids)


def _as_batch(tokenizer, prompt, vocab_size: int) -> List[List[int]]:
    """A prompt (text or ids) or a list of prompts -> list of id lists."""

    def ids(p):
        if isinstance(p, str):
            if tokenizer is None:
                raise ValueError("prompt is text but the model has no tokenizer; pass token ids")
            return list(tokenizer.encode(p, add_special_tokens=False))
        if isinstance(p, mx.array):
            return [int(t) for t in p.reshape(-1).tolist()]
        return [int(t) for t in p]

    if isinstance(prompt, mx.array):
        rows = [prompt.tolist()] if prompt.ndim == 1 else prompt.tolist()
    elif isinstance(prompt, str) or (
        isinstance(prompt, (list, tuple)) and all(isinstance(t, int) for t in prompt)
    ):
        rows = [prompt]
    else:
        rows = list(prompt)
    batch = [ids(p) for p in rows]
    if not batch or any(len(p) == 0 for p in batch):
        raise ValueError("prompt is empty")
    bad = [t for p in batch for t in p if not 0 <= t < vocab_size]
    if bad:
        raise ValueError(f"prompt holds token id {bad[0]} outside the vocabulary [0, {vocab_size})")
    return batch


def _initial_canvases(initial_canvas, batch: int, canvas_length: int, vocab: int):
    if initial_canvas is None:
        return None
    canvas = mx.array(initial_canvas).astype(sampler.TOKEN_DTYPE)
    if canvas.ndim == 1:
        canvas = mx.broadcast_to(canvas[None], (batch, canvas.shape[0]))
    if canvas.shape != (batch, canvas_length):
        raise ValueError(
            f"initial_canvas must have shape [{canvas_length}] or [{batch}, {canvas_length}] "
            f"(got {list(canvas.shape)})"
        )
    if mx.any((canvas < 0) | (canvas >= vocab)).item():
        raise ValueError(f"initial_canvas holds ids outside [0, {vocab})")
    return canvas


def encode_prompt(model: Model, batch: List[List[int]], cache: PromptCache) -> int:
    """Left-pad the rows to one length and encode them; returns the padded length."""
    length = max(len(p) for p in batch)
    pad = model.args.pad_token_id
    padding = [length - len(p) for p in batch]
    ids = mx.array([[pad] * n + p for n, p in zip(padding, batch)])
    left_padding = padding if any(padding) else None
    if left_padding is not None and cache.offset:
        raise ValueError("a cached prompt can only be continued by rows of equal length")
    for start in range(0, length, PREFILL_STEP):
        model.encode(ids[:, start : start + PREFILL_STEP], cache, left_padding=left_padding)
        left_padding = None
        mx.eval([c.state for c in cache])
    return length


def stream_generate(
    model: Model,
    tokenizer,
    prompt: Union[Prompt, Sequence[Prompt]],
    max_tokens: int = 256,
    seed: Optional[int] = None,
    initial_canvas=None,
    prompt_cache: Optional[PromptCache] = None,
    **params,
) -> Iterator[GenerationResponse]:
    """Generate text canvas by canvas, yielding a response per denoising step.

    ``prompt`` is a string, a list of token ids, or a list of those (a batch:
    rows are left-padded and finish independently; each response carries its
    ``row``). A string is used as given: apply a chat template first for
    chat models. ``params`` are the sampler settings (``max_denoising_steps``,
    ``t_min``, ``t_max``, ``entropy_bound``, ``stability_threshold``,
    ``confidence_threshold``), defaulting to the checkpoint's generation config.
    ``prompt_cache`` (from ``model.make_cache()``) keeps the encoded
    conversation across calls.
    """
    sp = SamplerParams.resolve(model, **params)
    if not isinstance(max_tokens, int) or max_tokens < 1:
        raise ValueError(f"max_tokens must be a positive integer (got {max_tokens})")
    batch = _as_batch(tokenizer, prompt, model.args.vocab_size)
    B, C, V = len(batch), model.canvas_length, model.args.vocab_size
    cache = prompt_cache if prompt_cache is not None else model.make_cache()
    context = cache.offset + max(len(p) for p in batch)
    if context + C > model.args.max_position_embeddings:
        raise ValueError(
            f"prompt is too long: {context} tokens plus a {C}-token canvas exceed the "
            f"model's context of {model.args.max_position_embeddings}"
        )
    first_canvas = _initial_canvases(initial_canvas, B, C, V)
    rng = RowKeys(_row_seeds(seed, B))

    tic = time.perf_counter()
    prompt_tokens = encode_prompt(model, batch, cache)
    prompt_time = time.perf_counter() - tic
    prompt_tps = B * prompt_tokens / max(prompt_time, 1e-9)

    # mlx-lm's wrapper hands out a fresh detokenizer each time: one per row.
    detokenizers = None if tokenizer is None else [tokenizer.detokenizer for _ in range(B)]
    finished_rows = [False] * B
    committed = [0] * B  # tokens returned per row (EOS excluded)
    valid = [0] * B  # non-pad tokens per row, EOS included: the reference's tokens/forward
    forward_passes = [0] * B
    total_steps = 0
    tic = time.perf_counter()

    def response(row, text, ids, canvas_index, step, finish_reason=None, draft_ids=(), stop_token=None):
        elapsed = max(time.perf_counter() - tic, 1e-9)
        return GenerationResponse(
            text=text,
            token_ids=ids,
            canvas_index=canvas_index,
            step=step,
            max_denoising_steps=sp.max_denoising_steps,
            prompt_tokens=prompt_tokens,
            prompt_tps=prompt_tps,
            generation_tokens=committed[row],
            generation_tps=sum(committed) / elapsed,
            denoising_steps=total_steps,
            tokens_per_forward=valid[row] / max(forward_passes[row], 1),
            peak_memory=mx.get_peak_memory() / 1e9,
            finish_reason=finish_reason,
            stop_token=stop_token,
            row=row,
            draft_ids=list(draft_ids),
            _tokenizer=tokenizer,
        )

    probs_signal = model.dtype == mx.float32
    n_canvases = math.ceil(max_tokens / C)
    for canvas_index in range(n_canvases):
        canvas_keys = rng.next()
        if canvas_index == 0 and first_canvas is not None:
            canvas = first_canvas
        else:
            canvas = noise_canvas(canvas_keys, C, V)
        argmax_canvas = canvas
        signal = None  # the previous step's self-conditioning input
        history = sampler.empty_argmax_history(sp.stability_threshold, B, C)
        stopped = mx.zeros((B,), dtype=mx.bool_)
        any_stopped = False  # read back each step, so holding costs nothing until needed
        # Rows that finished on an earlier canvas still ride along in the batch,
        # but their passes do not count (as in the reference).
        resting = list(finished_rows)

        for step in range(sp.max_denoising_steps, 0, -1):
            for r in range(B):
                forward_passes[r] += not resting[r]
            total_steps += 1
            logits = model.denoise(canvas, cache, **_self_conditioning(signal, probs_signal))
            processed = logits / sp.temperature(step)
            update = _denoise_rows(processed, sp.entropy_bound, rng.next())
            new_argmax, new_canvas = update.argmax_canvas, update.next_canvas
            # The next step conditions on the processed logits, cast to the
            # model's dtype as the reference does; for float32 models that is
            # the softmax the sampler already took.
            new_signal = update.probs if probs_signal else processed.astype(model.dtype)
            if any_stopped:
                # Rows that already stopped keep their canvas, as the reference
                # does. (A single row that stopped has left the loop.)
                new_argmax = sampler.hold_finished_rows(stopped, argmax_canvas, new_argmax)
                new_canvas = sampler.hold_finished_rows(stopped, canvas, new_canvas)
                new_signal = sampler.hold_finished_rows(stopped, signal, new_signal)
            stop, history = sampler.stable_and_confident(
                new_argmax, history, update.entropy, sp.confidence_threshold
            )
            stopped = stopped | stop
            argmax_canvas, canvas, signal = new_argmax, new_canvas, new_signal
            mx.eval(argmax_canvas, canvas, signal, stopped, history)

            stopped_rows = stopped.tolist()
            any_stopped = any(stopped_rows)
            resting = [a or b for a, b in zip(resting, stopped_rows)]
            drafts = argmax_canvas.tolist()
            for r in range(B):
                if not finished_rows[r]:
                    draft, _ = sampler.split_at_eos(drafts[r], sp.eos_token_id)
                    yield response(r, "", [], canvas_index, step, draft_ids=draft)
            if all(resting):
                break

        # The last step's drafts are the argmax canvas being committed.
        rows = drafts
        last_canvas = canvas_index == n_canvases - 1
        for r in range(B):
            if finished_rows[r]:
                continue
            ids, stop_token = sampler.split_at_eos(rows[r], sp.eos_token_id)
            valid[r] += len(ids) + (stop_token is not None)
            budget = max_tokens - committed[r]
            if len(ids) >= budget:
                ids, stop_token = ids[:budget], None
            committed[r] += len(ids)
            if stop_token is not None:
                finish = "stop"
            elif committed[r] >= max_tokens or last_canvas:
                finish = "length"
            else:
                finish = None
            text = ""
            if detokenizers:
                for t in ids:
                    detokenizers[r].add_token(t)
                if finish:
                    detokenizers[r].finalize()
                text = detokenizers[r].last_segment
            finished_rows[r] = finish is not None
            yield response(r, text, ids, canvas_index, step, finish, stop_token=stop_token)
        if all(finished_rows):
            break
        # The committed canvas becomes context for the next one.
        model.encode(argmax_canvas, cache)


def _row_seeds(seed, batch: int) -> List[int]:
    """Row r draws from its own seed (seed + r), so a row gives in a batch what it gives alone."""
    if seed is None:
        seed = secrets.randbits(62)
    if isinstance(seed, int):
        return [seed + r for r in range(batch)]
    seeds = [int(s) for s in seed]
    if len(seeds) != batch:
        raise ValueError(f"seed lists {len(seeds)} seeds for {batch} prompts")
    return seeds


class RowKeys:
    """One PRNG key chain per batch row, all on device."""

    def __init__(self, seeds: List[int]):
        self.keys = [mx.random.key(s) for s in seeds]

    def next(self) -> List[mx.array]:
        pairs = [mx.random.split(k) for k in self.keys]
        self.keys = [p[0] for p in pairs]
        return [p[1] for p in pairs]


def noise_canvas(keys: List[mx.array], canvas_length: int, vocab_size: int) -> mx.array:
    """A fresh canvas of uniform noise, each row from its own key."""
    return mx.concatenate([sampler.initial_canvas(k, 1, canvas_length, vocab_size) for k in keys])


def _self_conditioning(signal, is_probs: bool) -> dict:
    if signal is None:
        return {}
    return {"self_conditioning_probs" if is_probs else "self_conditioning": signal}


def _denoise_rows(processed: mx.array, entropy_bound: float, keys: List[mx.array]):
    if len(keys) == 1:
        return sampler.denoise_step_update(processed, entropy_bound, keys[0])
    rows = [
        sampler.denoise_step_update(processed[r : r + 1], entropy_bound, k)
        for r, k in enumerate(keys)
    ]
    return sampler.DenoiseStep(*(mx.concatenate(parts) for parts in zip(*rows)))


def generate(
    model: Model,
    tokenizer,
    prompt: Union[Prompt, Sequence[Prompt]],
    max_tokens: int = 256,
    verbose: bool = False,
    **params,
) -> Union[str, List[str]]:
    """Generate a completion for ``prompt`` (or a list for a batch of prompts)."""
    from .cli import Progress, print_stats

    is_batch = _is_batch(prompt)
    texts: Dict[int, str] = {}
    last = None
    progress = Progress()
    for last in stream_generate(model, tokenizer, prompt, max_tokens, **params):
        progress.update(last)
        if last.text or last.row not in texts:
            texts[last.row] = texts.get(last.row, "") + last.text
        if verbose and not is_batch and last.text:
            print(last.text, end="", flush=True)
    if verbose and last is not None:
        print()
        print_stats(last, progress)
    if is_batch:
        return [texts.get(i, "") for i in range(len(texts))]
    return texts.get(0, "")


def _is_batch(prompt) -> bool:
    if isinstance(prompt, str):
        return False
    if isinstance(prompt, mx.array):
        return prompt.ndim == 2
    return not all(isinstance(t, int) for t in prompt)


# -- Command line: python -m mlx_diffgemma.generate ---------------------------

DEFAULT_PROMPT = "hello"
DEFAULT_MAX_TOKENS = 256
GENERATE_DESCRIPTION = """\
Generate text with DiffusionGemma. The model writes a canvas of 256 tokens at a
time: it denoises the whole canvas over a few steps, commits it, then starts
the next. On a terminal the canvas being denoised is shown as it changes."""
GENERATE_EXAMPLES = """\
examples:
  mlx_diffgemma.generate --prompt "Write a haiku about the sea."
  cat notes.txt | mlx_diffgemma.generate --prompt - --max-tokens 1024
  mlx_diffgemma.generate --model diffusiongemma-26B-A4B-it-4bit --verbose

The default model is downloaded on first use (51.6 GB in bf16). If it does not
fit in this machine's memory, convert a 4-bit copy first:
  python -m mlx_diffgemma.convert --q-bits 4"""


def setup_arg_parser():
    from . import cli

    parser = cli.ArgumentParser(
        prog="mlx_diffgemma.generate",
        description=GENERATE_DESCRIPTION,
        epilog=GENERATE_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    cli.add_model_arguments(parser)
    parser.add_argument(
        "--prompt", "-p", default=DEFAULT_PROMPT, metavar="TEXT", help="Message to the model ('-' reads stdin)."
    )
    parser.add_argument("--system-prompt", metavar="TEXT", help="System prompt for the chat template.")
    parser.add_argument(
        "--max-tokens",
        "-m",
        type=cli.positive_int,
        default=DEFAULT_MAX_TOKENS,
        metavar="N",
        help=f"Most tokens to generate (default: {DEFAULT_MAX_TOKENS}).",
    )
    parser.add_argument("--seed", type=int, metavar="N", help="PRNG seed (default: a random one).")
    parser.add_argument(
        "--ignore-chat-template",
        action="store_true",
        help="Use the raw prompt without the model's chat template.",
    )
    cli.add_chat_template_argument(parser)
    parser.add_argument(
        "--enable-thinking",
        action="store_true",
        help="Let the model think before answering (its thought comes first in the output).",
    )
    cli.add_sampler_arguments(parser)
    cli.add_output_arguments(parser)
    return parser


def main():
    from . import cli

    args = setup_arg_parser().parse_args()
    cli.run(lambda: run_generate(args))


def run_generate(args):
    from . import cli

    prompt = args.prompt.replace("\\n", "\n").replace("\\t", "\t")
    if prompt == "-":
        prompt = sys.stdin.read()
    model, tokenizer = cli.load(args.model)
    if not args.ignore_chat_template and tokenizer.has_chat_template:
        messages = [{"role": "user", "content": prompt}]
        if args.system_prompt is not None:
            messages.insert(0, {"role": "system", "content": args.system_prompt})
        template_kwargs = dict(enable_thinking=args.enable_thinking)
        template_kwargs.update(args.chat_template_config or {})
        prompt = tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=False, **template_kwargs
        )

    params = cli.sampler_params(args)
    SamplerParams.resolve(model, **params)  # bad settings fail before the view opens
    progress = cli.Progress()
    view = cli.make_view(args)
    last = None
    with view:
        for last in stream_generate(
            model, tokenizer, prompt, args.max_tokens, seed=args.seed, **params
        ):
            progress.update(last)
            if last.token_ids or last.finish_reason:
                view.write(last.text)
            elif view.wants_draft():
                view.draft(last.draft, progress.status(last))
    if args.verbose:
        cli.print_stats(last, progress)


if __name__ == "__main__":
    main()
