"""Reference token ids for model/tests/tokenizer.rs (`known_ids`), computed three independent ways
from the built-in SmolLM2-135M-Instruct GGUF, which must agree:
 (a) transformers' AutoTokenizer built from the GGUF (its GGUF converter: ByteLevel only),
 (b) the Python `tokenizers` package with SmolLM2's tokenizer.json pre-tokenizer,
     Sequence[Digits(individual_digits=True), ByteLevel(add_prefix_space=False)], and the GGUF's
     vocabulary and merges,
 (c) a pure-Python GPT-2 BPE (the algorithm of openai's encoder.py) after llama.cpp's smollm
     regexes (each digit alone, then GPT-2's pattern).
Also checks that transformers' apply_chat_template gives the prompt the test expects.

    python3 -m venv /tmp/tokref
    /tmp/tokref/bin/pip install transformers gguf sentencepiece protobuf jinja2
    /tmp/tokref/bin/python model/tests/data/tokenizer_reference.py
(transformers 5.23, tokenizers 0.23.3, gguf 0.19.0; torch is not needed: a stand-in is used below.)
"""
import json
import os
import sys
import types

import regex
from gguf import GGUFReader

path = os.path.join(os.path.expanduser("~/.cache/shadowkv"), "SmolLM2-135M-Instruct.Q4_1.gguf")
r = GGUFReader(path)
tokens = r.fields["tokenizer.ggml.tokens"].contents()
merges = r.fields["tokenizer.ggml.merges"].contents()
types_ = r.fields["tokenizer.ggml.token_type"].contents()
specials = [t for t, k in zip(tokens, types_) if k in (3, 4)]
vocab = {t: i for i, t in enumerate(tokens)}

chat = ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n")
cases = ["Hello, world!", "The year 2024 had 366 days.", "  indented\n\tline\n\n  end",
         "Café naïve — 東京 🦀", "I'm sure they'll say it's fine.", chat]

# (b)
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

tb = Tokenizer(models.BPE(vocab, [tuple(m.split(" ", 1)) for m in merges]))
tb.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                            pre_tokenizers.ByteLevel(add_prefix_space=False)])
tb.decoder = decoders.ByteLevel()
tb.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
ids_b = [tb.encode(s, add_special_tokens=False).ids for s in cases]


# (c)
def bytes_to_unicode():
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


byte_enc = bytes_to_unicode()
ranks = {tuple(m.split(" ", 1)): i for i, m in enumerate(merges)}


def bpe(word):
    parts = list(word)
    while len(parts) > 1:
        rank, i = min((ranks.get(p, 1 << 60), i) for i, p in enumerate(zip(parts, parts[1:])))
        if rank == 1 << 60:
            break
        pair = (parts[i], parts[i + 1])
        out, j = [], 0
        while j < len(parts):
            if j + 1 < len(parts) and (parts[j], parts[j + 1]) == pair:
                out.append(parts[j] + parts[j + 1])
                j += 2
            else:
                out.append(parts[j])
                j += 1
        parts = out
    return parts


gpt2 = regex.compile(r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""")
special_re = regex.compile("(" + "|".join(regex.escape(s) for s in specials) + ")")


def encode_c(text):
    ids = []
    for k, chunk in enumerate(special_re.split(text)):
        if k % 2:
            ids.append(vocab[chunk])
            continue
        for piece in regex.split(r"(\p{N})", chunk):
            for word in gpt2.findall(piece):
                ids += [vocab[t] for t in bpe("".join(byte_enc[b] for b in word.encode()))]
    return ids


ids_c = [encode_c(s) for s in cases]

# (a)
from transformers import AutoTokenizer
import transformers.modeling_gguf_pytorch_utils as gguf_utils


class _Anything:
    def __getattr__(self, name):
        return _Anything()


# transformers' GGUF reader imports torch for weights only; the tokenizer path never uses it.
torch = types.ModuleType("torch")
torch.__getattr__ = lambda name: _Anything()
torch.Tensor = type("Tensor", (), {})
torch.dtype = type("dtype", (), {})
sys.modules["torch"] = torch
gguf_utils.is_torch_available = lambda: True
ta = AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
ids_a = [ta.encode(s, add_special_tokens=False) for s in cases]
rendered = ta.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  tokenize=False, add_generation_prompt=True)
assert rendered == chat, rendered

for s, a, b, c in zip(cases, ids_a, ids_b, ids_c):
    assert a == b == c, (s, a, b, c)
    assert tb.decode(b, skip_special_tokens=False) == s
    print(json.dumps(s, ensure_ascii=False), b)
