"""Rewrite one span of a text, the rest held fixed.

    python examples/edit.py [MODEL]

The span is renoised and denoised in place; the text around it stays as it
is, and the instruction goes in the user turn of the chat template. MODEL as
in examples/generate.py (on examples/shift/model the rewrite is noise: it
only knows its toy tasks).
"""

import sys

from mlx_diffgemma import edit, load

model_path = sys.argv[1] if len(sys.argv) > 1 else "google/diffusiongemma-26B-A4B-it"
model, tokenizer = load(model_path)

text = "The team meets on Monday at 10:00 in room 4 to plan the release.\n"
start = text.index("Monday")
span = (start, start + len("Monday"))

result = edit(model, tokenizer, text, [span], instruction="Move the meeting to Friday.", lengths=[2], seed=0)
((new_start, new_end),) = result.spans
print(result.text, end="")
print(f"# {text[span[0] : span[1]]!r} became {result.text[new_start:new_end]!r}")
