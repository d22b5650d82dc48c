"""chat(): the template applied, answers split, and follow-ups encoding only new tokens."""

import mlx.core as mx
import numpy as np
import pytest
from reference import build_test_checkpoint

from mlx_diffgemma import load
from mlx_diffgemma.chat import chat, chat_prompt, stream_chat

KW = dict(max_denoising_steps=3)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return load(str(build_test_checkpoint(tmp_path_factory.mktemp("chat"), seed=2)))


def test_first_turn_uses_the_chat_template(checkpoint):
    model, tokenizer = checkpoint
    messages = [{"role": "user", "content": "hi"}]
    prompt, _ = chat_prompt(model, tokenizer, messages, None, enable_thinking=False)
    assert prompt == tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    # Gemma 4, thinking off: the prompt ends by opening and closing an empty thought channel.
    assert prompt[:2] == [2, 105] and prompt[-2:] == [107, 101] and 100 in prompt[-8:]
    thinking, _ = chat_prompt(model, tokenizer, messages, None, enable_thinking=True)
    assert 98 in thinking and 100 not in thinking


def test_follow_up_encodes_only_the_new_turn(checkpoint):
    model, tokenizer = checkpoint
    messages = [{"role": "user", "content": "hi"}]
    first = chat(model, tokenizer, messages, max_tokens=20, seed=0, **KW)
    assert first.prompt_tokens == len(tokenizer.apply_chat_template(messages, add_generation_prompt=True))

    messages += [{"role": "assistant", "content": first.answer}, {"role": "user", "content": "and then?"}]
    full = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    second = chat(model, tokenizer, messages, chat_cache=first.chat_cache, max_tokens=20, seed=1, **KW)
    assert second.chat_cache is first.chat_cache
    new_turn = tokenizer.apply_chat_template(messages[-1:], add_generation_prompt=True)
    assert second.prompt_tokens < len(full) / 2
    # the newline closing the previous turn, then the new turn without <bos>
    assert second.prompt_tokens == 1 + len(new_turn) - 1

    # Both answers and their stop tokens are in the cache, and nothing twice.
    assert second.chat_cache.cache.offset == (
        first.prompt_tokens
        + first.last.generation_tokens
        + 1
        + second.prompt_tokens
        + second.last.generation_tokens
        + 1
    )


def test_incremental_cache_equals_encoding_the_conversation_at_once(checkpoint):
    model, tokenizer = checkpoint
    messages = [{"role": "user", "content": "tell me"}]
    responses = list(stream_chat(model, tokenizer, messages, max_tokens=40, seed=3, **KW))
    ids_first = [t for r in responses for t in r.token_ids]
    first = responses[-1]
    prompt1 = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    stop = first.stop_token if first.stop_token is not None else 106
    tokens = prompt1 + ids_first + [stop]

    cache = first.chat_cache.cache
    assert cache.offset == len(tokens)
    fresh = model.make_cache()
    model.encode(mx.array([tokens]), fresh)
    for ours, theirs in zip(cache, fresh):
        np.testing.assert_allclose(np.array(ours.keys), np.array(theirs.keys), atol=1e-4)


def test_tools_reach_the_template(checkpoint):
    model, tokenizer = checkpoint
    tools = [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "description": "Weather for a city",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
            },
        }
    ]
    messages = [{"role": "user", "content": "weather?"}]
    prompt, _ = chat_prompt(model, tokenizer, messages, None, tools=tools, enable_thinking=False)
    assert 46 in prompt and 47 in prompt  # <|tool> ... <tool|>
    assert "get_weather" in tokenizer.decode(prompt)


def test_system_prompt_and_answer_split(checkpoint):
    model, tokenizer = checkpoint
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    prompt, _ = chat_prompt(model, tokenizer, messages, None, enable_thinking=False)
    assert "<|turn>system\nbe brief" in tokenizer.decode(prompt)
    r = chat(model, tokenizer, messages, max_tokens=16, seed=4, **KW)
    assert r.text  # raw text, markers kept
    for marker in ("<|channel>", "<channel|>", "<turn|>"):
        assert marker not in r.answer
