"""Multi-turn chat on a prompt cache that keeps the conversation encoded."""

import argparse
import sys
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Optional

import mlx.core as mx

from .cache import PromptCache
from .generate import GenerationResponse, stream_generate
from .model import Model
from .tokenizer import CHANNEL_END, CHANNEL_START, END_OF_TURN, split_thinking


@dataclass
class ChatCache:
    """The encoded conversation: ``cache`` holds the first ``messages`` messages.

    The cache holds the turns as they were generated (an answer's thought
    channel included), so a follow-up turn encodes only its new tokens.
    """

    cache: PromptCache
    messages: int = 0
    # The id that closed the last answer in the cache (None: nothing cached).
    stop_token: Optional[int] = None


@dataclass
class ChatResponse:
    text: str  # everything generated, markers kept
    answer: str  # without the thought channel and end-of-turn marker
    thought: Optional[str]
    prompt_cache: ChatCache
    prompt_tokens: int  # tokens encoded for this turn
    last: Optional[GenerationResponse] = field(default=None, repr=False)


def _render(tokenizer, messages, add_generation_prompt, template_kwargs) -> List[int]:
    ids = tokenizer.apply_chat_template(
        messages, add_generation_prompt=add_generation_prompt, tokenize=True, **template_kwargs
    )
    # transformers may hand back a BatchEncoding instead of a list.
    return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)


def chat_prompt(
    model: Model,
    tokenizer,
    messages: List[Dict[str, Any]],
    prompt_cache: Optional[ChatCache],
    **template_kwargs,
) -> tuple:
    """The tokens to encode for ``messages`` and the cache to encode them into.

    With a cache holding an earlier part of the conversation, only what comes
    after it is returned. If the rendered conversation does not extend what the
    cache holds (edited history, another template setting), the cache is
    started afresh.
    """
    full = _render(tokenizer, messages, True, template_kwargs)
    if prompt_cache is None or prompt_cache.messages == 0:
        return full, ChatCache(model.make_cache())
    cached = _render(tokenizer, messages[: prompt_cache.messages], False, template_kwargs)
    stop = prompt_cache.stop_token
    if (
        len(messages) > prompt_cache.messages
        and full[: len(cached)] == cached
        and stop in cached
    ):
        # The cache ends with the answer's stop token; the template closes the
        # turn with what follows it (Gemma 4: a newline).
        after_stop = len(cached) - cached[::-1].index(stop)
        return cached[after_stop:] + full[len(cached):], prompt_cache
    return full, ChatCache(model.make_cache())


def stream_chat(
    model: Model,
    tokenizer,
    messages: List[Dict[str, Any]],
    prompt_cache: Optional[ChatCache] = None,
    enable_thinking: bool = False,
    tools: Optional[List[Any]] = None,
    chat_template_kwargs: Optional[Dict[str, Any]] = None,
    **params,
) -> Iterator[GenerationResponse]:
    """``stream_generate`` for a conversation.

    Once the stream is exhausted, its last response carries ``prompt_cache``
    (a ``ChatCache``) for the next turn.
    """
    if tokenizer is None:
        raise ValueError("chat needs a tokenizer with a chat template")
    template_kwargs = dict(chat_template_kwargs or {}, enable_thinking=enable_thinking)
    if tools is not None:
        template_kwargs["tools"] = tools
    prompt, chat_cache = chat_prompt(model, tokenizer, messages, prompt_cache, **template_kwargs)

    last = None
    for last in stream_generate(model, tokenizer, prompt, prompt_cache=chat_cache.cache, **params):
        yield last

    # Keep the answer's last canvas in the cache, closed by its stop token (or
    # an end of turn when it ran out of tokens), so the next turn continues it.
    stop = last.stop_token
    if stop is None:
        stop = tokenizer.convert_tokens_to_ids(END_OF_TURN)
    # (Earlier canvases were encoded during generation; the last one was not.)
    model.encode(mx.array([last.token_ids + [stop]]), chat_cache.cache)
    mx.eval([c.state for c in chat_cache.cache])
    chat_cache.messages = len(messages) + 1
    chat_cache.stop_token = stop
    # Set once the stream is exhausted, on the response it yielded last.
    last.prompt_cache = chat_cache


def chat(
    model: Model,
    tokenizer,
    messages: List[Dict[str, Any]],
    prompt_cache: Optional[ChatCache] = None,
    enable_thinking: bool = False,
    tools: Optional[List[Any]] = None,
    **params,
) -> ChatResponse:
    """Answer the last message of ``messages``.

    Pass the returned ``prompt_cache`` with the next call (the messages so far,
    this answer as an ``assistant`` message, and the new message) so that only
    the new turn is encoded.
    """
    text, last = "", None
    for last in stream_chat(
        model, tokenizer, messages, prompt_cache, enable_thinking, tools, **params
    ):
        text += last.text
    thought, answer = split_thinking(text)
    return ChatResponse(text, answer, thought, last.prompt_cache, last.prompt_tokens, last)


# -- Command line: python -m mlx_diffgemma.chat -------------------------------

DEFAULT_MAX_TOKENS = 1024
PROMPT = ">> "
COMMANDS = """Commands:
  /think    turn thinking on or off
  /reset    start a new conversation (also: r)
  /quit     leave (also: q, /exit, Ctrl-D)
  /help     this help (also: h)"""


class ThoughtFormatter:
    """Generated text as display pieces: the thought channel labelled, apart
    from the answer, and the channel markers hidden.

    Fed the text as it is committed; returns ``(kind, text)`` pieces, kind
    "thought" or "answer".
    """

    LABEL = "Thought:\n"

    def __init__(self):
        self.in_thought = False
        self.name_pending = False  # "thought\n" follows the channel marker
        self.answer_start = True  # whitespace here is not shown
        self.held = ""  # a thought's trailing whitespace, shown if more follows

    def feed(self, text: str):
        pieces = []
        while text:
            if self.in_thought:
                if self.name_pending:
                    self.name_pending = False
                    if text.startswith("thought"):
                        text = text[len("thought"):].lstrip("\n")
                end = text.find(CHANNEL_END)
                body = text if end < 0 else text[:end]
                kept = body.rstrip()
                if kept:
                    pieces.append(("thought", self.held + kept))
                    self.held = body[len(kept):]
                else:
                    self.held += body
                if end < 0:
                    break
                self.in_thought, self.held, self.answer_start = False, "", True
                pieces.append(("thought", "\n\n"))
                text = text[end + len(CHANNEL_END):]
            else:
                start = text.find(CHANNEL_START)
                body = text if start < 0 else text[:start]
                if self.answer_start:
                    body = body.lstrip()
                    self.answer_start = not body
                if body:
                    pieces.append(("answer", body))
                if start < 0:
                    break
                # A thought after answer text (around a tool call) starts a line.
                label = self.LABEL if self.answer_start else "\n" + self.LABEL
                self.in_thought, self.name_pending = True, True
                pieces.append(("thought", label))
                text = text[start + len(CHANNEL_START):]
        return pieces

    def preview(self, text: str) -> str:
        """How ``text`` would show if it came next, without changing the state."""
        copy = ThoughtFormatter()
        copy.__dict__.update(self.__dict__)
        return "".join(piece for _, piece in copy.feed(text))


def setup_arg_parser():
    from . import cli

    parser = cli.ArgumentParser(
        prog="mlx_diffgemma.chat",
        description="Chat with DiffusionGemma in the terminal. The conversation stays\n"
        "encoded between turns, so each turn encodes only its new message.",
        epilog=COMMANDS,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    cli.add_model_arguments(parser)
    parser.add_argument("--system-prompt", metavar="TEXT", help="System prompt for the conversation.")
    parser.add_argument(
        "--max-tokens",
        "-m",
        type=cli.positive_int,
        default=DEFAULT_MAX_TOKENS,
        metavar="N",
        help=f"Most tokens per answer (default: {DEFAULT_MAX_TOKENS}).",
    )
    parser.add_argument(
        "--seed", type=int, metavar="N", help="PRNG seed of the first turn, +1 per turn (default: random)."
    )
    parser.add_argument(
        "--enable-thinking",
        action="store_true",
        help="Start with thinking on (toggle with /think).",
    )
    cli.add_chat_template_argument(parser)
    cli.add_sampler_arguments(parser)
    cli.add_output_arguments(parser)
    return parser


def main():
    from . import cli

    args = setup_arg_parser().parse_args()
    cli.run(lambda: run_chat(args))


def _read_line(interactive: bool) -> Optional[str]:
    """The user's next line, or None at the end of input."""
    if interactive:
        try:
            return input(PROMPT)
        except EOFError:
            print()
            return None
    line = sys.stdin.readline()
    if not line:
        return None
    line = line.rstrip("\n")
    # Piped input is not echoed: show it, so the output reads as a transcript.
    print(PROMPT + line, flush=True)
    return line


def run_chat(args):
    from . import cli
    from .generate import SamplerParams
    from .live import DIM

    interactive = sys.stdin.isatty()
    styled = sys.stdout.isatty()
    if interactive and styled:
        try:
            import readline  # noqa: F401 (line editing and history for input())
        except ImportError:
            pass

    model, tokenizer = cli.load(args.model)
    params = cli.sampler_params(args)
    SamplerParams.resolve(model, **params)  # bad settings fail before the first prompt
    view = cli.make_view(args)
    thought_style = DIM  # a plain view on a pipe drops styles itself
    template_kwargs = dict(args.chat_template_config or {})
    thinking = template_kwargs.pop("enable_thinking", args.enable_thinking)

    def new_conversation():
        system = []
        if args.system_prompt is not None:
            system.append({"role": "system", "content": args.system_prompt})
        return system, None

    messages, prompt_cache = new_conversation()
    if interactive:
        print(f"Chat with {args.model}. Type /help for commands, /quit to leave.")
    turn = 0
    while True:
        query = _read_line(interactive)
        if query is None or query.strip() in ("q", "/quit", "/exit"):
            return 0
        command = query.strip()
        if not command:
            continue
        if command in ("r", "/reset"):
            messages, prompt_cache = new_conversation()
            print("[new conversation]")
            continue
        if command in ("h", "/help"):
            print(COMMANDS)
            continue
        if command == "/think":
            thinking = not thinking
            # The template renders the whole conversation differently (a system
            # turn asks for thoughts), so the next turn encodes it afresh.
            prompt_cache = None
            print(f"[thinking {'on' if thinking else 'off'}]")
            continue

        messages.append({"role": "user", "content": query})
        seed = None if args.seed is None else args.seed + turn
        turn += 1
        cached = prompt_cache.cache.offset if prompt_cache else 0
        formatter = ThoughtFormatter()
        progress = cli.Progress()
        text, last = "", None
        try:
            with view:
                for last in stream_chat(
                    model,
                    tokenizer,
                    messages,
                    prompt_cache=prompt_cache,
                    enable_thinking=thinking,
                    chat_template_kwargs=template_kwargs,
                    max_tokens=args.max_tokens,
                    seed=seed,
                    **params,
                ):
                    progress.update(last)
                    if last.token_ids or last.finish_reason:
                        text += last.text
                        for kind, piece in formatter.feed(last.text):
                            view.write(piece, thought_style if kind == "thought" else None)
                    elif view.wants_draft():
                        view.draft(formatter.preview(last.draft), progress.status(last))
        except (KeyboardInterrupt, ValueError) as e:
            # The cache may hold part of this turn: forget it, and the message.
            messages.pop()
            prompt_cache = None
            if isinstance(e, ValueError):  # e.g. a conversation longer than the context
                print(f"error: {e}", file=sys.stderr)
            print("[turn dropped; the next one encodes the conversation again]", flush=True)
            continue

        # The conversation so far: what the cache held, if this turn continued it.
        conversation = last.prompt_tokens + (cached if last.prompt_cache is prompt_cache else 0)
        prompt_cache = last.prompt_cache
        messages.append({"role": "assistant", "content": split_thinking(text)[1]})
        if args.verbose:
            cli.print_stats(last, progress, conversation_tokens=conversation)


if __name__ == "__main__":
    main()
