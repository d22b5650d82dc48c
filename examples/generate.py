"""Generate a reply to one prompt.

    python examples/generate.py [MODEL]

MODEL is a local directory or a Hugging Face repo (default: the official one,
51.6 GB in bf16; for a smaller Mac, convert a 4-bit copy first with
`python -m mlx_diffgemma.convert --q-bits 4` and pass its directory).
"""

import sys

from mlx_diffgemma import generate, load

model_path = sys.argv[1] if len(sys.argv) > 1 else "google/diffusiongemma-26B-A4B-it"
model, tokenizer = load(model_path)

messages = [{"role": "user", "content": "Write a haiku about the sea."}]
prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

text = generate(model, tokenizer, prompt, max_tokens=256)
print(text)
# generate(..., verbose=True) prints the text as it is committed, then speed and memory.
