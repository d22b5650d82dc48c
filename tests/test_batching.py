"""Batched generation (mlx_diffgemma/batch.py) and the batching server.

Every row is compared with the same request run alone (``stream_generate``,
``chat``, or the server answering one request at a time), never with itself.
On the random checkpoint sampling is argmax (``settling``), rows of one batch
stop at different steps, and each canvas' tokens follow from its seed's
noise, so a row whose key chain or positions went astray in the batch writes
other tokens. Its sliding window (8) is shorter than the prompts. The server
tests use the trained shift model (examples/shift).
"""

import sys
import threading
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from openai import OpenAI
from reference import CANVAS, VOCAB, build_test_checkpoint
from server_process import launch

from mlx_diffgemma import load
from mlx_diffgemma.batch import Batch
from mlx_diffgemma.cache import merge
from mlx_diffgemma.chat import chat, chat_prompt, commit_answer
from mlx_diffgemma.generate import stream_generate
from mlx_diffgemma.prompts import encode_prompt
from mlx_diffgemma.sampler_params import SamplerParams
from mlx_diffgemma.server.conversations import Conversations
from mlx_diffgemma.server.protocol import parse_request
from mlx_diffgemma.server.worker import Job, Settings, Worker

ROOT = Path(__file__).resolve().parents[1]
SHIFT = ROOT / "examples" / "shift"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return load(str(build_test_checkpoint(tmp_path_factory.mktemp("batching"), seed=1)))


def settling(model) -> SamplerParams:
    """At t ~ 1e-5 sampling is argmax (float rounding cannot flip a token) and
    each canvas' tokens follow from its noise, its seed's; this checkpoint's
    rows then settle at different steps, some not within the 30 allowed."""
    return SamplerParams.resolve(
        model,
        t_min=5e-6,
        t_max=1e-5,
        max_denoising_steps=30,
        eos_token_id=[VOCAB],  # no end of sequence: rows end at their max_tokens
        stability_threshold=1,
        confidence_threshold=0.005,
    )


def ids(start: int, length: int):
    return [(start + 7 * i) % (VOCAB - 10) + 5 for i in range(length)]


def alone(model, tokenizer, prompt, max_tokens, seed, params, cache=None):
    """(tokens, the step each canvas stopped at, the last response) of the request run alone."""
    tokens, steps = [], {}
    for r in stream_generate(model, tokenizer, prompt, max_tokens, seed=seed, params=params, prompt_cache=cache):
        tokens += r.token_ids
        steps[r.canvas_index] = r.step
    return tokens, steps, r


def run(batch, arrivals):
    """Run ``batch`` until empty, adding ``arrivals[k]`` (name, prompt, max_tokens,
    seed) before canvas k. Returns per name (tokens, steps per canvas), the
    canvas of each row's first commit, and the rows left after each canvas."""
    got, first, sizes, k = {}, {}, [], 0
    while k <= max(arrivals) or len(batch):
        for name, prompt, max_tokens, seed in arrivals.get(k, []):
            batch.add(prompt, max_tokens, seed, tag=name)
            got[name] = ([], {})
        for row, r in batch.canvas():
            got[row.tag][0].extend(r.token_ids)
            got[row.tag][1][r.canvas_index] = r.step
            if r.token_ids:
                first.setdefault(row.tag, k)
        sizes.append(len(batch.rows))
        k += 1
    return got, first, sizes


def test_rows_joining_a_running_batch_get_their_solo_tokens(checkpoint):
    model, tokenizer = checkpoint
    params = settling(model)
    # Prompts shorter and longer than the window; "d" is longer than the
    # running batch's context when it joins, so the others are padded further.
    rows = {
        "a": (ids(1, 3), CANVAS, 11),  # one canvas, then it leaves
        "b": (ids(2, 12), 3 * CANVAS, 12),
        "c": (ids(3, 20), 2 * CANVAS + 5, 13),  # its last canvas cut at max_tokens
        "d": (ids(4, 70), 2 * CANVAS, 14),
    }
    arrivals = {0: ["a", "b"], 1: ["c"], 2: ["d"]}
    want = {name: alone(model, tokenizer, p, m, s, params)[:2] for name, (p, m, s) in rows.items()}
    got, first, sizes = run(
        Batch(model, tokenizer, params), {k: [(n, *rows[n]) for n in names] for k, names in arrivals.items()}
    )
    assert got == want
    # Each row committed its first canvas in the canvas it joined, and left when done.
    assert first == {"a": 0, "b": 0, "c": 1, "d": 2}
    assert sizes == [1, 2, 2, 0]
    # Rows sharing a canvas stopped at different steps: held rows' key chains waited.
    assert want["b"][1][1] != want["c"][1][0] or want["b"][1][2] != want["d"][1][0]
    assert len({n: tuple(t) for n, (t, _) in want.items()}) == 4


def test_rows_can_be_merged_filtered_and_taken_back_out(checkpoint):
    model, _ = checkpoint
    caches = []
    for length in (3, 20):
        cache = model.make_cache()
        encode_prompt(model, [ids(length, length)], cache)
        caches.append(cache)
    originals = [[(np.array(c.keys), np.array(c.values), c.offset) for c in cache] for cache in caches]
    merged = merge(caches)
    assert merged.left_padding.tolist() == [17, 0] and merged.offset == 20
    # Sliding layers hold window - 1 places, full ones everything.
    assert [c.length for c in merged] == [7 if c.keep else 20 for c in merged]
    for r, original in enumerate(originals):
        back = merged.extract(r)
        assert back.left_padding is None
        for c, (keys, values, offset) in zip(back, original):
            assert c.offset == offset
            assert np.array_equal(np.array(c.keys), keys) and np.array_equal(np.array(c.values), values)

    # A canvas encoded in the batch is what each row encodes alone.
    canvas = mx.array([ids(50, CANVAS), ids(60, CANVAS)])
    model.encode(canvas, merged)
    for r, cache in enumerate(caches):
        model.encode(canvas[r : r + 1], cache)
    merged.filter([0])  # the short row alone: its padding goes
    assert merged.left_padding is None and merged.offset == 3 + CANVAS
    for c, solo in zip(merged, caches[0]):
        assert c.offset == solo.offset and c.length == solo.length
        assert np.allclose(np.array(c.keys), np.array(solo.keys), atol=1e-5)


def test_a_conversation_taken_back_out_of_the_batch_continues_next_turn(checkpoint):
    model, tokenizer = checkpoint
    params = settling(model)
    messages = [{"role": "user", "content": "hi"}]
    first = chat(model, tokenizer, messages, max_tokens=CANVAS + 3, seed=1, params=params)

    prompt, chat_cache = chat_prompt(model, tokenizer, messages, None)
    batch = Batch(model, tokenizer, params)
    row = batch.add(prompt, CANVAS + 3, 1, chat_cache.cache, keep_cache=True, tag="chat")
    batch.add(ids(9, 40), 4 * CANVAS, 2, tag="other")  # longer: the conversation's row is padded
    text, last = "", None
    while not row.done:
        for r, response in batch.canvas():
            if r is row:
                text, last = text + response.text, response
    assert len(batch.rows) == 1  # the other row goes on; the conversation's is out
    assert text == first.text
    chat_cache.cache = row.cache
    commit_answer(model, tokenizer, chat_cache, last, len(messages) + 1)
    for ours, theirs in zip(chat_cache.cache, first.chat_cache.cache):
        assert ours.offset == theirs.offset and ours.length == theirs.length
        assert np.allclose(np.array(ours.keys), np.array(theirs.keys), atol=1e-5)

    # The next turn, on each cache: the same answer.
    messages += [{"role": "assistant", "content": first.answer}, {"role": "user", "content": "and then?"}]
    kw = dict(max_tokens=2 * CANVAS, seed=3, params=params)
    assert (
        chat(model, tokenizer, messages, chat_cache, **kw).text
        == chat(model, tokenizer, messages, first.chat_cache, **kw).text
    )


def test_a_cancelled_row_leaves_and_a_batch_of_cancelled_rows_stops(checkpoint):
    model, tokenizer = checkpoint
    params = settling(model)
    want, _, _ = alone(model, tokenizer, ids(5, 6), 3 * CANVAS, 5, params)
    batch = Batch(model, tokenizer, params)
    kept = batch.add(ids(5, 6), 3 * CANVAS, 5)
    gone = batch.add(ids(6, 9), 3 * CANVAS, 6)
    tokens = []
    for k in range(3):
        for row, response in batch.canvas():
            assert row is kept or k == 0
            if row is kept:
                tokens += response.token_ids
            if k == 0 and row is gone:
                batch.cancel(gone)
        assert batch.rows == ([kept] if k < 2 else [])
    assert tokens == want
    # Every row cancelled: the canvas ends after the step it was cancelled in.
    lone = batch.add(ids(7, 5), CANVAS, 7)
    steps = 0
    for _ in batch.canvas():
        steps += 1
        batch.cancel(lone)
    assert steps == 1 and len(batch) == 0


# -- The server -------------------------------------------------------------------


def shift_problems(n: int):
    sys.path.insert(0, str(SHIFT))
    import build

    rng = np.random.default_rng(build.SPLITS["test"][1])
    return [build.problem(rng)[0] for _ in range(n)]


@pytest.fixture(scope="module")
def shift_server():
    proc, url = launch(str(SHIFT / "model"), ROOT, "--max-batch-size", "8", "--prompt-cache-size", "4")
    yield url
    proc.terminate()
    proc.wait(timeout=30)


def test_concurrent_clients_get_the_answers_they_get_one_at_a_time(shift_server):
    client = OpenAI(base_url=shift_server + "/v1", api_key="none", max_retries=0, timeout=600)
    problems = shift_problems(5)
    requests = [dict(messages=[{"role": "user", "content": p}], max_tokens=160, seed=i) for i, p in enumerate(problems)]
    requests[1]["max_tokens"] = 40  # leaves early, cut at max_tokens
    requests[2]["stop"] = [problems[2][5:7]]  # cut by a stop string: leaves at the next boundary
    # Off the task: every canvas takes all 48 steps, and the seed decides the text.
    requests.append(dict(messages=[{"role": "user", "content": "hello there"}], max_tokens=64, seed=7))
    requests.append(dict(messages=[{"role": "user", "content": "abc"}], max_tokens=96, seed=8))
    conversation = [{"role": "user", "content": problems[3]}]

    def ask(body):
        r = client.chat.completions.create(model="model", **body)
        extra = r.usage.model_extra
        usage = (r.usage.completion_tokens, extra["denoising_steps"], round(extra["tokens_per_forward"], 3))
        return r.choices[0].message.content, r.choices[0].finish_reason, usage, r.usage.prompt_tokens_details

    def talk():
        """Two turns: the second continues the first's cache, taken out of the batch."""
        one = ask(dict(messages=conversation, max_tokens=160, seed=20))
        follow = conversation + [
            {"role": "assistant", "content": one[0]},
            {"role": "user", "content": problems[4]},
        ]
        two = ask(dict(messages=follow, max_tokens=160, seed=21))
        return one[:3], two[:3], two[3].cached_tokens

    sequential = [ask(body)[:3] for body in requests]
    talk_alone = talk()
    assert talk_alone[2] > 0
    got, errors = {}, []
    barrier = threading.Barrier(len(requests) + 1)

    def client_thread(i):
        try:
            barrier.wait()
            got[i] = talk() if i == len(requests) else ask(requests[i])[:3]
        except Exception as e:  # every client must succeed
            errors.append(repr(e))

    threads = [threading.Thread(target=client_thread, args=(i,)) for i in range(len(requests) + 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    assert errors == []
    assert [got[i] for i in range(len(requests))] == sequential
    assert got[len(requests)] == talk_alone
    assert sequential[1][1] == "length" and sequential[2][1] == "stop"


def test_a_request_joins_a_running_batch_at_its_next_canvas(tmp_path):
    """Fairness: B (the running batch's settings) and then C (other settings)
    arrive while A runs the longest answer. B joins A's batch at its next canvas;
    C, its own batch, runs right after it: no request waits behind one that
    came later, and none waits for the running batch to finish."""
    timeline, lock = [], threading.Lock()

    class Recorded(Job):
        def __init__(self, name, body):
            super().__init__(parse_request("chat", body, 256, {}))
            self.name = name

        def send(self, kind, payload=None):
            if kind == "chunk" and payload["choices"] and payload["choices"][0]["delta"].get("content"):
                with lock:
                    timeline.append(self.name)  # a committed canvas
            super().send(kind, payload)

    worker = Worker(lambda: load(str(SHIFT / "model")), Settings(model_id="m"), Conversations(0))
    worker.start()
    # The answer is as long as the problem before its padding dots.
    problems = sorted(shift_problems(8), key=lambda p: len(p.rstrip(".")))

    def submit(name, content, **fields):
        body = dict(messages=[{"role": "user", "content": content}], stream=True, seed=0, **fields)
        job = Recorded(name, body)
        worker.prepare(job.request)
        worker.submit(job)
        return job

    # Every canvas takes at least 41 steps: a long answer, slowly.
    slow = dict(max_tokens=256, stability_threshold=40)
    a = submit("A", problems[-1], **slow)
    deadline = time.time() + 120
    while "A" not in timeline and time.time() < deadline:
        time.sleep(0.01)
    with lock:
        before_b = timeline.count("A")
    b = submit("B", problems[0], **slow)
    c = submit("C", problems[1], **dict(slow, stability_threshold=39))  # other settings: its own batch
    for job in (a, b, c):
        while job.events.get(timeout=300)[0] != "end":
            pass
    first_b = timeline.index("B")
    # B's first canvas came with A's next one, or the one after (A's canvas
    # running when B arrived); C's first came right after that canvas.
    assert timeline[:first_b].count("A") - before_b <= 2
    assert timeline[first_b + 1] == "C"
    # And A went on meanwhile, to its end after both.
    assert len(timeline) - 1 - timeline[::-1].index("A") > first_b + 1
