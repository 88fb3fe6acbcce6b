//! Structured synthetic prompts for the tests: keys with the low-rank structure of real ones
//! (RoPE applied), optionally a needle chunk, and values with the channel structure of real
//! ones ([`structured_values`]).
use half::bf16;
use rand::{rngs::StdRng, Rng, SeedableRng};
use shadowkv::cache::{CacheCapacity, CacheShape, ShadowKvParams};
use shadowkv::cudarc::driver::CudaSlice;
use shadowkv::decode_step::inverse_frequencies;
use shadowkv::kernels::shadow_prefill::PrefillSource;
use shadowkv::reference;
use shadowkv::{Gpu, RopeConfig, SequenceLayout};

use crate::random_bf16;

/// One prompt on the host: pre-RoPE keys `[L, Hkv*d]`, post-RoPE keys and values in a source
/// layout `[Hkv, capacity, d]` from `offset`, the last query `[Hq, d]`.
pub struct Prompt {
    pub len: usize,
    pub pre_rope: Vec<bf16>,
    pub keys: Vec<bf16>,
    pub values: Vec<bf16>,
    pub layout: SequenceLayout,
    pub last_query: Vec<bf16>,
}

/// A [`Prompt`] on the GPU.
pub struct Uploaded {
    pub pre_rope: CudaSlice<bf16>,
    pub keys: CudaSlice<bf16>,
    pub values: CudaSlice<bf16>,
    pub last_query: CudaSlice<bf16>,
    pub layout: SequenceLayout,
}

impl Uploaded {
    pub fn source(&self) -> PrefillSource<'_, CudaSlice<bf16>> {
        PrefillSource {
            keys: &self.keys,
            values: &self.values,
            layout: self.layout,
        }
    }
}

impl Prompt {
    pub fn upload(&self, gpu: &Gpu) -> Result<Uploaded, String> {
        let stream = gpu.stream();
        Ok(Uploaded {
            pre_rope: stream
                .clone_htod(&self.pre_rope)
                .map_err(|e| e.to_string())?,
            keys: stream.clone_htod(&self.keys).map_err(|e| e.to_string())?,
            values: stream.clone_htod(&self.values).map_err(|e| e.to_string())?,
            last_query: stream
                .clone_htod(&self.last_query)
                .map_err(|e| e.to_string())?,
            layout: self.layout,
        })
    }
}

/// Keys with the structure of real ones: a rank-`structure` pre-RoPE part plus noise, RoPE
/// applied; optionally a needle chunk whose keys share one large direction per head.
pub fn structured_prompt(
    rng: &mut StdRng,
    shape: &CacheShape,
    len: usize,
    structure: usize,
    noise: f32,
    needle: Option<usize>,
    chunk_size: usize,
) -> Prompt {
    let (heads, d) = (shape.kv_heads, shape.head_dim);
    let width = heads * d;
    let basis: Vec<f32> = (0..structure * width)
        .map(|_| rng.gen_range(-1.0f32..1.0))
        .collect();
    let needle_direction: Vec<f32> = (0..width).map(|_| rng.gen_range(-3.0f32..3.0)).collect();
    let mut pre = vec![0.0f32; len * width];
    let mut weights = vec![0.0f32; structure];
    for t in 0..len {
        let row = &mut pre[t * width..(t + 1) * width];
        let in_needle = needle.is_some_and(|chunk| t / chunk_size == chunk);
        if in_needle {
            for (x, n) in row.iter_mut().zip(&needle_direction) {
                *x = *n + rng.gen_range(-noise..noise);
            }
            continue;
        }
        for w in weights.iter_mut() {
            *w = rng.gen_range(-0.5f32..0.5);
        }
        for (i, &w) in weights.iter().enumerate() {
            for (x, b) in row.iter_mut().zip(&basis[i * width..(i + 1) * width]) {
                *x += w * b;
            }
        }
        for x in row.iter_mut() {
            *x += rng.gen_range(-noise..noise);
        }
    }
    let pre_rope: Vec<bf16> = pre.iter().map(|&x| bf16::from_f32(x)).collect();
    let frequencies = inverse_frequencies(&shape.rope, d as u32);
    let extra = rng.gen_range(0..3usize);
    let layout = SequenceLayout {
        offset: 8 * rng.gen_range(0..4u64),
        capacity: (len + extra) as u32,
        len: len as u32,
    };
    let total = layout.offset as usize + heads * layout.capacity as usize * d;
    let mut keys = random_bf16(rng, total, 1.0);
    let values = random_bf16(rng, total, 1.0);
    let mut row = vec![0.0f64; d];
    for h in 0..heads {
        for t in 0..len {
            for (x, k) in row.iter_mut().zip(&pre_rope[t * width + h * d..][..d]) {
                *x = k.to_f64();
            }
            reference::rebuild::rope(&mut row, t, &frequencies);
            let at = layout.offset as usize + (h * layout.capacity as usize + t) * d;
            for (out, x) in keys[at..at + d].iter_mut().zip(&row) {
                *out = bf16::from_f64(*x);
            }
        }
    }
    Prompt {
        len,
        pre_rope,
        keys,
        values,
        layout,
        last_query: random_bf16(rng, shape.q_heads * d, 1.0),
    }
}

/// Values with the structure of real ones, `[Hkv, capacity, d]` from `layout.offset` (the
/// rest left as in `values`): per head a rank-`structure` part that drifts along the
/// sequence, noise, and a few outlier channels `outlier_scale` times larger, as the value
/// projections of trained models have.
pub fn structured_values(
    rng: &mut StdRng,
    shape: &CacheShape,
    layout: SequenceLayout,
    values: &mut [bf16],
    structure: usize,
    outlier_scale: f32,
) {
    let (heads, d) = (shape.kv_heads, shape.head_dim);
    for h in 0..heads {
        let basis: Vec<f32> = (0..structure * d)
            .map(|_| rng.gen_range(-1.0f32..1.0))
            .collect();
        let outliers: Vec<bool> = (0..d).map(|_| rng.gen_range(0..16) == 0).collect();
        let mut weights: Vec<f32> = (0..structure).map(|_| rng.gen_range(-0.5..0.5)).collect();
        for t in 0..layout.len as usize {
            for w in weights.iter_mut() {
                *w = 0.9 * *w + rng.gen_range(-0.2f32..0.2);
            }
            let at = layout.offset as usize + (h * layout.capacity as usize + t) * d;
            for (i, out) in values[at..at + d].iter_mut().enumerate() {
                let mut x = rng.gen_range(-0.1f32..0.1);
                for (j, w) in weights.iter().enumerate() {
                    x += w * basis[j * d + i];
                }
                if outliers[i] {
                    x *= outlier_scale;
                }
                *out = bf16::from_f32(x);
            }
        }
    }
}

/// A decode scenario of the whole-cache tests: three prompts of odd and even lengths in a
/// two-layer Llama-3-shaped cache, and per step and layer the batch's query, new keys and new
/// values (the same for every cache a test compares).
pub struct DecodeScenario {
    pub shape: CacheShape,
    pub params: ShadowKvParams,
    pub capacity: CacheCapacity,
    pub prompts: Vec<Prompt>,
    /// Per step, per layer: `[query, keys, values]` of the batch.
    pub inputs: Vec<Vec<[Vec<bf16>; 3]>>,
}

/// The [`DecodeScenario`] drawn from `seed`: prompts of 1531, 2048 and 3077 tokens, 24 steps.
pub fn three_sequence_decode(seed: u64) -> DecodeScenario {
    let shape = CacheShape {
        layers: 2,
        q_heads: 8,
        kv_heads: 2,
        head_dim: 128,
        rope: RopeConfig::LLAMA_3,
    };
    let params = ShadowKvParams {
        chunk_size: 8,
        sparse_budget: 256,
        rank: 64,
        local_chunks: 4,
        outlier_chunks: 8,
    };
    let steps = 24;
    let lens = [1531usize, 2048, 3077];
    let capacity = CacheCapacity {
        max_sequences: 4,
        max_prompt_len: 4000,
        max_prompt_tokens: 12000,
        max_generated: steps,
    };
    let mut rng = StdRng::seed_from_u64(seed);
    let prompts: Vec<Prompt> = lens
        .iter()
        .map(|&len| structured_prompt(&mut rng, &shape, len, 16, 0.3, None, 8))
        .collect();
    let batch = lens.len();
    let inputs = (0..steps)
        .map(|_| {
            (0..shape.layers)
                .map(|_| {
                    [
                        random_bf16(&mut rng, batch * shape.q_heads * shape.head_dim, 1.0),
                        random_bf16(&mut rng, batch * shape.kv_heads * shape.head_dim, 1.0),
                        random_bf16(&mut rng, batch * shape.kv_heads * shape.head_dim, 1.0),
                    ]
                })
                .collect()
        })
        .collect();
    DecodeScenario {
        shape,
        params,
        capacity,
        prompts,
        inputs,
    }
}
