"""Build the "code" task: Python functions from this machine's standard library,
a byte-pair tokenizer trained on them, and a randomly initialised model.

Each example is one function with the code before it: up to ``CONTEXT_TOKENS``
of the lines above its ``def`` (whatever they are: imports, other functions,
a class line), the ``def`` and its body, then the end of the text. The
model is trained on the whole text (``{"text": ...}``); what it is asked is
the body, given the context and the signature, and, for infilling, a line of
the body given the lines around it: the suffix then holds what the prefix
lacks (the names the rest of the body uses, where the block ends).

Unlike examples/shift, an answer is not determined by the prompt: many bodies
fit a signature, so the sampler meets what it meets on the released model, a
canvas whose tokens depend on each other, and takes many steps to settle it.
Answers are scored token by token against the held-out source.

Modules are split by a seeded shuffle of their names (``SPLIT``), so no test
function's module was trained on; the tokenizer is trained on the training
modules only.

    python examples/code/build.py --data examples/code/data --init examples/code/init

writes train/valid.jsonl (text), test.jsonl (the body problems: a prompt and
the reference body), infill.jsonl (the line problems: prefix, middle,
suffix), manifest.json (the Python version and the files read, with their
hashes: another Python has another standard library) and a model directory:
the real layout (sliding and full attention layers, experts with top-2
routing, self-conditioning) at small widths, canvas 64, random weights, the
tokenizer with Gemma 4's control tokens at their real ids, and the released
checkpoint's sampler settings.
"""

import argparse
import ast
import hashlib
import json
import sys
import sysconfig
from collections import Counter
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "shift"))
from build import SPECIAL_TOKENS, write_model, write_tokenizer_files  # noqa: E402
from build import TEXT_CONFIG as SHIFT_CONFIG  # noqa: E402

STDLIB = Path(sysconfig.get_paths()["stdlib"])
# Directories of tests, tools and GUI code: little of it is library code.
SKIPPED = {"test", "tests", "site-packages", "idlelib", "lib2to3", "turtledemo", "ensurepip", "tkinter", "__pycache__"}
SPLIT = {"test": 0.06, "valid": 0.02}  # of the modules; the rest train
SPLIT_SEED = 0

VOCAB_SIZE = 4096
ALPHABET_SIZE = 160  # characters of their own; the rarer ones are written as bytes
NEWLINE_ID = 107  # "\n", as in Gemma's vocabulary
FIRST_BYTE_ID = 108
CANVAS_LENGTH = 64
CONTEXT_TOKENS = 128  # at most this much code above a function
FUNCTION_TOKENS = 192  # functions longer than this are left out
MIN_BODY_TOKENS = 16
TEST_PROBLEMS, INFILL_PROBLEMS, VALID_EXAMPLES = 400, 400, 256

# The shift model's config (rope, norms, ids), wider and deeper, with a
# sliding window shorter than an example so both kinds of layer matter.
TEXT_CONFIG = dict(
    SHIFT_CONFIG,
    hidden_size=256,
    num_hidden_layers=6,
    layer_types=["sliding_attention", "sliding_attention", "full_attention"] * 2,
    intermediate_size=512,
    head_dim=64,
    global_head_dim=128,
    sliding_window=128,
    moe_intermediate_size=256,
)


def modules():
    """The standard library's Python files, split into train, valid and test."""
    files = sorted(
        p for p in STDLIB.rglob("*.py") if not SKIPPED & set(p.relative_to(STDLIB).parts) and p.stat().st_size > 0
    )
    order = np.random.default_rng(SPLIT_SEED).permutation(len(files))
    n_test, n_valid = (round(SPLIT[s] * len(files)) for s in ("test", "valid"))
    split = {"test": order[:n_test], "valid": order[n_test : n_test + n_valid], "train": order[n_test + n_valid :]}
    return {name: [files[i] for i in sorted(index)] for name, index in split.items()}


def read(path: Path) -> str:
    # Tabs are rare and ambiguous next to spaces; everything else is kept as written.
    return path.read_text(encoding="utf-8", errors="replace").expandtabs(4)


def train_tokenizer(files):
    """A BPE on the training modules, in Gemma's form: spaces as "▁", byte
    fallback, Gemma 4's control tokens and "\\n" at their ids below 108."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    def shaped(model):
        tok = Tokenizer(model)
        tok.normalizer = normalizers.Replace(" ", "▁")
        # A line is a word: merges join runs of indentation and code, never across lines.
        tok.pre_tokenizer = pre_tokenizers.Split(Regex("\n"), behavior="isolated")
        tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
        return tok

    low = {i: SPECIAL_TOKENS.get(i, "\n" if i == NEWLINE_ID else f"<unused{i}>") for i in range(FIRST_BYTE_ID)}
    texts = [read(p) for p in files]
    # The trainer breaks ties between equally rare characters differently from
    # run to run: the alphabet is chosen here (most frequent first, ties by
    # character), so the same files give the same tokenizer. The rest fall back to bytes.
    counts = Counter(c for text in texts for c in text.replace(" ", "▁") if c != "\n")
    alphabet = sorted(counts, key=lambda c: (-counts[c], c))[:ALPHABET_SIZE]
    learned = shaped(models.BPE(unk_token="<unk>"))
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE - FIRST_BYTE_ID - 256,
        initial_alphabet=alphabet,
        limit_alphabet=len(alphabet),
        show_progress=False,
        special_tokens=[],
    )
    learned.train_from_iterator(texts, trainer=trainer)
    trained = json.loads(learned.to_str())["model"]
    vocab = {token: i for i, token in low.items()}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = FIRST_BYTE_ID + b
    for token, _ in sorted(trained["vocab"].items(), key=lambda kv: kv[1]):
        vocab.setdefault(token, len(vocab))
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in trained["merges"]]
    tok = shaped(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for i, t in low.items() if i != NEWLINE_ID])
    return tok


def functions(source: str):
    """(first line of the def, first line of the body, last line) of each
    function, 0-based, decorators left with the context above."""
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return []
    found = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            found.append((node.lineno - 1, node.body[0].lineno - 1, node.end_lineno - 1))
    return sorted(found)


def examples(path: Path, count):
    """One example a function: context lines, signature lines, body lines,
    each a list of source lines with their newlines; None where too long."""
    lines = read(path).splitlines(keepends=True)
    for start, body, end in functions("".join(lines)):
        if body <= start or end < body:
            continue  # a one-line def: nothing to ask
        signature, body_lines = lines[start:body], lines[body : end + 1]
        if count("".join(signature + body_lines)) > FUNCTION_TOKENS or count("".join(body_lines)) < MIN_BODY_TOKENS:
            continue
        context, k = [], start
        while k > 0 and count("".join([lines[k - 1]] + context)) <= CONTEXT_TOKENS:
            context.insert(0, lines[k - 1])
            k -= 1
        yield dict(
            module=str(path.relative_to(STDLIB)), line=start + 1, context=context, signature=signature, body=body_lines
        )


def write_data(out: Path, tok):
    out.mkdir(parents=True, exist_ok=True)
    split = modules()

    def count(text: str) -> int:
        return len(tok.encode(text, add_special_tokens=False).ids)

    def join(*parts) -> str:
        return "".join(line for part in parts for line in part)

    found = {name: [e for p in files for e in examples(p, count)] for name, files in split.items()}
    # A held-out function written the same in a training module (the codecs'
    # encode/decode, say) would be recalled, not written: such are left out.
    seen = {join(e["signature"], e["body"]) for e in found["train"]}
    for name in ("valid", "test"):
        found[name] = [e for e in found[name] if join(e["signature"], e["body"]) not in seen]
    rng = np.random.default_rng(1)
    train = [{"text": join(e["context"], e["signature"], e["body"])} for e in found["train"]]
    rng.shuffle(train)
    valid = [{"text": join(e["context"], e["signature"], e["body"])} for e in found["valid"]]
    valid = [valid[i] for i in sorted(rng.permutation(len(valid))[:VALID_EXAMPLES])]
    test = found["test"]
    picked = [test[i] for i in sorted(rng.permutation(len(test))[:TEST_PROBLEMS])]
    bodies = [
        {
            "prompt": join(e["context"], e["signature"]),
            "completion": join(e["body"]),
            "module": e["module"],
            "line": e["line"],
        }
        for e in picked
    ]
    infill = []
    for i in rng.permutation(len(test)):
        e = test[i]
        body = e["body"]
        candidates = [k for k, line in enumerate(body) if k > 0 and line.strip()]
        if not candidates:
            continue
        k = int(rng.choice(candidates))
        infill.append(
            {
                "prefix": join(e["context"], e["signature"], body[:k]),
                "middle": body[k],
                "suffix": join(body[k + 1 :]),
                "module": e["module"],
                "line": e["line"] + len(e["signature"]) + k,
            }
        )
        if len(infill) == INFILL_PROBLEMS:
            break
    for name, rows in [("train", train), ("valid", valid), ("test", bodies), ("infill", infill)]:
        (out / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    manifest = {
        "python": sys.version.split()[0],
        "stdlib": str(STDLIB),
        "files": {
            name: {str(p.relative_to(STDLIB)): hashlib.sha256(p.read_bytes()).hexdigest()[:16] for p in files}
            for name, files in split.items()
        },
        "examples": {"train": len(train), "valid": len(valid), "test": len(bodies), "infill": len(infill)},
        "train_tokens": sum(count(r["text"]) for r in train),
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def write_initial_model(out: Path, tok, seed: int = 0):
    out.mkdir(parents=True, exist_ok=True)
    write_tokenizer_files(out, tok.to_str(), TEXT_CONFIG["max_position_embeddings"])
    write_model(out, TEXT_CONFIG, CANVAS_LENGTH, tok.get_vocab_size(), seed)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, help="write the jsonl files and manifest.json here")
    parser.add_argument("--init", type=Path, help="write a randomly initialised model here")
    parser.add_argument("--seed", type=int, default=0, help="seed of the initial weights")
    args = parser.parse_args()
    if not (args.data or args.init):
        parser.error("nothing to do: pass --data and/or --init")
    tok = train_tokenizer(modules()["train"])
    if args.data:
        manifest = write_data(args.data, tok)
        print(json.dumps({k: manifest[k] for k in ("python", "examples", "train_tokens")}))
    if args.init:
        write_initial_model(args.init, tok, args.seed)


if __name__ == "__main__":
    main()
