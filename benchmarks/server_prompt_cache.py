"""The second turn of a conversation through the server, with its prompt cache and without.

    python benchmarks/server_prompt_cache.py [--model examples/shift/model] [--history-chars 3000]

Sends a first turn with a long user message, then resends the conversation with
the answer and one more user turn (as OpenAI clients do), against a server that
keeps conversations (``--prompt-cache-size 4``) and one that keeps none
(``--prompt-cache-size 0``). Each turn runs one denoising step of one canvas
(``max_denoising_steps: 1``, ``max_tokens`` one canvas), so its time is mostly
the prompt's encoding. Prints the prompt tokens, the cached tokens and the time
of each second turn (median of 5 conversations).
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

from openai import OpenAI
from server_load import serve

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "shift"


def second_turns(url, model, history_chars: int, conversations: int = 5):
    client = OpenAI(base_url=url, api_key="none", timeout=3600)
    times, usage = [], None
    for c in range(conversations):
        first = [{"role": "user", "content": ("abc%d " % c) * (history_chars // 5)}]
        params = dict(model=model, max_tokens=32, seed=c, extra_body={"max_denoising_steps": 1})
        answer = client.chat.completions.create(messages=first, **params).choices[0].message.content
        messages = first + [{"role": "assistant", "content": answer}, {"role": "user", "content": "xyz"}]
        tic = time.perf_counter()
        usage = client.chat.completions.create(messages=messages, **params).usage
        times.append(time.perf_counter() - tic)
    return statistics.median(times), usage


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(EXAMPLES / "model"))
    parser.add_argument("--history-chars", type=int, default=3000)
    args = parser.parse_args()
    for size in (4, 0):
        proc, url = serve(args.model, 1, "--prompt-cache-size", str(size))
        try:
            seconds, usage = second_turns(url, args.model, args.history_chars)
        finally:
            proc.terminate()
            proc.wait()
        print(
            f"--prompt-cache-size {size}: second turn {seconds * 1000:7.1f} ms "
            f"(prompt {usage.prompt_tokens} tokens, {usage.prompt_tokens_details.cached_tokens} cached)",
            flush=True,
        )


if __name__ == "__main__":
    sys.exit(main())
