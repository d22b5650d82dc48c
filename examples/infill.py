"""Write a function body between its signature and its return.

    python examples/infill.py [MODEL]

The model sees the code before the gap (encoded) and, in the same canvas as
the gap, the code after it; it chooses the gap's length itself (pass
``length=`` to fix it). MODEL as in examples/generate.py; on
examples/shift/model, which only knows its two toy tasks, it runs but the
code it writes is noise.
"""

import sys

from mlx_diffgemma import load
from mlx_diffgemma.infill import last, stream_infill

model_path = sys.argv[1] if len(sys.argv) > 1 else "google/diffusiongemma-26B-A4B-it"
model, tokenizer = load(model_path)

prefix = 'def mean(values):\n    """The arithmetic mean of a non-empty list of numbers."""\n'
suffix = "\n    return total / len(values)\n"
# Code, not a conversation: raw text (the prefix is read after <bos>), as editor plugins send it.
result = last(stream_infill(model, tokenizer, prefix, suffix, seed=0))
print(prefix + result.text + suffix, end="")
print(f"# {result.length} tokens written in {result.denoising_steps} denoising steps")
