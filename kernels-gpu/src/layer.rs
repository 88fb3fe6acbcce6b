//! The per-token kernels of a decoder layer, around its cuBLAS GEMMs and its attention:
//! embedding gather (optionally scaled), RMSNorm with the residual add fused in (optionally
//! normalising the added delta first: Gemma's post-attention and post-FFN norms), RoPE on the
//! fused Q/K/V projection (optionally after a per-head RMSNorm of queries and keys) with the
//! keys and values appended to the KV cache, and the gated activation (SiLU or GELU of the
//! gate, times up).
//!
//! The residual stream is f32 (`[tokens, hidden]`), and so are the GEMM outputs these kernels
//! read (cuBLAS writes them in f32): only what a GEMM reads (normed rows, attention output,
//! activations) and the KV cache are rounded to bf16, once each.
//! One block per token row; these kernels move a few MB per layer against the GEMMs' weights.

pub use crate::rope::RotaryLayout;

/// Threads per block of every kernel here.
pub const THREADS: u32 = 256;

/// Token `ids[t]`'s row of the bf16 `[vocab, hidden]` table, times `scale`, into f32 `out[t]`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq)]
#[cfg_attr(feature = "host", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct EmbeddingParams {
    pub table: u64,
    /// u32 `[tokens]`; an id past the table gives a NaN row (the host rejects those first).
    pub ids: u64,
    /// f32 `[tokens, hidden]`.
    pub out: u64,
    pub tokens: u32,
    pub hidden: u32,
    pub vocab: u32,
    /// Multiplies every gathered element (Gemma's `sqrt(hidden)`; 1.0 for none).
    pub scale: f32,
}

/// `residual += delta` (if `delta` is not 0), then `out = residual / rms(residual) * weight`.
/// With `delta_weight`, the delta is normalised first:
/// `residual += delta / rms(delta) * delta_weight` (Gemma's post-attention and post-FFN norms),
/// both norms with the same `eps`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq)]
#[cfg_attr(feature = "host", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct RmsNormParams {
    /// f32 `[rows, hidden]`, updated in place when `delta` is given.
    pub residual: u64,
    /// f32 `[rows, hidden]` or 0.
    pub delta: u64,
    /// f32 `[hidden]`.
    pub weight: u64,
    /// f32 `[hidden]` or 0 (the delta is added as it is); only read with a `delta`.
    pub delta_weight: u64,
    /// bf16 `[rows, hidden]`.
    pub out: u64,
    pub rows: u32,
    pub hidden: u32,
    pub eps: f32,
    pub _reserved: u32,
}

/// Where token `t` of a launch goes: its sequence (an index into the layouts), its absolute
/// position (its RoPE angle) and its row in the sequence's KV block: the position itself for
/// a full cache, another row where the block only stages new tokens (ShadowKV's decode).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "host", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct TokenPlacement {
    pub sequence: u32,
    pub position: u32,
    pub cache_row: u32,
    pub _reserved: u32,
}

impl TokenPlacement {
    /// A token at `position` of `sequence`, cached at row `position`.
    pub const fn new(sequence: u32, position: u32) -> Self {
        TokenPlacement {
            sequence,
            position,
            cache_row: position,
            _reserved: 0,
        }
    }

    /// The same token, cached at row `cache_row` instead.
    pub const fn with_cache_row(self, cache_row: u32) -> Self {
        TokenPlacement { cache_row, ..self }
    }
}

/// Splits the fused projection `qkv` (`[tokens, (heads + 2 kv_heads) * head_dim]`, f32) into
/// rotated queries (`q`, `[tokens, heads, head_dim]`) and rotated keys and plain values written
/// to the KV cache rows of each token's placement; optionally also the keys before RoPE
/// (`pre_rope_keys`, `[tokens, kv_heads * head_dim]`: what ShadowKV factorises).
/// With `q_norm`/`k_norm`, every query/key head is RMS-normalised over its `head_dim`
/// (after the bias, before RoPE; Gemma-3's QK norm), and the pre-RoPE keys are the normed ones.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq)]
#[cfg_attr(feature = "host", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct RopeQkvParams {
    pub qkv: u64,
    /// f32 `[(heads + 2 kv_heads) * head_dim]` (Qwen2's Q/K/V biases) or 0.
    pub bias: u64,
    /// f64 `[rotary_dim / 2]`.
    pub inverse_frequencies: u64,
    /// `[tokens]` [`TokenPlacement`].
    pub placements: u64,
    /// `[sequences]` [`SequenceLayout`](crate::attention::SequenceLayout) of the K/V cache buffers.
    pub layouts: u64,
    pub q: u64,
    pub k_cache: u64,
    pub v_cache: u64,
    /// bf16 `[tokens, kv_heads * head_dim]` or 0.
    pub pre_rope_keys: u64,
    /// f32 `[head_dim]`, the RMSNorm weight of every query head, or 0 (no norm).
    pub q_norm: u64,
    /// f32 `[head_dim]`, the RMSNorm weight of every key head, or 0 (no norm).
    pub k_norm: u64,
    pub tokens: u32,
    pub heads: u32,
    pub kv_heads: u32,
    pub head_dim: u32,
    pub sequences: u32,
    /// Epsilon of the query and key norms.
    pub norm_eps: f32,
    /// The rotated part of each head, its pairing and scale.
    pub rotary: RotaryLayout,
}

/// The activation of the gate in [`GatedActivationParams`].
#[repr(u32)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum GatedActivation {
    /// `silu(g) = g / (1 + e^-g)` (SwiGLU: Llama, Qwen2, GLM-4, Phi-3).
    #[default]
    Silu = 0,
    /// GELU with the tanh approximation,
    /// `0.5 g (1 + tanh(sqrt(2 / pi) (g + 0.044715 g^3)))` (GeGLU: Gemma).
    GeluTanh = 1,
}

/// `out[r, i] = act(gate_up[r, i]) * gate_up[r, width + i]` (the fused gate/up projection).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq)]
#[cfg_attr(feature = "host", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct GatedActivationParams {
    /// f32 `[rows, 2 * width]`.
    pub gate_up: u64,
    /// bf16 `[rows, width]`.
    pub out: u64,
    pub rows: u32,
    pub width: u32,
    /// A [`GatedActivation`] as `u32`.
    pub activation: u32,
    pub _reserved: u32,
}

pub const EMBEDDING_KERNEL: &str = "embedding_gather";
pub const RMS_NORM_KERNEL: &str = "rms_norm";
pub const ROPE_QKV_KERNEL: &str = "rope_qkv";
pub const GATED_ACTIVATION_KERNEL: &str = "gated_activation";

/// Shared memory of [`RMS_NORM_KERNEL`]: one partial sum per warp.
pub const RMS_NORM_SHARED_BYTES: u32 = THREADS / 32 * 4;

/// Dynamic shared memory of [`ROPE_QKV_KERNEL`]: one inverse RMS per query and key head when
/// either norm is given, none otherwise.
pub const fn rope_qkv_shared_bytes(heads: u32, kv_heads: u32, normed: bool) -> u32 {
    if normed {
        (heads + kv_heads) * 4
    } else {
        0
    }
}

/// Element index of the start of row `row` of a row-major matrix `width` elements wide,
/// computed in 64 bits: `row * width` passes 2^32 within reach of long prompts (about 4.2M
/// tokens of 1024-wide keys, 700K tokens of a 6144-wide fused Q/K/V row).
pub const fn row_start(row: u32, width: u32) -> usize {
    row as usize * width as usize
}

/// Element index of row `cache_row` of KV head `kv_head` in a `[Hkv, capacity, d]` cache block
/// that starts at element `offset`, in 64 bits (see [`row_start`]).
pub const fn cache_row_start(
    offset: u64,
    kv_head: u32,
    capacity: u32,
    cache_row: u32,
    head_dim: u32,
) -> usize {
    offset as usize
        + (kv_head as usize * capacity as usize + cache_row as usize) * head_dim as usize
}

#[cfg(target_arch = "nvptx64")]
mod kernel {
    use super::*;
    use crate::attention::SequenceLayout;
    use crate::block::{sum_f32, warp_sum_f32};
    use crate::device::*;
    use crate::rope::{pair_columns, rotate};
    use core::num::NonZeroU32;

    /// # Safety
    /// The host checked the buffers against `tokens`, `hidden` and `vocab` and launched one
    /// block of [`THREADS`] per token.
    #[no_mangle]
    pub unsafe extern "ptx-kernel" fn embedding_gather(p: EmbeddingParams) {
        let token = block_idx_x();
        if token >= p.tokens {
            return;
        }
        let id = *(p.ids as *const u32).add(token as usize);
        let out = (p.out as *mut f32).add(row_start(token, p.hidden));
        let row = (p.table as *const u16).add(id as usize * p.hidden as usize);
        let mut i = thread_idx_x();
        while i < p.hidden {
            *out.add(i as usize) = if id < p.vocab {
                bf16_to_f32(*row.add(i as usize)) * p.scale
            } else {
                f32::NAN
            };
            i += THREADS;
        }
    }

    /// # Safety
    /// The host checked the buffers against `rows` and `hidden` and launched one block of
    /// [`THREADS`] per row with [`RMS_NORM_SHARED_BYTES`] of dynamic shared memory.
    #[no_mangle]
    pub unsafe extern "ptx-kernel" fn rms_norm(p: RmsNormParams) {
        let row = block_idx_x();
        if row >= p.rows {
            return;
        }
        let base = row_start(row, p.hidden);
        let residual = (p.residual as *mut f32).add(base);
        let delta = (p.delta as *const f32).wrapping_add(base);
        // The delta's own norm first, when it has a weight (a block-wide sum before the add).
        let mut delta_inverse = 1.0f32;
        let normed_delta = p.delta != 0 && p.delta_weight != 0;
        if normed_delta {
            let mut squares = 0.0f32;
            let mut i = thread_idx_x();
            while i < p.hidden {
                let x = *delta.add(i as usize);
                squares += x * x;
                i += THREADS;
            }
            let total = sum_f32(squares, dynamic_shared());
            delta_inverse = reciprocal(sqrt(total / p.hidden as f32 + p.eps));
        }
        let mut squares = 0.0f32;
        let mut i = thread_idx_x();
        while i < p.hidden {
            let mut x = *residual.add(i as usize);
            if p.delta != 0 {
                let mut added = *delta.add(i as usize);
                if normed_delta {
                    added *= delta_inverse * *(p.delta_weight as *const f32).add(i as usize);
                }
                x += added;
                *residual.add(i as usize) = x;
            }
            squares += x * x;
            i += THREADS;
        }
        let total = sum_f32(squares, dynamic_shared());
        let inverse = reciprocal(sqrt(total / p.hidden as f32 + p.eps));
        let out = (p.out as *mut u16).add(base);
        let mut i = thread_idx_x();
        while i < p.hidden {
            let x = *residual.add(i as usize) * inverse;
            *out.add(i as usize) = f32_to_bf16(x * *(p.weight as *const f32).add(i as usize));
            i += THREADS;
        }
    }

    /// # Safety
    /// The host checked every placement against its layout (sequence index, cache row below
    /// the capacity), the layouts against the caches, `pre_rope_keys` (if not 0) against the
    /// tokens, and launched one block of [`THREADS`] per token.
    #[no_mangle]
    pub unsafe extern "ptx-kernel" fn rope_qkv(p: RopeQkvParams) {
        let token = block_idx_x();
        let Some(half) = NonZeroU32::new(p.head_dim / 2) else {
            return;
        };
        if token >= p.tokens {
            return;
        }
        let placement = *(p.placements as *const TokenPlacement).add(token as usize);
        if placement.sequence >= p.sequences {
            return;
        }
        let layout = *(p.layouts as *const SequenceLayout).add(placement.sequence as usize);
        let position = placement.position;
        let cache_row = placement.cache_row;
        let writes_cache = cache_row < layout.capacity;
        // head_dim = 2 * half, non-zero: divisions by it cannot fault.
        let d = half.saturating_mul(NonZeroU32::MIN.saturating_add(1));
        let row_width = (p.heads + 2 * p.kv_heads) * d.get();
        let row = (p.qkv as *const f32).add(row_start(token, row_width));
        let value = |column: u32| {
            let bias = if p.bias != 0 {
                *(p.bias as *const f32).add(column as usize)
            } else {
                0.0
            };
            *row.add(column as usize) + bias
        };
        let cache_row = |kv_head: u32| {
            cache_row_start(layout.offset, kv_head, layout.capacity, cache_row, d.get())
        };
        // The QK norm: one warp per query or key head sums its squares, and the head's
        // inverse RMS goes to shared memory for the threads that rotate its pairs.
        let inverse_rms = dynamic_shared::<f32>();
        if p.q_norm != 0 || p.k_norm != 0 {
            let mut head = warp_id();
            while head < p.heads + p.kv_heads {
                let mut squares = 0.0f32;
                let mut i = lane_id();
                while i < d.get() {
                    let x = value(head * d.get() + i);
                    squares += x * x;
                    i += 32;
                }
                let total = warp_sum_f32(squares);
                if lane_id() == 0 {
                    *inverse_rms.add(head as usize) =
                        reciprocal(sqrt(total / d.get() as f32 + p.norm_eps));
                }
                head += THREADS / 32;
            }
            sync_threads();
        }
        // Column `column` of head `row_head` of the row (queries, then keys), normed if its
        // kind has a norm weight.
        let input = |row_head: u32, column: u32, weight: u64| {
            let x = value(row_head * d.get() + column);
            if weight != 0 {
                x * *inverse_rms.add(row_head as usize)
                    * *(weight as *const f32).add(column as usize)
            } else {
                x
            }
        };
        let (q_pairs, k_pairs) = (p.heads * half.get(), p.kv_heads * half.get());
        let work = q_pairs + k_pairs + p.kv_heads * d.get();
        let mut item = thread_idx_x();
        while item < work {
            if item < q_pairs + k_pairs {
                // A pair of a query head, then of a key head: rotated if it is one of the
                // first rotary_dim / 2, passed through otherwise.
                let is_key = item >= q_pairs;
                let pair = if is_key { item - q_pairs } else { item };
                let (head, i) = (pair / half, pair % half);
                let (low_column, high_column, rotated) = pair_columns(i, &p.rotary);
                let (row_head, weight) = if is_key {
                    (p.heads + head, p.k_norm)
                } else {
                    (head, p.q_norm)
                };
                let (before_low, before_high) = (
                    input(row_head, low_column, weight),
                    input(row_head, high_column, weight),
                );
                if is_key && p.pre_rope_keys != 0 {
                    let at = row_start(token, p.kv_heads * d.get()) + (head * d.get()) as usize;
                    let pre = p.pre_rope_keys as *mut u16;
                    *pre.add(at + low_column as usize) = f32_to_bf16(before_low);
                    *pre.add(at + high_column as usize) = f32_to_bf16(before_high);
                }
                let (low, high) = if rotated {
                    let frequency = *(p.inverse_frequencies as *const f64).add(i as usize);
                    rotate(
                        before_low,
                        before_high,
                        position,
                        frequency,
                        p.rotary.attention_factor,
                    )
                } else {
                    (before_low, before_high)
                };
                let at = if is_key {
                    cache_row(head)
                } else {
                    row_start(token, p.heads * d.get()) + (head * d.get()) as usize
                };
                let target = if is_key { p.k_cache } else { p.q } as *mut u16;
                if !is_key || writes_cache {
                    *target.add(at + low_column as usize) = f32_to_bf16(low);
                    *target.add(at + high_column as usize) = f32_to_bf16(high);
                }
            } else if writes_cache {
                let element = item - q_pairs - k_pairs;
                let (head, i) = (element / d, element % d);
                let column = (p.heads + p.kv_heads) * d.get() + element;
                *(p.v_cache as *mut u16).add(cache_row(head) + i as usize) =
                    f32_to_bf16(value(column));
            }
            item += THREADS;
        }
    }

    /// # Safety
    /// The host checked the buffers against `rows` and `width` and launched a 1-D grid of
    /// [`THREADS`]-thread blocks (any count: the loop strides over the grid).
    #[no_mangle]
    pub unsafe extern "ptx-kernel" fn gated_activation(p: GatedActivationParams) {
        let Some(width) = core::num::NonZeroU64::new(p.width as u64) else {
            return;
        };
        let total = p.rows as u64 * width.get();
        let stride = grid_dim_x() as u64 * THREADS as u64;
        let mut element = block_idx_x() as u64 * THREADS as u64 + thread_idx_x() as u64;
        let gate_up = p.gate_up as *const f32;
        let gelu = p.activation == GatedActivation::GeluTanh as u32;
        while element < total {
            let (row, i) = (element / width, element % width);
            let gate = *gate_up.add((row * 2 * width.get() + i) as usize);
            let up = *gate_up.add((row * 2 * width.get() + width.get() + i) as usize);
            // Both are g * sigmoid(z): silu with z = g; tanh-GELU with
            // z = 2 sqrt(2 / pi) (g + 0.044715 g^3), as 0.5 (1 + tanh(u)) = sigmoid(2u).
            // sigmoid(z) = 1 / (1 + e^-z), with e^x = 2^(x log2 e).
            let z = if gelu {
                const TWO_SQRT_2_OVER_PI: f32 = 1.595_769;
                TWO_SQRT_2_OVER_PI * fma(0.044_715 * gate, gate * gate, gate)
            } else {
                gate
            };
            let activated = gate * reciprocal(1.0 + exp2(-z * core::f32::consts::LOG2_E));
            *(p.out as *mut u16).add(element as usize) = f32_to_bf16(activated * up);
            element += stride;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Past 2^32 elements the indices are exact (in u32 they would wrap and write other rows).
    #[test]
    fn indices_past_four_billion_elements_are_exact() {
        let (tokens, width) = (700_001u32, 6144u32);
        assert!(u64::from(tokens) * u64::from(width) > u64::from(u32::MAX));
        assert_eq!(row_start(tokens, width) as u128, 700_001u128 * 6144);
        let (capacity, d) = (4_200_000u32, 128u32);
        let expected = 40u128 + (7u128 * 4_200_000 + 4_199_999) * 128;
        assert!(expected > u128::from(u32::MAX));
        assert_eq!(
            cache_row_start(40, 7, capacity, capacity - 1, d) as u128,
            expected
        );
    }
}
