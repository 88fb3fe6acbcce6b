# Independent reference: SmolLM2 forward in numpy (float64) straight from the GGUF, with
# llama.cpp's own RoPE convention (adjacent pairs on the permuted Q/K rows), no un-permutation.
# With NUMPY_LOGITS_OUT=path it also writes every logit there as little-endian f64.
import os, sys, numpy as np, gguf
from gguf.quants import dequantize
r = gguf.GGUFReader(sys.argv[1])
T = {t.name: t for t in r.tensors}
def W(name):
    t = T[name]
    a = dequantize(t.data, t.tensor_type).astype(np.float64)
    return a.reshape([int(d) for d in reversed(t.shape)]) if a.ndim != 2 else a
f = lambda k: r.fields[k].contents()
L, H, KV = f('llama.block_count'), f('llama.attention.head_count'), f('llama.attention.head_count_kv')
D = f('llama.embedding_length') // H; eps = f('llama.attention.layer_norm_rms_epsilon'); theta = f('llama.rope.freq_base')
ids = [int(a) for a in sys.argv[2:]]
n = len(ids)
x = W('token_embd.weight')[ids]
def rms(x, w): return x / np.sqrt((x*x).mean(-1, keepdims=True) + eps) * w
inv = theta ** (-np.arange(0, D, 2) / D)
ang = np.arange(n)[:, None] * inv[None, :]
cos, sin = np.cos(ang), np.sin(ang)
def rope(v, heads):  # v [n, heads*D], adjacent pairs
    v = v.reshape(n, heads, D // 2, 2)
    a, b = v[..., 0], v[..., 1]
    c, s = cos[:, None, :], sin[:, None, :]
    return np.stack([a*c - b*s, b*c + a*s], -1).reshape(n, heads*D)
mask = np.triu(np.full((n, n), -np.inf), 1)
for l in range(L):
    p = f'blk.{l}.'
    h = rms(x, W(p+'attn_norm.weight'))
    q = rope(h @ W(p+'attn_q.weight').T, H); k = rope(h @ W(p+'attn_k.weight').T, KV); v = h @ W(p+'attn_v.weight').T
    out = np.zeros((n, H*D))
    for hh in range(H):
        g = hh // (H // KV)
        s = q[:, hh*D:(hh+1)*D] @ k[:, g*D:(g+1)*D].T / np.sqrt(D) + mask
        s = np.exp(s - s.max(-1, keepdims=True)); s /= s.sum(-1, keepdims=True)
        out[:, hh*D:(hh+1)*D] = s @ v[:, g*D:(g+1)*D]
    x = x + out @ W(p+'attn_output.weight').T
    h = rms(x, W(p+'ffn_norm.weight'))
    gt = h @ W(p+'ffn_gate.weight').T
    x = x + ((gt / (1 + np.exp(-gt))) * (h @ W(p+'ffn_up.weight').T)) @ W(p+'ffn_down.weight').T
h = rms(x[-1], W('output_norm.weight'))
logits = h @ W('token_embd.weight').T
if os.environ.get('NUMPY_LOGITS_OUT'): logits.astype('<f8').tofile(os.environ['NUMPY_LOGITS_OUT'])
o = np.argsort(-logits)[:8]
print("top", [(int(i), round(float(logits[i]),4)) for i in o])
probe = [0, 1, 2, 17, 999, 4096, 12345, 30000, 49151]
print("probe", [round(float(logits[i]),4) for i in probe])
print("norm", float(np.linalg.norm(logits)))
