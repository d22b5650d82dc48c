"""Answer several prompts at once, as one batch.

    python examples/batch.py [MODEL]

Rows are left-padded to one length and finish independently; each row draws
from its own seed (seed + row), so a row gives in a batch what it gives alone.
"""

import sys

from mlx_diffgemma import generate, load

model_path = sys.argv[1] if len(sys.argv) > 1 else "google/diffusiongemma-26B-A4B-it"
model, tokenizer = load(model_path)

questions = [
    "What is the capital of Portugal?",
    "Write a limerick about a cat.",
    "List three prime numbers.",
]
prompts = [
    tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=False)
    for q in questions
]

answers = generate(model, tokenizer, prompts, max_tokens=256, seed=0)
for question, answer in zip(questions, answers):
    print(f"Q: {question}\nA: {answer}\n")
