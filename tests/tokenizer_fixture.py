"""A small, real Gemma-4-shaped tokenizer written offline, for tests.

`write_test_tokenizer(dirpath)` writes the tokenizer files a checkpoint carries
(tokenizer.json, tokenizer_config.json, special_tokens_map.json, chat_template.jinja)
without any download: a byte-fallback BPE trained in-process on a little inline
English/code text, with Gemma 4's control tokens at their real ids (0 `<pad>`,
1 `<eos>`, 2 `<bos>`, ..., 105 `<|turn>`, 106 `<turn|>`, 107 `\\n`) and the same
normalizer / decoder as Gemma's tokenizer.json (spaces become "▁", no pre-splitting,
decoder Replace("▁"," ") + ByteFallback + Fuse), so mlx-lm picks the same streaming
detokenizer it picks for the real checkpoint.

The text pieces differ from the real 262k vocabulary ("user" is several tokens here,
one in Gemma), so tests compute expected ids from the turn structure with `encode`.

The chat template is our own Jinja text following the Gemma 4 turn structure (see
NOTES.md, "Tokenizer and chat format").
"""

from __future__ import annotations

import atexit
import functools
import json
import shutil
import tempfile
from pathlib import Path

# Gemma 4 control tokens at their real ids. Every other id below FIRST_BYTE_ID is a
# placeholder "<unusedN>" (Gemma also fills its low ids with unused tokens).
SPECIAL_TOKENS = {
    0: "<pad>",
    1: "<eos>",
    2: "<bos>",
    3: "<unk>",
    4: "<mask>",
    46: "<|tool>",
    47: "<tool|>",
    48: "<|tool_call>",
    49: "<tool_call|>",
    50: "<|tool_response>",
    51: "<tool_response|>",
    52: '<|"|>',
    # Image markers, here at low ids (the real ones, 255999 / 258880 / 258882,
    # are beyond this vocabulary): a test checkpoint's config names these.
    60: "<|image>",
    61: "<|image|>",
    62: "<image|>",
    98: "<|think|>",
    100: "<|channel>",
    101: "<channel|>",
    105: "<|turn>",
    106: "<turn|>",
}
BOI_ID, IMAGE_ID, EOI_ID = 60, 61, 62
NEWLINE_ID = 107  # "\n" is an ordinary vocabulary piece at 107, as in Gemma.
FIRST_BYTE_ID = 108  # <0x00> .. <0xFF> follow, then the trained pieces.
TARGET_VOCAB_SIZE = 800

_CORPUS = """\
The quick brown fox jumps over the lazy dog. The dog was not amused, and the fox ran
into the forest where the trees were tall and the river was cold and clear.
Write a long essay about Portugal. Portugal is a country in the south west of Europe,
with a long coast on the Atlantic ocean. Its capital is Lisbon, and Porto is the second
city. People there speak Portuguese, and the food is known for fish, bread and wine.
You are a helpful assistant. Answer the question of the user in a short and clear way.
Think step by step before you answer, and then give the final answer.
What is the weather like in Paris today? It is sunny and warm, about twenty degrees.
The user asked for the temperature, so the model called a tool to get the weather.
Hello! How are you today? I am fine, thank you. What can I do for you?
Let me think about this problem. First we compute the sum, then we divide by the count.
The answer is forty two. The result of the function is returned to the caller.

def get_weather(location: str, unit: str = "celsius") -> dict:
    \"\"\"Return the current weather for a location.\"\"\"
    response = requests.get(f"https://api.example.com/weather?q={location}")
    data = response.json()
    return {"temperature": data["temp"], "unit": unit}

class Tokenizer:
    def __init__(self, vocab, merges):
        self.vocab = vocab
        self.merges = merges

    def encode(self, text):
        return [self.vocab[token] for token in text.split()]

for i in range(10):
    if i % 2 == 0:
        print("even", i)
    else:
        print("odd", i)

import numpy as np
x = np.zeros((4, 4), dtype=np.float32)
y = x + 1.0
print(y.sum(), y.mean(), y.shape)

{"name": "get_weather", "description": "Gets the weather", "parameters": {"type": "object",
 "properties": {"location": {"type": "string"}}, "required": ["location"]}}
call get_weather with location Paris; response temperature 15, unit celsius.
system user model thought tool declaration call response description parameters
properties required type string number integer boolean object array value
"""


def _special_map() -> dict:
    return {
        "bos_token": "<bos>",
        "eos_token": "<eos>",
        "unk_token": "<unk>",
        "pad_token": "<pad>",
        "mask_token": "<mask>",
    }


def _low_id_token(i: int) -> str:
    if i == NEWLINE_ID:
        return "\n"
    return SPECIAL_TOKENS.get(i, f"<unused{i}>")


@functools.lru_cache(maxsize=1)
def _build_tokenizer_json() -> str:
    """Train the BPE once per process and return the serialized tokenizer.json."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    # Train with "\n" and word starts as hard boundaries, so no learned merge contains
    # "\n" (Gemma's newline is always its own token) and pieces look like "▁word".
    trainer_tok = Tokenizer(models.BPE())
    trainer_tok.normalizer = normalizers.Replace(" ", "▁")
    trainer_tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split("\n", behavior="isolated"),
            pre_tokenizers.Split(Regex("▁"), behavior="merged_with_next"),
        ]
    )
    n_fixed = FIRST_BYTE_ID + 256
    trainer = trainers.BpeTrainer(
        vocab_size=TARGET_VOCAB_SIZE - n_fixed,
        show_progress=False,
        min_frequency=2,
    )
    trainer_tok.train_from_iterator(_CORPUS.splitlines(keepends=True), trainer=trainer)
    trained = json.loads(trainer_tok.to_str())["model"]
    trained_vocab = sorted(trained["vocab"].items(), key=lambda kv: kv[1])
    merges = trained["merges"]

    vocab = {_low_id_token(i): i for i in range(FIRST_BYTE_ID)}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = FIRST_BYTE_ID + b
    for piece, _ in trained_vocab:
        if piece not in vocab:
            vocab[piece] = len(vocab)
    assert sorted(vocab.values()) == list(range(len(vocab)))

    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in merges]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    # Gemma's pipeline: spaces become "▁", no real pre-splitting, SPM-style decoder.
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.pre_tokenizer = pre_tokenizers.Split(" ", behavior="merged_with_previous")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    tok.add_special_tokens(
        [AddedToken(_low_id_token(i), special=True, normalized=False) for i in range(FIRST_BYTE_ID) if i != NEWLINE_ID]
    )
    for i in range(FIRST_BYTE_ID):
        assert tok.token_to_id(_low_id_token(i)) == i
    return tok.to_str()


# Our own Jinja text for the Gemma 4 turn structure. Values inside tool declarations,
# calls and responses use Gemma 4's notation: bare keys in sorted order, strings
# wrapped in <|"|>, JSON-schema types upper-cased.
CHAT_TEMPLATE = r"""
{%- macro gvalue(v, key='') -%}
{%- if v is none -%}null
{%- elif v is boolean -%}{{ 'true' if v else 'false' }}
{%- elif v is string -%}<|"|>{{ v | upper if key == 'type' else v }}<|"|>
{%- elif v is mapping -%}{{ '{' }}{%- for k, x in v | dictsort -%}{{ k }}:{{ gvalue(x, k) }}{{ ',' if not loop.last }}{%- endfor -%}{{ '}' }}
{%- elif v is iterable -%}[{%- for x in v -%}{{ gvalue(x) }}{{ ',' if not loop.last }}{%- endfor -%}]
{%- else -%}{{ v }}
{%- endif -%}
{%- endmacro -%}
{%- macro text_of(content) -%}
{%- if content is none -%}
{%- elif content is string -%}{{ content }}
{%- else -%}{%- for part in content -%}{%- if part.type == 'text' -%}{{ part.text }}{%- elif part.type == 'image' -%}<|image|>{%- endif -%}{%- endfor -%}
{%- endif -%}
{%- endmacro -%}
{%- macro drop_thoughts(text) -%}
{%- set parts = text.split('<|channel>') -%}
{{ parts[0] }}
{%- for p in parts[1:] -%}{%- if '<channel|>' in p -%}{{ p.split('<channel|>', 1)[1] }}{%- endif -%}{%- endfor -%}
{%- endmacro -%}
{%- set thinking = enable_thinking is defined and enable_thinking -%}
{{- bos_token -}}
{%- if messages and messages[0].role in ['system', 'developer'] -%}
{%- set system_text = text_of(messages[0].content) | trim -%}
{%- set loop_messages = messages[1:] -%}
{%- else -%}
{%- set system_text = '' -%}
{%- set loop_messages = messages -%}
{%- endif -%}
{%- if thinking or system_text or tools -%}
{{- '<|turn>system\n' -}}
{%- if thinking -%}{{- '<|think|>\n' -}}{%- endif -%}
{{- system_text -}}
{%- for tool in tools or [] -%}
{%- set fn = tool.function if tool.function is defined else tool -%}
{{- '<|tool>declaration:' + fn.name + '{' -}}
{%- if fn.description is defined -%}{{- 'description:' + gvalue(fn.description) -}}{%- endif -%}
{%- if fn.description is defined and fn.parameters is defined -%},{%- endif -%}
{%- if fn.parameters is defined -%}{{- 'parameters:' + gvalue(fn.parameters) -}}{%- endif -%}
{{- '}<tool|>' -}}
{%- endfor -%}
{{- '<turn|>\n' -}}
{%- endif -%}
{%- set ns = namespace(last_user=-1, in_model=false, calls=[], answered=0, last_role='') -%}
{%- for m in loop_messages -%}{%- if m.role == 'user' -%}{%- set ns.last_user = loop.index0 -%}{%- endif -%}{%- endfor -%}
{%- for m in loop_messages -%}
{%- set role = 'model' if m.role == 'assistant' else m.role -%}
{%- if role == 'tool' -%}
{%- if not ns.in_model -%}{{- '<|turn>model\n' -}}{%- set ns.in_model = true -%}{%- endif -%}
{%- if m.name is defined and m.name -%}{%- set name = m.name -%}
{%- elif ns.answered < ns.calls | length -%}{%- set name = ns.calls[ns.answered] -%}
{%- else -%}{%- set name = 'tool' -%}{%- endif -%}
{%- set ns.answered = ns.answered + 1 -%}
{%- if m.content is mapping -%}{%- set body = gvalue(m.content) -%}
{%- else -%}{%- set body = gvalue({'value': text_of(m.content)}) -%}{%- endif -%}
{{- '<|tool_response>response:' + name + body + '<tool_response|>' -}}
{%- else -%}
{%- if ns.in_model and role != 'model' -%}{{- '<turn|>\n' -}}{%- set ns.in_model = false -%}{%- endif -%}
{%- if not ns.in_model -%}{{- '<|turn>' + role + '\n' -}}{%- endif -%}
{%- set text = text_of(m.content) -%}
{%- if role == 'model' and loop.index0 < ns.last_user -%}{%- set text = drop_thoughts(text) -%}{%- endif -%}
{{- text | trim -}}
{%- if role == 'model' and m.tool_calls is defined and m.tool_calls -%}
{%- set ns.calls = [] -%}{%- set ns.answered = 0 -%}
{%- for tc in m.tool_calls -%}
{%- set call = tc.function if tc.function is defined else tc -%}
{%- set ns.calls = ns.calls + [call.name] -%}
{%- set args = call.arguments if call.arguments is defined else {} -%}
{{- '<|tool_call>call:' + call.name + (gvalue(args) if args is mapping else args) + '<tool_call|>' -}}
{%- endfor -%}
{%- endif -%}
{%- if role == 'model' and m.tool_calls is defined and m.tool_calls and not loop.last and loop_messages[loop.index0 + 1].role == 'tool' -%}
{%- set ns.in_model = true -%}
{%- else -%}
{{- '<turn|>\n' -}}{%- set ns.in_model = false -%}
{%- endif -%}
{%- endif -%}
{%- set ns.last_role = role -%}
{%- endfor -%}
{%- if ns.in_model -%}
{%- if not add_generation_prompt -%}{{- '<turn|>\n' -}}{%- endif -%}
{%- elif add_generation_prompt -%}
{{- '<|turn>model\n' -}}
{%- if not thinking -%}{{- '<|channel>thought\n<channel|>' -}}{%- endif -%}
{%- endif -%}
"""


def _write(dirpath: Path, tokenizer_json: str) -> None:
    dirpath.mkdir(parents=True, exist_ok=True)
    (dirpath / "tokenizer.json").write_text(tokenizer_json, encoding="utf-8")
    added = {
        str(i): {
            "content": _low_id_token(i),
            "lstrip": False,
            "rstrip": False,
            "normalized": False,
            "single_word": False,
            "special": True,
        }
        for i in range(FIRST_BYTE_ID)
        if i != NEWLINE_ID
    }
    config = {
        "tokenizer_class": "GemmaTokenizer",
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 262144,
        "padding_side": "left",
        "added_tokens_decoder": added,
        **_special_map(),
    }
    (dirpath / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    (dirpath / "special_tokens_map.json").write_text(json.dumps(_special_map(), indent=2), encoding="utf-8")
    # transformers 5 reads (and writes) the template as chat_template.jinja beside the
    # tokenizer files; mlx-lm gets it through transformers.
    (dirpath / "chat_template.jinja").write_text(CHAT_TEMPLATE.strip() + "\n", encoding="utf-8")


@functools.lru_cache(maxsize=1)
def _cached_dir() -> Path:
    d = Path(tempfile.mkdtemp(prefix="diffgemma_tok_"))
    atexit.register(shutil.rmtree, d, True)
    _write(d, _build_tokenizer_json())
    return d


def write_test_tokenizer(dirpath: Path) -> Path:
    """Write tokenizer.json, tokenizer_config.json, special_tokens_map.json and
    chat_template.jinja into `dirpath` (created if needed) and return it.

    The BPE is trained once per process and then copied, so repeated calls are cheap.
    """
    dirpath = Path(dirpath)
    dirpath.mkdir(parents=True, exist_ok=True)
    src = _cached_dir()
    for f in src.iterdir():
        shutil.copyfile(f, dirpath / f.name)
    return dirpath
