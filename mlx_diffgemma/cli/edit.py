"""python -m mlx_diffgemma.edit: rewrite spans of a text file, the rest held fixed."""

import argparse
import sys
from pathlib import Path
from typing import List, Optional, Tuple

from .. import cli, files
from ..infill import check_spans, stream_edit

EDIT_DESCRIPTION = """\
Rewrite parts of a text file with DiffusionGemma. The text around the spans is
held fixed in the canvas and the spans are written again to fit it (and the
instruction, if one is given). The edited text goes to stdout, or back into
the file with --in-place. On a terminal the canvas is shown as it is
denoised, the fixed text in yellow."""
EDIT_EXAMPLES = """\
examples:
  mlx_diffgemma.edit --file app.py --lines 12:14 --instruction "Handle an empty list."
  mlx_diffgemma.edit --file notes.txt --span 120:180 --in-place
  mlx_diffgemma.edit --file a.py --lines 3:3 --lines 9:10 --output b.py
  mlx_diffgemma.edit --file a.py --lines 7:7:12    # write 12 tokens in line 7 (an empty line needs a length)"""


def span_argument(text: str) -> Tuple[int, int, Optional[int]]:
    """START:END, or START:END:LENGTH: two integers and a length in tokens."""
    parts = text.split(":")
    if len(parts) not in (2, 3):
        raise argparse.ArgumentTypeError(f"expected START:END or START:END:LENGTH, got {text!r}")
    try:
        numbers = [int(part) for part in parts]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers START:END[:LENGTH], got {text!r}") from None
    if len(numbers) == 3 and numbers[2] < 1:
        raise argparse.ArgumentTypeError(f"LENGTH must be >= 1 token, got {text!r}")
    return numbers[0], numbers[1], numbers[2] if len(numbers) == 3 else None


def setup_arg_parser():
    parser = cli.ArgumentParser(
        prog=cli.prog("edit", "mlx_diffgemma.edit"),
        description=EDIT_DESCRIPTION,
        epilog=EDIT_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    cli.add_model_arguments(parser)
    parser.add_argument("--file", required=True, metavar="PATH", help="The text file to edit ('-' reads stdin).")
    parser.add_argument(
        "--span",
        type=span_argument,
        action="append",
        default=[],
        metavar="START:END[:LENGTH]",
        help="Characters START to END (0-based, END excluded) to rewrite, in LENGTH tokens if given "
        "(default: as many as the span has; an empty span needs one); repeat for several.",
    )
    parser.add_argument(
        "--lines",
        type=span_argument,
        action="append",
        default=[],
        metavar="FIRST:LAST[:LENGTH]",
        help="Lines FIRST to LAST (1-based, inclusive; their line breaks are kept) to rewrite, in LENGTH tokens "
        "if given (an empty line needs one); repeat for several.",
    )
    parser.add_argument(
        "--instruction", metavar="TEXT", help="What to change, sent as the user turn of the chat template."
    )
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--in-place", action="store_true", help="Write the result back into --file.")
    where.add_argument("--output", metavar="PATH", help="Write the result to this new file (never overwritten).")
    cli.add_seed_argument(parser, "PRNG seed, 0 to 2**64-1 (default: a random one).")
    cli.add_chat_template_argument(parser)
    cli.add_sampler_arguments(parser)
    cli.add_output_arguments(parser)
    return parser


def line_span(text: str, first: int, last: int) -> Tuple[int, int]:
    """Characters of lines ``first``..``last`` (1-based), without the last line's break."""
    lines = text.splitlines(keepends=True)
    if not 1 <= first <= last <= len(lines):
        raise ValueError(f"--lines {first}:{last}: the file has {len(lines)} lines (need 1 <= FIRST <= LAST)")
    start = sum(len(line) for line in lines[: first - 1])
    end = sum(len(line) for line in lines[:last])
    body = lines[last - 1]
    return start, end - (len(body) - len(body.rstrip("\r\n")))


def spans_of(args, text: str) -> Tuple[List[Tuple[int, int]], List[Optional[int]]]:
    """The spans to rewrite, as character offsets, and each one's length in tokens (None: as now)."""
    given = [(f"--span {a}:{b}", (a, b), n) for a, b, n in args.span]
    given += [(f"--lines {a}:{b}", line_span(text, a, b), n) for a, b, n in args.lines]
    if not given:
        raise ValueError("nothing to edit: give --span START:END or --lines FIRST:LAST")
    for flag, (start, end), n in given:
        if start == end and n is None:
            raise ValueError(f"{flag}: the span is empty; say how many tokens to write there ({flag}:LENGTH)")
    return [span for _, span, _ in given], [n for _, _, n in given]


def exists_error(path: Path) -> ValueError:
    return ValueError(f"{path}: already exists (--output never overwrites; use --in-place to edit a file)")


def main():
    args = setup_arg_parser().parse_args()
    cli.run(lambda: run_edit(args))


def run_edit(args):
    if args.in_place and args.file == "-":
        raise ValueError("--in-place needs a file, not stdin")
    if args.file == "-":
        text = cli.valid_text(cli.stdin().read())
    else:
        path = Path(args.file)
        try:
            # newline="": line endings come back as they are in the file.
            with path.open(encoding="utf-8", newline="") as f:
                text = f.read()
        except UnicodeDecodeError:
            raise ValueError(f"{path}: not UTF-8 text") from None
        except FileNotFoundError:
            raise ValueError(f"{path}: no such file") from None
        except IsADirectoryError:
            raise ValueError(f"{path}: is a directory, not a text file") from None
    # Everything that can fail without the model fails before it loads.
    spans, lengths = spans_of(args, text)
    spans = check_spans(text, spans, lengths)
    if args.in_place:
        files.check_writable(Path(args.file))
    if args.output:
        if Path(args.output).exists() or Path(args.output).is_symlink():
            raise exists_error(Path(args.output))
        files.check_writable(Path(args.output))
    model, tokenizer = cli.load_for_generation(args.model, args.adapter_path)
    params = cli.resolve_sampler(args, model)

    to_stdout = not (args.in_place or args.output)
    last = None
    stream = stream_edit(
        model,
        tokenizer,
        text,
        spans,
        args.instruction,
        lengths=lengths,
        seed=args.seed,
        chat_template_kwargs=args.chat_template_config,
        params=params,
    )
    # Exactly the edited text: no newline added after it.
    with cli.make_view(args, final_newline=False) as view:
        for last in stream:
            if last.finished:
                if to_stdout:
                    view.write(last.text)
            elif view.wants_draft():
                status = f"canvas {last.window + 1}, step {last.step}"
                view.draft_parts(last.draft_parts(context=True), status)
    if args.in_place:
        files.write_text(Path(args.file), last.text)
    elif args.output:
        try:
            files.write_text(Path(args.output), last.text, overwrite=False)
        except FileExistsError:
            raise exists_error(Path(args.output)) from None
    if not to_stdout:
        print(f"{args.file if args.in_place else args.output}: written", file=sys.stderr)
    if args.verbose:
        # On stderr: stdout may be the edited file.
        moved = ", ".join(f"{a}:{b}" for a, b in last.spans)
        print("=" * 10, file=sys.stderr)
        print(f"Spans now at: {moved}", file=sys.stderr)
        print(f"Denoising steps: {last.denoising_steps}", file=sys.stderr)
        print(f"Peak memory: {last.peak_memory:.3f} GB", file=sys.stderr, flush=True)
