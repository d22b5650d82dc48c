"""python -m mlx_diffgemma.chat: a conversation in the terminal, kept encoded between turns."""

import argparse
import re
import sys
from typing import Optional

from .. import cli, distributed
from ..chat import stream_chat
from ..image_prompts import prepare_images
from ..live import DIM
from ..prompts import SEED_LIMIT
from ..stats import Progress, print_stats
from ..thinking import ThoughtFormatter, split_thinking

DEFAULT_MAX_TOKENS = 1024
PROMPT = ">> "
COMMANDS = """Commands:
  /image PATH_OR_URL  attach an image to your next message (models with a vision tower)
  /think    turn thinking on or off
  /reset    start a new conversation (also: r)
  /quit     leave (also: q, /exit, Ctrl-D)
  /help     this help (also: h)
A line starting with // is sent as text, with one / removed."""
# What reads as a command: a slash and a word, the rest of the line after a space.
# A path such as /usr/bin/env has a second slash and goes to the model.
COMMAND = re.compile(r"/[A-Za-z][\w-]*(?=\s|$)")


def setup_arg_parser():
    parser = cli.ArgumentParser(
        prog=cli.prog("chat", "mlx_diffgemma.chat"),
        description="Chat with DiffusionGemma in the terminal. The conversation stays\n"
        "encoded between turns, so each turn encodes only its new message.",
        epilog=COMMANDS,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    cli.add_model_arguments(parser)
    parser.add_argument("--system-prompt", metavar="TEXT", help="System prompt for the conversation.")
    cli.add_image_argument(parser, "Image attached to the first message: a path or an http(s) URL (repeatable).")
    cli.add_max_tokens_argument(parser, DEFAULT_MAX_TOKENS, "Most tokens per answer")
    cli.add_seed_argument(parser, "PRNG seed of the first turn, +1 per turn, 0 to 2**64-1 (default: random).")
    parser.add_argument(
        "--enable-thinking",
        action="store_true",
        help="Start with thinking on (toggle with /think).",
    )
    cli.add_chat_template_argument(parser)
    cli.add_sampler_arguments(parser)
    cli.add_output_arguments(parser)
    cli.add_distributed_argument(parser)
    return parser


def main():
    args = setup_arg_parser().parse_args()
    cli.run(lambda: run_chat(args))


def _read_line(stdin, interactive: bool) -> Optional[str]:
    """The user's next line (bytes that are not UTF-8 replaced), or None at the end of input."""
    if interactive:
        try:
            return cli.valid_text(input(PROMPT))
        except EOFError:
            print()
            return None
    line = stdin.readline()
    if not line:
        return None
    line = cli.valid_text(line.rstrip("\n"))
    # Piped input is not echoed: show it, so the output reads as a transcript.
    print(PROMPT + line, flush=True)
    return line


def _attach(model, source: str):
    """The image at ``source``, read now: a bad path is reported when given, not a turn later."""
    return prepare_images(model, [source])[0]


def run_chat(args):
    stdin = cli.stdin()
    interactive = stdin.isatty()
    styled = sys.stdout.isatty()
    if interactive and styled:
        try:
            import readline  # noqa: F401 (line editing and history for input())
        except ImportError:
            pass

    model, tokenizer = cli.load_for_generation(args.model, args.adapter_path, args.pipeline)
    params = cli.resolve_sampler(args, model)  # bad settings fail before the first prompt
    view = cli.make_view(args)
    thought_style = DIM  # a plain view on a pipe drops styles itself
    template_kwargs = dict(args.chat_template_config or {})
    thinking = template_kwargs.pop("enable_thinking", args.enable_thinking)

    def new_conversation():
        system = []
        if args.system_prompt is not None:
            system.append({"role": "system", "content": cli.valid_text(args.system_prompt)})
        return system, None

    messages, chat_cache = new_conversation()
    # Images for the next message, read (and checked) when attached.
    attached = [_attach(model, source) for source in args.image]
    if interactive:
        print(f"Chat with {args.model}. Type /help for commands, /quit to leave.")
    turn = 0
    while True:
        # Process 0 reads the terminal; under mlx.launch the others take its line.
        query = distributed.broadcast_text(_read_line(stdin, interactive) if distributed.is_primary() else None)
        if query is None or query.strip() in ("q", "/quit", "/exit"):
            return 0
        command = query.strip()
        if not command:
            continue
        if command in ("r", "/reset"):
            messages, chat_cache = new_conversation()
            attached = []
            print("[new conversation]")
            continue
        if command == "/image" or command.startswith("/image "):
            source = command[len("/image") :].strip()
            if not source:
                print("[/image needs a path or an http(s) URL]")
                continue
            try:
                attached.append(_attach(model, source))
            except ValueError as e:  # unreadable, not an image, a text-only model
                print(f"[image not attached: {e}]")
                continue
            image = attached[-1]
            print(f"[image attached to your next message: {source} ({image.soft_tokens} tokens)]")
            continue
        if command in ("h", "/help"):
            print(COMMANDS)
            continue
        if command == "/think":
            thinking = not thinking
            # The template renders the whole conversation differently (a system
            # turn asks for thoughts), so the next turn encodes it afresh.
            encoded = chat_cache is not None
            chat_cache = None
            again = " the next turn encodes the conversation again (the template renders it anew)"
            print(f"[thinking {'on' if thinking else 'off'}]" + (again if encoded else ""))
            continue
        if COMMAND.match(command):
            word = command.split()[0]
            print(f"[unknown command {word}: /help lists them; start the line with // to send it as text]")
            continue
        if command.startswith("//"):
            query = query.replace("/", "", 1)

        content = query
        if attached:
            content = [{"type": "image", "image": image} for image in attached] + [{"type": "text", "text": query}]
        messages.append({"role": "user", "content": content})
        seed = None if args.seed is None else (args.seed + turn) % SEED_LIMIT
        turn += 1
        cached = chat_cache.cache.offset if chat_cache else 0
        formatter = ThoughtFormatter()
        progress = Progress()
        text, last = "", None
        try:
            with view:
                for last in stream_chat(
                    model,
                    tokenizer,
                    messages,
                    chat_cache=chat_cache,
                    enable_thinking=thinking,
                    chat_template_kwargs=template_kwargs,
                    max_tokens=args.max_tokens,
                    seed=seed,
                    params=params,
                ):
                    progress.update(last)
                    if last.token_ids or last.finish_reason:
                        text += last.text
                        for kind, piece in formatter.feed(last.text):
                            view.write(piece, thought_style if kind == "thought" else None)
                    elif view.wants_draft():
                        view.draft(formatter.preview(last.draft), progress.status(last))
                for kind, piece in formatter.finish():  # a tail held back as a possible marker
                    view.write(piece, thought_style if kind == "thought" else None)
        except (KeyboardInterrupt, ValueError) as e:
            # The cache may hold part of this turn: forget it, and the message
            # (its images stay attached for the next try).
            messages.pop()
            chat_cache = None
            if isinstance(e, ValueError):  # e.g. a conversation longer than the context
                print(f"error: {e}", file=sys.stderr)
            print("[turn dropped; the next one encodes the conversation again]", flush=True)
            continue

        attached = []
        # The conversation so far: what the cache held, if this turn continued it.
        conversation = last.prompt_tokens + (cached if last.chat_cache is chat_cache else 0)
        chat_cache = last.chat_cache
        messages.append({"role": "assistant", "content": split_thinking(text)[1]})
        if args.verbose:
            print_stats(last, progress, conversation_tokens=conversation)


if __name__ == "__main__":
    main()
