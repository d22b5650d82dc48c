"""Many clients, one model: the server's interleaving against batching the same requests as rows.

    python benchmarks/server_load.py [--model examples/shift/model] [--clients 1 4 16]

For each number of clients N, starts N streaming chat requests at once against
``python -m mlx_diffgemma.server`` (a subprocess) and reports the time to each
client's first committed canvas (median and worst) and the total tokens per
second; then, in this process, runs the same N prompts as rows of one
``stream_generate`` batch (what a batching server would do) and reports the
same numbers. The default model is the trained shift model, whose canvases
really converge (random weights never stop early). The prompts are the shift
task's held-out problems, each answer about four canvases of 32.
"""

import argparse
import json
import re
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
from openai import OpenAI

from mlx_diffgemma import load
from mlx_diffgemma.chat_template import render
from mlx_diffgemma.generate import stream_generate

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "shift"
sys.path.insert(0, str(EXAMPLES))
import build  # noqa: E402 (the shift task's problems)


def problems(n: int):
    rng = np.random.default_rng(build.SPLITS["test"][1])
    return [build.problem(rng)[0] for _ in range(n)]


def serve(model: str, concurrency: int, *extra: str):
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlx_diffgemma.server",
            "--model",
            model,
            "--port",
            "0",
            "--log-level",
            "WARNING",
            "--max-concurrency",
            str(concurrency),
            "--queue-size",
            "64",
            "--prompt-cache-size",
            "0",
            *extra,
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    match = re.search(r"http://127\.0\.0\.1:(\d+)/", proc.stdout.readline())
    if not match:
        proc.kill()
        sys.exit("error: the server did not start")
    return proc, f"http://127.0.0.1:{match.group(1)}/v1"


def through_server(url: str, model: str, prompts, max_tokens: int):
    firsts, tokens, errors = [None] * len(prompts), [0] * len(prompts), []
    start = threading.Barrier(len(prompts) + 1)

    def client(i):
        try:
            start.wait()
            tic = time.perf_counter()
            stream = OpenAI(base_url=url, api_key="none", timeout=3600).chat.completions.create(
                model=model,
                messages=[{"role": "user", "content": prompts[i]}],
                max_tokens=max_tokens,
                seed=i,
                stream=True,
                stream_options={"include_usage": True},
            )
            for chunk in stream:
                if firsts[i] is None and chunk.choices and chunk.choices[0].delta.content:
                    firsts[i] = time.perf_counter() - tic
                if chunk.usage:
                    tokens[i] = chunk.usage.completion_tokens
        except Exception as e:
            errors.append(repr(e))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    start.wait()
    tic = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - tic
    if errors:
        sys.exit(f"error: {errors[0]}")
    return firsts, sum(tokens), wall


def as_batch(model, tokenizer, prompts, max_tokens: int):
    rows = [render(tokenizer, [{"role": "user", "content": p}], True) for p in prompts]
    firsts, tokens = [None] * len(rows), 0
    tic = time.perf_counter()
    for r in stream_generate(model, tokenizer, rows, max_tokens, seed=list(range(len(rows)))):
        if r.token_ids and firsts[r.row] is None:
            firsts[r.row] = time.perf_counter() - tic
        tokens += len(r.token_ids)
    return firsts, tokens, time.perf_counter() - tic


def line(kind, n, firsts, tokens, wall):
    return (
        f"{kind:<12} clients {n:>2}: first canvas median {statistics.median(firsts):6.2f} s, "
        f"worst {max(firsts):6.2f} s; {tokens} tokens in {wall:6.2f} s = {tokens / wall:7.1f} tokens/s"
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(EXAMPLES / "model"))
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--max-tokens", type=int, default=160)
    parser.add_argument("--json", action="store_true", help="also print the numbers as JSON lines")
    args = parser.parse_args()
    results = []
    proc, url = serve(args.model, max(args.clients))
    try:
        through_server(url, args.model, problems(1), args.max_tokens)  # warm up
        for n in args.clients:
            firsts, tokens, wall = through_server(url, args.model, problems(n), args.max_tokens)
            print(line("interleaved", n, firsts, tokens, wall), flush=True)
            results.append(dict(kind="interleaved", clients=n, firsts=firsts, tokens=tokens, wall=wall))
    finally:
        proc.terminate()
        proc.wait()
    model, tokenizer = load(args.model)
    as_batch(model, tokenizer, problems(1), args.max_tokens)  # warm up
    for n in args.clients:
        firsts, tokens, wall = as_batch(model, tokenizer, problems(n), args.max_tokens)
        print(line("batched rows", n, firsts, tokens, wall), flush=True)
        results.append(dict(kind="batched", clients=n, firsts=firsts, tokens=tokens, wall=wall))
    if args.json:
        for r in results:
            print(json.dumps(r))


if __name__ == "__main__":
    main()
