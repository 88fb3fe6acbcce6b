#!/usr/bin/env python3
"""Writes the seed corpus of the `gguf_parse` fuzz target: small valid GGUF files written with
the `gguf` Python package (llama.cpp's own writer), and the first 64 KiB of the built-in model.

    python3 model/fuzz/make_seeds.py [OUT_DIR]     # default: model/fuzz/corpus/gguf_parse

The fuzzer starts from these; `cargo fuzz cmin` then keeps what adds coverage in
model/fuzz/corpus/gguf_parse.
"""
import os
import sys
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType as Q, GGUFValueType as V, GGUFWriter
from gguf.constants import GGML_QUANT_SIZES
from gguf.quants import quantize

HERE = Path(__file__).resolve().parent
RNG = np.random.default_rng(5)

SMOLLM_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
    "<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] "
    "+ '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# Uses macros, filters, Python string methods and raise_exception.
FANCY_TEMPLATE = (
    "{% macro turn(m) %}[{{ m.role | upper }}] {{ m.content.strip() }}{% endmacro %}"
    "{{ bos_token }}{% for m in messages %}{% if m.role not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('bad role ' ~ m.role) }}{% endif %}{{ turn(m) }}{{ eos_token }}"
    "{% endfor %}{% if add_generation_prompt %}[ASSISTANT]{% endif %}"
    "{% set n = messages | length %}{{ n * 2 }}{{ messages[0].content | tojson }}"
)


def write(path: Path, arch: str, fill, version: int = 3) -> None:
    writer = GGUFWriter(path, arch)
    fill(writer)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    if version != 3:
        data = bytearray(path.read_bytes())
        data[4:8] = version.to_bytes(4, "little")
        path.write_bytes(bytes(data))


def raw_tensor(writer: GGUFWriter, name: str, shape: list[int], qtype: Q) -> None:
    """Random values of `shape` (numpy order: [rows, row length]) stored as `qtype`."""
    values = RNG.standard_normal(shape).astype(np.float32)
    if qtype == Q.F32:
        writer.add_tensor(name, values)
        return
    if qtype == Q.F16:
        writer.add_tensor(name, values.astype(np.float16))
        return
    try:
        data = quantize(values, qtype)
    except NotImplementedError:
        # Random blocks with small f16 scales where the package cannot quantise.
        block_len, block_bytes = GGML_QUANT_SIZES[qtype]
        blocks = values.size // block_len
        data = RNG.integers(0, 256, size=(blocks, block_bytes), dtype=np.uint8)
        scale = np.float16(0.01).tobytes()
        for offset in {Q.Q4_K: (0, 2), Q.Q6_K: (208,)}[qtype]:
            data[:, offset:offset + 2] = np.frombuffer(scale, dtype=np.uint8)
    # uint8 data of shape [rows, row bytes]; the writer derives the element shape.
    writer.add_tensor(name, data.reshape(shape[:-1] + [-1]), raw_dtype=qtype)


def every_value_type(w: GGUFWriter) -> None:
    w.add_uint8("t.u8", 200)
    w.add_int8("t.i8", -5)
    w.add_uint16("t.u16", 60000)
    w.add_int16("t.i16", -300)
    w.add_uint32("t.u32", 4_000_000_000)
    w.add_int32("t.i32", -70000)
    w.add_float32("t.f32", 0.5)
    w.add_bool("t.bool", True)
    w.add_string("t.string", "héllo")
    w.add_uint64("t.u64", 1 << 40)
    w.add_int64("t.i64", -(1 << 40))
    w.add_float64("t.f64", -2.25)
    w.add_key_value("t.array.u8", [1, 2, 3], V.ARRAY, V.UINT8)
    w.add_key_value("t.array.i16", [-1, 2], V.ARRAY, V.INT16)
    w.add_key_value("t.array.f64", [1.5, -0.25], V.ARRAY, V.FLOAT64)
    w.add_array("t.array.bool", [True, False])
    w.add_array("t.array.string", ["a", "bc", ""])
    w.add_array("t.array.nested", [[1, 2], [3]])
    w.add_array("t.array.nested3", [[["x"], ["y", "z"]], [["w"]]])
    w.add_custom_alignment(64)


def every_tensor_type(w: GGUFWriter) -> None:
    w.add_uint32("general.quantization_version", 2)
    raw_tensor(w, "t.f32", [2, 3], Q.F32)
    raw_tensor(w, "t.f16", [4], Q.F16)
    bf16 = (np.array([1.0, -2.5, 3.0], dtype=np.float32).view(np.uint32) >> 16).astype("<u2")
    w.add_tensor("t.bf16", bf16.view(np.uint8), raw_dtype=Q.BF16)
    raw_tensor(w, "t.q4_0", [2, 32], Q.Q4_0)
    raw_tensor(w, "t.q4_1", [32], Q.Q4_1)
    raw_tensor(w, "t.q8_0", [1, 64], Q.Q8_0)
    raw_tensor(w, "t.q4_k", [256], Q.Q4_K)
    raw_tensor(w, "t.q6_k", [256], Q.Q6_K)
    raw_tensor(w, "t.4d", [1, 2, 1, 3], Q.F32)


def tokenizer(w: GGUFWriter, pre: str, template: str) -> None:
    tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "H", "e", "l", "o", "Ġ", "w",
              "r", "d", "1", "2", "3", "u", "s", "h", "i", "!", "\n", "Ċ", "Â", "¡", "Ã", "¶",
              "He", "ll", "llo", "Hello", "Ġw", "or", "Ġwor", "ld", "us", "er"]
    merges = ["H e", "l l", "ll o", "He llo", "Ġ w", "o r", "Ġw or", "l d", "u s", "e r"]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types([3, 3, 3] + [1] * (len(tokens) - 3))
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_pad_token_id(0)
    w.add_add_bos_token(False)
    w.add_chat_template(template)


def tiny_model(arch: str, pre: str, template: str, rope_freqs: bool, tied: bool):
    def fill(w: GGUFWriter) -> None:
        hidden, heads, kv_heads, ffn, vocab = 8, 2, 1, 16, 35
        head_dim = hidden // heads
        w.add_context_length(64)
        w.add_embedding_length(hidden)
        w.add_block_count(1)
        w.add_feed_forward_length(ffn)
        w.add_head_count(heads)
        w.add_head_count_kv(kv_heads)
        w.add_rope_freq_base(10000.0)
        w.add_layer_norm_rms_eps(1e-5)
        w.add_vocab_size(vocab)
        if arch == "qwen2":
            w.add_key_length(head_dim)
        tokenizer(w, pre, template)
        raw_tensor(w, "token_embd.weight", [vocab, hidden], Q.F32)
        raw_tensor(w, "output_norm.weight", [hidden], Q.F32)
        if not tied:
            raw_tensor(w, "output.weight", [vocab, hidden], Q.F16)
        if rope_freqs:
            w.add_tensor("rope_freqs.weight", np.ones(head_dim // 2, dtype=np.float32))
        p = "blk.0."
        raw_tensor(w, p + "attn_norm.weight", [hidden], Q.F32)
        raw_tensor(w, p + "attn_q.weight", [heads * head_dim, hidden], Q.F32)
        raw_tensor(w, p + "attn_k.weight", [kv_heads * head_dim, hidden], Q.F32)
        raw_tensor(w, p + "attn_v.weight", [kv_heads * head_dim, hidden], Q.F32)
        if arch == "qwen2":
            raw_tensor(w, p + "attn_q.bias", [heads * head_dim], Q.F32)
        raw_tensor(w, p + "attn_output.weight", [hidden, heads * head_dim], Q.F32)
        raw_tensor(w, p + "ffn_norm.weight", [hidden], Q.F32)
        raw_tensor(w, p + "ffn_gate.weight", [ffn, hidden], Q.F32)
        raw_tensor(w, p + "ffn_up.weight", [ffn, hidden], Q.F32)
        raw_tensor(w, p + "ffn_down.weight", [hidden, ffn], Q.F32)
    return fill


def main() -> None:
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else HERE / "corpus" / "gguf_parse"
    out.mkdir(parents=True, exist_ok=True)
    write(out / "every_value_type.gguf", "test", every_value_type)
    write(out / "every_value_type_v2.gguf", "test", every_value_type, version=2)
    write(out / "every_tensor_type.gguf", "test", every_tensor_type)
    write(out / "llama_smollm.gguf", "llama",
          tiny_model("llama", "smollm", SMOLLM_TEMPLATE, rope_freqs=False, tied=True))
    write(out / "llama_bpe_untied.gguf", "llama",
          tiny_model("llama", "llama-bpe", FANCY_TEMPLATE, rope_freqs=True, tied=False))
    write(out / "qwen2.gguf", "qwen2",
          tiny_model("qwen2", "qwen2", SMOLLM_TEMPLATE, rope_freqs=False, tied=True))
    cache = Path(os.environ.get("SHADOWKV_CACHE") or
                 Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "shadowkv")
    model = cache / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if model.is_file():
        with open(model, "rb") as f:
            (out / "smollm2_head_64k.gguf").write_bytes(f.read(64 * 1024))
    for seed in sorted(out.iterdir()):
        print(f"{seed}: {seed.stat().st_size} bytes")


if __name__ == "__main__":
    main()
