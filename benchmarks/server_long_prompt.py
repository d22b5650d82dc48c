"""What a huge prompt costs the requests already generating on the server.

    python benchmarks/server_long_prompt.py [--model examples/shift/model] [--megabytes 2]

One client streams a completion whose canvases take all their steps
(``stability_threshold`` out of reach), with a draft event per step; the time
between its events is the server's step time. Once it runs, a second client
sends a chat message of ``--megabytes`` MB, which the server must tokenize
before it can refuse it as longer than the context. Prints the streaming
client's median and longest gap between steps, alone and beside the huge
prompt, and how long the huge prompt took to be refused.
"""

import argparse
import json
import statistics
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

from server_load import serve

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "shift"


def step_times(url: str, model: str, steps: int, tokens: int, started: threading.Event) -> list:
    body = {
        "model": model,
        "prompt": "zq xv",
        "max_tokens": tokens,
        "max_denoising_steps": steps,
        "stability_threshold": 10**6,
        "stream": True,
        "stream_options": {"include_drafts": True},
        "seed": 0,
    }
    request = urllib.request.Request(url + "/completions", data=json.dumps(body).encode(), method="POST")
    request.add_header("Content-Type", "application/json")
    times = []
    with urllib.request.urlopen(request, timeout=3600) as r:
        for line in r:
            if line.startswith(b"data: {") and b'"draft"' in line:
                times.append(time.perf_counter())
                if len(times) == 3:
                    started.set()
    return times


def gaps(times: list, start: float = 0.0, end: float = float("inf")) -> list:
    """The gaps between step events that end inside [start, end]."""
    return [b - a for a, b in zip(times, times[1:]) if start <= b <= end]


def huge_prompt(url: str, model: str, megabytes: float) -> tuple:
    text = "fox " * int(megabytes * 1e6 / 4)
    body = {"model": model, "messages": [{"role": "user", "content": text}], "max_tokens": 8}
    request = urllib.request.Request(url + "/chat/completions", data=json.dumps(body).encode(), method="POST")
    request.add_header("Content-Type", "application/json")
    tic = time.perf_counter()
    try:
        with urllib.request.urlopen(request, timeout=3600) as r:
            status = r.status
    except urllib.error.HTTPError as e:
        status = e.code
    return status, tic, time.perf_counter()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(EXAMPLES / "model"))
    parser.add_argument("--megabytes", type=float, default=2.0)
    parser.add_argument("--steps", type=int, default=48)
    parser.add_argument("--max-tokens", type=int, default=256, help="long enough to outlast the huge prompt")
    args = parser.parse_args()
    proc, url = serve(args.model, 2, "--max-request-bytes", str(int(args.megabytes * 1e6) + 65536))
    try:
        alone = gaps(step_times(url, args.model, args.steps, args.max_tokens, threading.Event()))
        started, result = threading.Event(), {}
        stream = threading.Thread(
            target=lambda: result.update(times=step_times(url, args.model, args.steps, args.max_tokens, started))
        )
        stream.start()
        if not started.wait(600):
            sys.exit("the streaming client saw no step events within 600 s")
        status, sent, answered = huge_prompt(url, args.model, args.megabytes)
        stream.join()
    finally:
        proc.terminate()
        proc.wait()
    times = result["times"]
    if times[-1] < answered:
        sys.exit(f"the stream ended before the huge prompt was answered: raise --max-tokens (now {args.max_tokens})")
    beside = gaps(times, sent, answered)
    for name, values in (("alone", alone), (f"while the {args.megabytes:g} MB prompt is read", beside)):
        print(
            f"step gap {name}: median {statistics.median(values) * 1000:.1f} ms, "
            f"longest {max(values) * 1000:.1f} ms ({len(values)} steps)"
        )
    print(f"the {args.megabytes:g} MB prompt: HTTP {status} after {answered - sent:.2f} s")


if __name__ == "__main__":
    sys.exit(main())
