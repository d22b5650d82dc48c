"""Many clients, one model: the batching server against interleaving (``--max-batch-size 1``).

    python benchmarks/server_load.py [--model examples/shift/model] [--clients 1 4 16]
        [--batch-sizes 1 8 16] [--stagger 0.1]

For each ``--max-batch-size`` it starts ``python -m mlx_diffgemma.server`` (a
subprocess), and for each number of clients N sends N streaming chat
requests, first all at the same moment, then staggered (client i starts
i x ``--stagger`` seconds after the first, so most arrive while others run);
it reports the time from each client's request to its first committed canvas
(median and worst) and the total tokens per second. The default model is the
trained shift model, whose canvases really converge (random weights never
stop early). The prompts are the shift task's held-out problems, each answer
2 to 5 canvases of 32.
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


def through_server(url: str, model: str, prompts, max_tokens: int, stagger: float = 0.0):
    firsts, tokens, errors = [None] * len(prompts), [0] * len(prompts), []
    start = threading.Barrier(len(prompts) + 1)

    def client(i):
        try:
            start.wait()
            time.sleep(i * stagger)
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


def line(kind, n, firsts, tokens, wall):
    return (
        f"{kind:<22} clients {n:>2}: first canvas median {statistics.median(firsts):6.2f} s, "
        f"worst {max(firsts):6.2f} s; {tokens} tokens in {wall:6.2f} s = {tokens / wall:7.1f} tokens/s"
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(EXAMPLES / "model"))
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument(
        "--batch-sizes", type=int, nargs="+", default=[1, 8, 16], help="--max-batch-size of each server"
    )
    parser.add_argument("--stagger", type=float, default=0.1, help="seconds between staggered clients' arrivals")
    parser.add_argument("--max-tokens", type=int, default=160)
    parser.add_argument("--json", action="store_true", help="also print the numbers as JSON lines")
    args = parser.parse_args()
    results = []
    for size in args.batch_sizes:
        proc, url = serve(args.model, max(args.clients), "--max-batch-size", str(size))
        try:
            through_server(url, args.model, problems(1), args.max_tokens)  # warm up
            for arrival, stagger in (("together", 0.0), ("staggered", args.stagger)):
                for n in args.clients:
                    firsts, tokens, wall = through_server(url, args.model, problems(n), args.max_tokens, stagger)
                    kind = f"batch {size}, {arrival}"
                    print(line(kind, n, firsts, tokens, wall), flush=True)
                    results.append(
                        dict(batch_size=size, arrival=arrival, clients=n, firsts=firsts, tokens=tokens, wall=wall)
                    )
        finally:
            proc.terminate()
            proc.wait()
    if args.json:
        for r in results:
            print(json.dumps(r))


if __name__ == "__main__":
    main()
