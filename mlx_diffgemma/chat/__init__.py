"""Multi-turn chat on a chat cache that keeps the conversation encoded."""

from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Optional

import mlx.core as mx

from ..cache import PromptCache
from ..chat_template import render
from ..generate import GenerationResponse, stream_generate
from ..image_prompts import PromptImage, prepare_images, split_message_images
from ..model import Model
from ..thinking import END_OF_TURN, split_thinking


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
    # The images the cache holds, in order (their digests): the same ids with
    # another picture are another conversation.
    images: List[str] = field(default_factory=list)


@dataclass
class ChatResponse:
    text: str  # everything generated, markers kept
    answer: str  # without the thought channel and end-of-turn marker
    thought: Optional[str]
    chat_cache: ChatCache
    prompt_tokens: int  # tokens encoded for this turn
    last: Optional[GenerationResponse] = field(default=None, repr=False)


def chat_prompt(
    model: Model,
    tokenizer,
    messages: List[Dict[str, Any]],
    chat_cache: Optional[ChatCache],
    images: Optional[List[List[PromptImage]]] = None,
    **template_kwargs,
) -> tuple:
    """The tokens to encode for ``messages`` and the cache to encode them into.

    With a cache holding an earlier part of the conversation, only what comes
    after it is returned. If the rendered conversation does not extend what the
    cache holds (edited history, another template setting, another image:
    ``images`` lists each message's), the cache is started afresh.
    """
    full = render(tokenizer, messages, True, **template_kwargs)
    if chat_cache is None or chat_cache.messages == 0:
        return full, ChatCache(model.make_cache())
    held = [image.digest for row in (images or [])[: chat_cache.messages] for image in row]
    if len(messages) > chat_cache.messages and held == chat_cache.images:
        cached = render(tokenizer, messages[: chat_cache.messages], False, **template_kwargs)
        rest = continuation(full, cached, chat_cache.stop_token)
        if rest is not None:
            return rest, chat_cache
    return full, ChatCache(model.make_cache())


def continuation(full: List[int], cached: List[int], stop: Optional[int]) -> Optional[List[int]]:
    """What to encode after a cache whose conversation renders as ``cached``.

    The cache ends with the answer's stop token where the rendering closes the
    turn (Gemma 4: ``<turn|>`` then a newline), so it continues with what
    follows the last ``stop`` in ``cached``, then the new part of ``full``.
    None when ``full`` does not extend ``cached``.
    """
    if stop is None or len(full) <= len(cached) or full[: len(cached)] != cached or stop not in cached:
        return None
    after_stop = len(cached) - cached[::-1].index(stop)
    return cached[after_stop:] + full[len(cached) :]


def commit_answer(
    model: Model,
    tokenizer,
    chat_cache: ChatCache,
    last: GenerationResponse,
    messages: int,
    images: Optional[List[str]] = None,
):
    """Close the answer in ``chat_cache`` so the next turn continues it.

    Earlier canvases were encoded during generation, the last one was not:
    it goes in now, closed by its stop token (an end of turn when the answer
    ran out of tokens). ``messages`` is how many messages the cache now holds,
    ``images`` the digests of the images among them.
    """
    stop = last.stop_token
    if stop is None:
        stop = tokenizer.convert_tokens_to_ids(END_OF_TURN)
    model.encode(mx.array([last.token_ids + [stop]]), chat_cache.cache)
    mx.eval([c.state for c in chat_cache.cache])
    chat_cache.messages = messages
    chat_cache.stop_token = stop
    chat_cache.images = list(images or [])


def stream_chat(
    model: Model,
    tokenizer,
    messages: List[Dict[str, Any]],
    chat_cache: Optional[ChatCache] = None,
    enable_thinking: bool = False,
    tools: Optional[List[Any]] = None,
    chat_template_kwargs: Optional[Dict[str, Any]] = None,
    **kwargs,
) -> Iterator[GenerationResponse]:
    """``stream_generate`` for a conversation; ``kwargs`` go to it
    (``max_tokens``, ``seed``, ``params`` or the sampler settings).

    A message's content may list image parts beside its text parts:
    ``{"type": "image", "image": PATH_URL_BYTES_OR_PIL}`` or OpenAI's
    ``{"type": "image_url", "image_url": {"url": URL}}``.

    Once the stream is exhausted, its last response carries ``chat_cache``
    (a ``ChatCache``) for the next turn.
    """
    if tokenizer is None:
        raise ValueError("chat needs a tokenizer with a chat template")
    template_kwargs = dict(chat_template_kwargs or {}, enable_thinking=enable_thinking)
    if tools is not None:
        template_kwargs["tools"] = tools
    messages, sources = split_message_images(messages)
    images = [prepare_images(model, row) if row else [] for row in sources]
    given = chat_cache
    prompt, chat_cache = chat_prompt(model, tokenizer, messages, chat_cache, images, **template_kwargs)
    every = [image for row in images for image in row]
    # Only the images after what the cache holds are encoded.
    new = every[len(chat_cache.images) :] if chat_cache is given else every

    last = None
    for last in stream_generate(model, tokenizer, prompt, prompt_cache=chat_cache.cache, images=new, **kwargs):
        yield last

    commit_answer(model, tokenizer, chat_cache, last, len(messages) + 1, [image.digest for image in every])
    # Set once the stream is exhausted, on the response it yielded last.
    last.chat_cache = chat_cache


def chat(
    model: Model,
    tokenizer,
    messages: List[Dict[str, Any]],
    chat_cache: Optional[ChatCache] = None,
    enable_thinking: bool = False,
    tools: Optional[List[Any]] = None,
    **kwargs,
) -> ChatResponse:
    """Answer the last message of ``messages``.

    Pass the returned ``chat_cache`` with the next call (the messages so far,
    this answer as an ``assistant`` message, and the new message) so that only
    the new turn is encoded. ``kwargs`` as ``stream_chat`` takes them.
    """
    text, last = "", None
    for last in stream_chat(model, tokenizer, messages, chat_cache, enable_thinking, tools, **kwargs):
        text += last.text
    thought, answer = split_thinking(text)
    return ChatResponse(text, answer, thought, last.chat_cache, last.prompt_tokens, last)
