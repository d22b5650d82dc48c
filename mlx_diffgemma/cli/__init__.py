"""The command lines: what `generate`, `chat`, `convert` and `benchmark` share.

Each command is a module here (``cli.generate``, ...) on top of the library;
the library never imports this package. Errors a user can cause (a bad flag, a
missing model, a model too big for the machine) end every command the same
way: one line on stderr, never a traceback.
"""

import argparse
import json
import os
import shlex
import sys
from pathlib import Path
from typing import Callable, Dict, Optional, Union

import mlx.core as mx

from .. import distributed
from ..chat_template import TEMPLATE_ARGUMENTS
from ..live import LiveView, PlainView
from ..prompts import check_seed
from ..sampler_params import FAST, SAMPLER_SETTINGS, SETTING_INFO, SamplerParams, setting_problem
from ..utils import DEFAULT_MODEL, LoadError, is_hub_id, load

CONVERT_COMMAND = "python -m mlx_diffgemma.convert --q-bits 4"

# Set by the dispatcher (``mlx_diffgemma <command>``, ``cli.main``) to the name it
# was run as, so a command's usage names it as the user typed it.
DISPATCHER: Optional[str] = None


def prog(command: str, alias: str) -> str:
    """A command's name in its usage: ``mlx_diffgemma generate`` through the
    dispatcher, else ``alias`` (``mlx_diffgemma.generate``, its own entry point)."""
    return f"{DISPATCHER} {command}" if DISPATCHER else alias


class ArgumentParser(argparse.ArgumentParser):
    """argparse with one-line errors: the usage is a screenful, --help shows it."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _typed(kind, problem: Callable[[object], Optional[str]]):
    """An argparse type: ``kind`` (int or float), then ``problem(value)``,
    which says what is wrong with the value (None: nothing)."""

    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected {'an integer' if kind is int else 'a number'}, got {text!r}"
            ) from None
        message = problem(value)
        if message:
            raise argparse.ArgumentTypeError(message)
        return value

    return parse


positive_int = _typed(int, lambda v: None if v >= 1 else f"must be >= 1 (got {v})")
positive_float = _typed(float, lambda v: None if 0 < v < float("inf") else f"must be a number > 0 (got {v})")


def _seed_problem(value: int) -> Optional[str]:
    try:
        check_seed(value)
    except ValueError as e:
        return str(e).removeprefix("seed ")
    return None


seed = _typed(int, _seed_problem)  # --seed, checked as the library checks a seed


def add_max_tokens_argument(parser: argparse.ArgumentParser, default: int, help: str):
    parser.add_argument(
        "--max-tokens", "-m", type=positive_int, default=default, metavar="N", help=f"{help} (default: {default})."
    )


def add_image_argument(parser: argparse.ArgumentParser, help: str):
    # mlx-vlm's flag: several after one --image, or --image given again.
    parser.add_argument("--image", action="extend", nargs="+", default=[], metavar="PATH_OR_URL", help=help)


def add_seed_argument(parser: argparse.ArgumentParser, help: str):
    parser.add_argument("--seed", type=seed, metavar="N", help=help)


def json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError('expected a JSON object, e.g. \'{"key": "value"}\'')
    return value


def str2bool(text: str) -> bool:
    # As mlx_lm.generate's --verbose: "True"/"T"/"False"/"F", any case.
    if text.lower() in ("true", "t", "yes", "y", "1"):
        return True
    if text.lower() in ("false", "f", "no", "n", "0"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def add_model_arguments(parser: argparse.ArgumentParser):
    parser.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        metavar="PATH_OR_REPO",
        help=f"Local model directory or Hugging Face repo (default: {DEFAULT_MODEL}).",
    )
    parser.add_argument(
        "--adapter-path",
        metavar="DIR",
        help="Directory of trained adapters (adapters.safetensors, adapter_config.json) to apply.",
    )


def template_config(text: str) -> dict:
    value = json_object(text)
    taken = [key for key in value if key in TEMPLATE_ARGUMENTS]
    if taken:
        raise argparse.ArgumentTypeError(f"{taken[0]!r} is set by the command itself; leave it out")
    return value


def add_chat_template_argument(parser: argparse.ArgumentParser):
    parser.add_argument(
        "--chat-template-config",
        type=template_config,
        metavar="JSON",
        help="Extra arguments for the chat template, as a JSON object (e.g. '{\"enable_thinking\": true}').",
    )


def add_sampler_arguments(parser: argparse.ArgumentParser):
    """The diffusion sampler's flags, one per ``SamplerParams`` setting. Unset
    flags stay None: the checkpoint's generation_config.json decides."""
    group = parser.add_argument_group(
        "denoising", "Unset, each comes from the model's generation_config.json, else the default shown."
    )
    for name in SAMPLER_SETTINGS:
        info = SETTING_INFO[name]
        group.add_argument(
            "--" + name.replace("_", "-"),
            type=_typed(info["kind"], lambda value, name=name: setting_problem(name, value)),
            metavar=info["metavar"],
            help=f"{info['help'].rstrip('.')} (default: {info['default']:g}).",
        )
    group.add_argument(
        "--fast",
        action="store_true",
        default=None,
        help=f"Less work per token than the reference sampler, at a measured cost in accuracy "
        f"(docs/benchmarks.md): {', '.join(f'{k}={v}' for k, v in FAST.items())}; flags set here win.",
    )


def add_output_arguments(parser: argparse.ArgumentParser):
    parser.add_argument(
        "--live",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="Redraw the canvas being denoised in place (default: on when stdout is a terminal).",
    )
    parser.add_argument(
        "--verbose",
        type=str2bool,
        nargs="?",
        const=True,
        metavar="true|false",
        default=False,
        help="Print prompt and generation speed, canvases, steps and peak memory.",
    )


def make_view(args, final_newline: bool = True):
    """The live view on a terminal (or as --live/--no-live says), else plain
    text; ``final_newline`` False ends the output exactly with the text."""
    terminal = sys.stdout.isatty()
    live = terminal if args.live is None else args.live
    return LiveView(final_newline=final_newline) if live else PlainView(styled=terminal, final_newline=final_newline)


def sampler_flags(args) -> Dict[str, object]:
    """The sampler flags the user set (unset ones are left to the checkpoint)."""
    names = SAMPLER_SETTINGS + ("fast",)
    return {name: getattr(args, name) for name in names if getattr(args, name, None) is not None}


def resolve_sampler(args, model) -> SamplerParams:
    """The command's sampler settings, resolved once against the checkpoint:
    bad ones fail here, before a view opens or a prompt is read."""
    return SamplerParams.resolve(model, **sampler_flags(args))


# -- Standard input -------------------------------------------------------------


def stdin():
    """Standard input, or ValueError when it is closed (``0<&-``).

    Undecodable bytes come through as surrogates (see ``valid_text``) instead
    of ending the command."""
    if sys.stdin is None:
        raise ValueError("standard input is closed: nothing to read")
    if hasattr(sys.stdin, "reconfigure"):
        sys.stdin.reconfigure(errors="surrogateescape")
    return sys.stdin


def valid_text(text: str) -> str:
    """``text`` with bytes that were not valid UTF-8 replaced by U+FFFD, saying so once on stderr."""
    fixed = text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    if fixed != text:
        print("warning: the input is not valid UTF-8; undecodable bytes were replaced with U+FFFD", file=sys.stderr)
    return fixed


# -- Will the weights fit? ----------------------------------------------------


def memory_bytes() -> int:
    """The memory the model can use: Metal's recommended working set on a Mac,
    else the machine's physical memory."""
    try:
        info = mx.device_info() if hasattr(mx, "device_info") else mx.metal.device_info()
    except Exception:
        info = {}
    for key in ("max_recommended_working_set_size", "memory_size", "total_memory"):
        if info.get(key):
            return int(info[key])
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def local_weights_bytes(model_path: Path) -> int:
    return sum(f.stat().st_size for f in model_path.glob("*.safetensors"))


def hub_weights_bytes(repo: str, revision: Optional[str] = None, api=None) -> Optional[int]:
    """Total size of a Hub repo's safetensors files, from the Hub's file listing
    or, offline, from the local cache; None when neither can tell (the download
    then says what is wrong)."""
    from huggingface_hub import HfApi, snapshot_download

    try:
        info = (api or HfApi()).model_info(repo, revision=revision, files_metadata=True, timeout=10)
        sizes = [s.size or 0 for s in info.siblings or [] if s.rfilename.endswith(".safetensors")]
        return sum(sizes) or None
    except Exception:
        pass
    try:
        cached = snapshot_download(repo, revision=revision, allow_patterns=["*.safetensors"], local_files_only=True)
    except Exception:
        return None
    return local_weights_bytes(Path(cached)) or None


def _quantized_bits(model_path: Path) -> Optional[int]:
    try:
        config = json.loads((model_path / "config.json").read_text())
        return int(config["quantization"]["bits"])
    except Exception:
        return None


def check_memory(
    model: str,
    revision: Optional[str] = None,
    memory: Optional[int] = None,
    weights: Optional[int] = None,
):
    """Raise ``LoadError`` when ``model``'s weights are larger than ``memory``.

    Runs before anything is downloaded: for a Hub repo the size comes from the
    Hub's file listing, for a local directory from its *.safetensors files.
    ``memory`` and ``weights`` (bytes) default to this machine's and the model's.
    """
    path = Path(model).expanduser()
    bits = None
    if weights is None:
        if path.is_dir():
            weights = local_weights_bytes(path)
        elif is_hub_id(model):
            weights = hub_weights_bytes(model, revision)
    if path.is_dir():
        bits = _quantized_bits(path)
    if not weights:
        return  # unknown size: loading will report what is wrong
    memory = memory_bytes() if memory is None else memory
    if weights <= memory:
        return
    message = (
        f"{model}: its weights take {weights / 1e9:.1f} GB, more than the "
        f"{memory / 1e9:.1f} GB this machine can give the model"
    )
    if bits is not None and bits <= 4:
        raise LoadError(f"{message}; it is already quantized to {bits} bits")
    raise LoadError(f"{message}; convert it to 4 bits first: {convert_advice(model)}")


def convert_advice(model: str) -> str:
    """The command converting ``model`` to 4 bits, and how to run the result."""
    command = CONVERT_COMMAND
    if model != DEFAULT_MODEL:
        command = f"python -m mlx_diffgemma.convert --hf-path {shlex.quote(model)} --q-bits 4"
    # Where the converter writes by default (convert.default_mlx_path).
    converted = f"{Path(model.rstrip('/')).name}-4bit"
    return f"`{command}`, then run with --model {converted}"


def add_distributed_argument(parser: argparse.ArgumentParser):
    parser.add_argument(
        "--pipeline",
        action="store_true",
        help="Under mlx.launch: split the layers across the processes (pipeline) rather than every "
        "layer's heads and experts (tensor parallelism, the default). docs/distributed.md",
    )


def load_for_generation(model: str, adapter_path: Optional[str] = None, pipeline: bool = False):
    """``mlx_diffgemma.load`` for a command line: checks memory first, needs a tokenizer.

    Launched by ``mlx.launch``, each process loads its share of the model
    (``pipeline``: its stage of the layers, else its share of every layer),
    and only process 0 writes to stdout."""
    group = distributed.init()
    if group.size() == 1:
        check_memory(model)
        model_obj, tokenizer = load(model, adapter_path=adapter_path)
    else:
        if group.rank() != 0:
            quiet_stdout()
        path = Path(model).expanduser()
        share = local_weights_bytes(path) // group.size() if path.is_dir() else None
        check_memory(model, weights=share)
        split = dict(pipeline_group=group) if pipeline else dict(tensor_group=group)
        model_obj, tokenizer = load(model, adapter_path=adapter_path, **split)
    if tokenizer is None:
        raise LoadError(f"{model}: no tokenizer files (tokenizer.json or tokenizer.model)")
    return model_obj, tokenizer


def quiet_stdout():
    """Send this process's stdout to /dev/null (every process but 0 of a group)."""
    sys.stdout.flush()
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


# -- Running a command ---------------------------------------------------------


def run(command: Callable[[], Optional[int]], interrupted: Union[str, Callable[[], str], None] = None):
    """Run a command's body and exit; every command fails the same way.

    Errors a user can cause (bad input, a bad checkpoint, a file that cannot
    be read or written: ``ValueError`` and ``OSError``) print
    one line, ``error: ...``, and exit 1. Ctrl-C exits 130, printing
    ``interrupted`` if given (a function: what it returns then).
    """
    try:
        code = command()
    except (ValueError, OSError) as e:
        if isinstance(e, BrokenPipeError):
            # The reader went away (`| head`). Python would complain again
            # when flushing stdout at exit: point it at /dev/null first.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            sys.exit(1)
        message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"error: {message}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        message = interrupted() if callable(interrupted) else interrupted
        if message:
            print(message, file=sys.stderr)
        sys.exit(130)
    sys.exit(code or 0)
