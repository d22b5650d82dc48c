"""python -m mlx_diffgemma.generate: one prompt in, the model's answer out."""

import argparse

from .. import cli, distributed
from ..chat_template import plain_ids, render
from ..generate import stream_generate
from ..image_prompts import prepare_images
from ..infill import end_of_turn, stream_infill
from ..stats import Progress, print_stats

DEFAULT_PROMPT = "hello"
DEFAULT_MAX_TOKENS = 256
GENERATE_DESCRIPTION = """\
Generate text with DiffusionGemma. The model writes a canvas of tokens at a
time (the checkpoint's canvas_length, 256 for the released model): it denoises
the whole canvas over a few steps, commits it, then starts the next. On a
terminal the canvas being denoised is shown as it changes."""
GENERATE_EXAMPLES = """\
examples:
  mlx_diffgemma.generate --prompt "Write a haiku about the sea."
  cat notes.txt | mlx_diffgemma.generate --prompt - --max-tokens 1024
  mlx_diffgemma.generate --model diffusiongemma-26B-A4B-it-4bit --verbose
  mlx_diffgemma.generate --image plot.png --prompt "What does this plot show?"
  mlx_diffgemma.generate --ignore-chat-template --prompt "def area(r):\n" \
      --suffix "\n    return a\n"    # infill: the text between prompt and suffix

The default model is downloaded on first use (51.6 GB in bf16). If it does not
fit in this machine's memory, convert a 4-bit copy first:
  python -m mlx_diffgemma.convert --q-bits 4"""


def setup_arg_parser():
    parser = cli.ArgumentParser(
        prog=cli.prog("generate", "mlx_diffgemma.generate"),
        description=GENERATE_DESCRIPTION,
        epilog=GENERATE_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    cli.add_model_arguments(parser)
    parser.add_argument(
        "--prompt", "-p", default=DEFAULT_PROMPT, metavar="TEXT", help="Message to the model ('-' reads stdin)."
    )
    parser.add_argument("--system-prompt", metavar="TEXT", help="System prompt for the chat template.")
    cli.add_image_argument(parser, "Image for the prompt: a path or an http(s) URL (repeatable, in order).")
    cli.add_max_tokens_argument(parser, DEFAULT_MAX_TOKENS, "Most tokens to generate")
    cli.add_seed_argument(parser, "PRNG seed, 0 to 2**64-1 (default: a random one).")
    parser.add_argument(
        "--ignore-chat-template",
        action="store_true",
        help="Use the raw prompt without the model's chat template.",
    )
    cli.add_chat_template_argument(parser)
    parser.add_argument(
        "--suffix",
        metavar="TEXT",
        help="Infill: write the text that goes between the prompt and this text ('-' reads stdin). "
        "With the chat template, the answer is to end with it.",
    )
    parser.add_argument(
        "--infill-length",
        type=cli.positive_int,
        metavar="N",
        help="Infill: the gap's length in tokens (default: chosen automatically, up to a canvas).",
    )
    parser.add_argument(
        "--enable-thinking",
        action="store_true",
        help="Let the model think before answering (its thought comes first in the output).",
    )
    cli.add_sampler_arguments(parser)
    cli.add_output_arguments(parser)
    cli.add_distributed_argument(parser)
    return parser


def main():
    args = setup_arg_parser().parse_args()
    cli.run(lambda: run_generate(args))


def command_text(text: str) -> str:
    """A text flag's value: \\n and \\t as mlx_lm.generate reads them, '-' from stdin."""
    text = text.replace("\\n", "\n").replace("\\t", "\t")
    if text == "-":
        if distributed.init().size() > 1:
            # mlx.launch forwards the terminal's input but never closes it: a read to the end never ends.
            raise ValueError("'-' (read stdin to its end) does not work under mlx.launch: pass the text itself")
        text = cli.stdin().read()
    return cli.valid_text(text)


def run_generate(args):
    if args.prompt == "-" and args.suffix == "-":
        raise ValueError("--prompt and --suffix cannot both read stdin")
    if args.infill_length is not None and args.suffix is None:
        raise ValueError("--infill-length needs --suffix")
    if args.image and args.suffix is not None:
        raise ValueError("--image cannot be used with --suffix (infill reads text only)")
    prompt = command_text(args.prompt)
    suffix = None if args.suffix is None else command_text(args.suffix)
    model, tokenizer = cli.load_for_generation(args.model, args.adapter_path, args.pipeline)
    # Read before the prompt is rendered: a bad image is reported before any work.
    images = prepare_images(model, args.image) if args.image else None
    chat = not args.ignore_chat_template and tokenizer.has_chat_template
    if chat:
        content = prompt
        if images:
            # The images first, then the text, as one message's parts.
            content = [{"type": "image"} for _ in images] + [{"type": "text", "text": prompt}]
        messages = [{"role": "user", "content": content}]
        if args.system_prompt is not None:
            messages.insert(0, {"role": "system", "content": args.system_prompt})
        template_kwargs = dict(enable_thinking=args.enable_thinking)
        template_kwargs.update(args.chat_template_config or {})
        # As chat and the server do: the prompt's text never becomes control tokens.
        prompt = render(tokenizer, messages, True, **template_kwargs)

    params = cli.resolve_sampler(args, model)
    if suffix is not None:
        # With the template the suffix is the end of the answer: plain text, then the turn's end.
        suffix = plain_ids(tokenizer, suffix) + end_of_turn(tokenizer) if chat else suffix
        return run_infill(args, model, tokenizer, prompt, suffix, params)
    progress = Progress()
    view = cli.make_view(args)
    last = None
    with view:
        for last in stream_generate(
            model, tokenizer, prompt, args.max_tokens, seed=args.seed, params=params, images=images
        ):
            progress.update(last)
            if last.token_ids or last.finish_reason:
                view.write(last.text)
            elif view.wants_draft():
                view.draft(last.draft, progress.status(last))
    if args.verbose:
        print_stats(last, progress)


def run_infill(args, model, tokenizer, prefix, suffix, params):
    """--suffix: the middle, with the live canvas showing the gap beside the fixed suffix."""
    view = cli.make_view(args)
    last = None
    with view:
        for last in stream_infill(
            model, tokenizer, prefix, suffix, args.infill_length, args.seed, args.max_tokens, params=params
        ):
            if last.finished:
                view.write(last.text)
            elif view.wants_draft():
                status = f"canvas {last.window + 1}, step {last.step}"
                if args.infill_length is None and last.leading_length() is not None:
                    status += f", leading length {last.leading_length()}"
                view.draft_parts(last.draft_parts(), status)
    if args.verbose:
        print("=" * 10)
        print(f"Prompt: {last.prompt_tokens} tokens, {last.prompt_tps:.3f} tokens-per-sec")
        print(f"Infill: {last.length} tokens" + (" (chosen automatically)" if args.infill_length is None else ""))
        print(f"Denoising steps: {last.denoising_steps}")
        print(f"Peak memory: {last.peak_memory:.3f} GB", flush=True)


if __name__ == "__main__":
    main()
