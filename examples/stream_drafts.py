"""Stream a generation, drafts included: what a UI shows while the model works.

    python examples/stream_drafts.py [MODEL]

DiffusionGemma denoises a whole canvas of tokens over several steps, then
commits it and starts the next one. Every step yields a response: during
denoising ``response.draft`` is the canvas's current best guess (text that can
still change); when a canvas is committed, ``response.text`` is final.
"""

import sys

from mlx_diffgemma import load, stream_generate

model_path = sys.argv[1] if len(sys.argv) > 1 else "google/diffusiongemma-26B-A4B-it"
model, tokenizer = load(model_path)

messages = [{"role": "user", "content": "Explain block diffusion in two sentences."}]
prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

committed = ""
for response in stream_generate(model, tokenizer, prompt, max_tokens=512, seed=0):
    if response.token_ids or response.finish_reason:
        committed += response.text  # final: append it to the transcript
        print(f"[canvas {response.canvas_index} committed] {response.text!r}")
    else:
        # A UI would show `committed + draft`, the draft styled as provisional.
        draft = response.draft  # decoded on access: read it only when you show it
        print(f"[canvas {response.canvas_index}, step {response.step}] {draft[:60]!r}")

print()
print(committed)
print(
    f"{response.generation_tokens} tokens, {response.generation_tps:.1f} tokens/s, "
    f"{response.denoising_steps} denoising steps, finish: {response.finish_reason}"
)
