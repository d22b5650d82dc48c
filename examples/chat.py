"""A conversation of two turns; the follow-up encodes only its new message.

python examples/chat.py [MODEL]
"""

import sys

from mlx_diffgemma import chat, load

model_path = sys.argv[1] if len(sys.argv) > 1 else "google/diffusiongemma-26B-A4B-it"
model, tokenizer = load(model_path)

messages = [{"role": "user", "content": "Name three rivers in Portugal."}]
reply = chat(model, tokenizer, messages, max_tokens=512)
print(reply.answer)

# Add the answer and the next question, and pass the cache back: the
# conversation so far stays encoded.
messages += [
    {"role": "assistant", "content": reply.answer},
    {"role": "user", "content": "Which of them is the longest?"},
]
reply = chat(model, tokenizer, messages, chat_cache=reply.chat_cache, max_tokens=512)
print(reply.answer)
print(f"(the follow-up encoded {reply.prompt_tokens} new tokens)")

# With enable_thinking=True the model thinks first; reply.thought holds it.
