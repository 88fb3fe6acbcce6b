//! Value formats on the host: bf16 as computed, or compressed when the prompt's values are
//! offloaded (`value_quantise_fp8`, `value_quantise_int4`) and dequantised by the fetch
//! (`fetch::value_fetch_fp8`, `fetch::value_fetch_int4`) straight into the bf16 slots, so PCIe
//! carries 2x or 3.6x fewer bytes. The reference (`shadowkv::reference::values`) defines the
//! rounding; the kernels match it bit for bit.
//!
//! - **fp8 (e4m3)**: one f32 scale per (chunk, KV head), `max(amax / 448, 2^-126)`; each
//!   value divided by it and rounded to nearest even e4m3, saturating at ±448.
//! - **int4**: per token, groups of [`INT4_GROUP`] channels with an f16 minimum and an f16
//!   step `(max - min) / 15`; codes `round((x - min) / step)` in 0..=15, two per byte, the
//!   lower channel in the low nibble.
//!
//! A compressed sequence's bytes, from its `host_value_offset` (a byte offset, a multiple of
//! 16): the codes `[Hkv, chunks, code_bytes]`, then the scales `[Hkv, chunks, scale_bytes]`
//! (fp8: one f32; int4: `[chunk_size, groups]` of (f16 minimum, f16 step), the minimum in the
//! low half). Only the chunks a miss may name (`chunks`) are stored: the local window is exact
//! on the GPU. Keeping the scales apart keeps every chunk's codes 16-byte aligned.

use crate::shadow::ShadowSequence;

/// Largest finite e4m3 value.
pub const FP8_MAX: f32 = 448.0;
/// Channels per int4 group: 64 codes (32 bytes) share 4 bytes of f16 minimum and step.
pub const INT4_GROUP: usize = 64;
/// Channels per unit of work of the compressed kernels (one 16-byte fp8 vector, one 8-byte
/// int4 vector): the head dimension of a compressed cache is a multiple of it.
pub const UNIT: u32 = 16;

/// How values are stored in the cache's value buffer.
#[repr(u32)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum ValueFormat {
    /// bf16 as computed (2 bytes a value).
    #[default]
    Bf16 = 0,
    /// e4m3 with one f32 scale per (chunk, KV head): 1 byte a value.
    Fp8 = 1,
    /// 4-bit codes with an f16 minimum and step per token and [`INT4_GROUP`] channels: half a
    /// byte a value and 4 bytes a group.
    Int4 = 2,
}

impl ValueFormat {
    /// Every format, bf16 first.
    pub const ALL: [ValueFormat; 3] = [ValueFormat::Bf16, ValueFormat::Fp8, ValueFormat::Int4];

    /// The format's name as the command line spells it.
    pub const fn name(self) -> &'static str {
        match self {
            ValueFormat::Bf16 => "bf16",
            ValueFormat::Fp8 => "fp8",
            ValueFormat::Int4 => "int4",
        }
    }

    /// Bytes of codes of one chunk of one KV head.
    pub const fn code_bytes(self, chunk_size: usize, head_dim: usize) -> usize {
        let values = chunk_size * head_dim;
        match self {
            ValueFormat::Bf16 => values * 2,
            ValueFormat::Fp8 => values,
            ValueFormat::Int4 => values.div_ceil(2),
        }
    }

    /// Bytes of scales of one chunk of one KV head.
    pub const fn scale_bytes(self, chunk_size: usize, head_dim: usize) -> usize {
        match self {
            ValueFormat::Bf16 => 0,
            ValueFormat::Fp8 => 4,
            ValueFormat::Int4 => chunk_size * head_dim.div_ceil(INT4_GROUP) * 4,
        }
    }

    /// Bytes the format takes for one chunk of one KV head: `chunk_size` tokens of `head_dim`
    /// values, scales included.
    pub const fn chunk_bytes(self, chunk_size: usize, head_dim: usize) -> usize {
        self.code_bytes(chunk_size, head_dim) + self.scale_bytes(chunk_size, head_dim)
    }

    /// Bytes of one compressed sequence of `chunks` chunks per KV head, rounded up to 16 so
    /// that the next sequence's codes stay aligned.
    pub const fn packed_bytes(
        self,
        kv_heads: usize,
        chunks: usize,
        chunk_size: usize,
        head_dim: usize,
    ) -> usize {
        (kv_heads * chunks * self.chunk_bytes(chunk_size, head_dim)).next_multiple_of(16)
    }
}

/// One f32 to e4m3 in integer code: nearest even, saturating at ±448, NaN to 0x7f; the bits
/// `cvt.rn.satfinite.e4m3x2.f32` gives. The sm_80 kernels use it (no fp8 conversion there);
/// the host tests check it against the reference on every code boundary.
#[inline(always)]
pub fn fp8_encode_bits(x: f32) -> u8 {
    let bits = x.to_bits();
    let sign = ((bits >> 24) & 0x80) as u8;
    let magnitude = bits & 0x7fff_ffff;
    if magnitude > 0x7f80_0000 {
        return 0x7f;
    }
    // 448 and above (infinity included) saturate.
    if magnitude >= 0x43e0_0000 {
        return sign | 0x7e;
    }
    if magnitude >= 0x3c80_0000 {
        // A normal e4m3 (2^-6 and up): round the 23-bit mantissa to 3 bits, ties to even; a
        // carry into the exponent is the right result. Below 448 it never reaches 480.
        let rounded = magnitude + 0x7_ffff + ((magnitude >> 20) & 1);
        let exponent = (rounded >> 23) - 120;
        return sign | (exponent << 3) as u8 | ((rounded >> 20) & 7) as u8;
    }
    // A subnormal e4m3: a multiple of 2^-9 (8 of them is the smallest normal, code 8).
    // Scaling by 512 is exact, and so are the truncation and the remainder below 8.
    let scaled = f32::from_bits(magnitude) * 512.0;
    let whole = scaled as u32;
    let rest = scaled - whole as f32;
    let up = (rest > 0.5) | ((rest == 0.5) & (whole & 1 == 1));
    sign | (whole + up as u32) as u8
}

/// One e4m3 code as f32 in integer code (exact; NaN for `S.1111.111`): what
/// `cvt.rn.f16x2.e4m3x2` gives, for the sm_80 kernels.
#[inline(always)]
pub fn fp8_decode_bits(code: u8) -> f32 {
    let sign = ((code & 0x80) as u32) << 24;
    let exponent = ((code >> 3) & 0xf) as u32;
    let mantissa = (code & 7) as u32;
    if exponent == 0 {
        // Subnormal: mantissa * 2^-9, exact in f32.
        return f32::from_bits(sign | (mantissa as f32 * (1.0 / 512.0)).to_bits());
    }
    if exponent == 15 && mantissa == 7 {
        return f32::from_bits(sign | 0x7fc0_0000);
    }
    f32::from_bits(sign | (exponent + 120) << 23 | mantissa << 20)
}

/// Where one chunk of one KV head of a compressed sequence lies in the value buffer (bytes).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PackedChunk {
    /// First byte of its codes.
    pub codes: u64,
    /// First byte of its scales.
    pub scales: u64,
}

/// The bytes of chunk `chunk` of head `kv_head` of `sequence` in `format` (not bf16).
#[inline(always)]
pub fn packed_chunk(
    format: ValueFormat,
    sequence: &ShadowSequence,
    kv_heads: u32,
    kv_head: u32,
    chunk: u32,
    chunk_size: u32,
    head_dim: u32,
) -> PackedChunk {
    let (c, d) = (chunk_size as usize, head_dim as usize);
    let code_bytes = format.code_bytes(c, d) as u64;
    let scale_bytes = format.scale_bytes(c, d) as u64;
    let index = kv_head as u64 * sequence.chunks as u64 + chunk as u64;
    let codes_end =
        sequence.host_value_offset + kv_heads as u64 * sequence.chunks as u64 * code_bytes;
    PackedChunk {
        codes: sequence.host_value_offset + index * code_bytes,
        scales: codes_end + index * scale_bytes,
    }
}

/// Threads per block of the quantise kernels.
pub const THREADS: u32 = 256;
pub const QUANTISE_FP8_KERNEL: &str = "value_quantise_fp8";
pub const QUANTISE_INT4_KERNEL: &str = "value_quantise_int4";

/// One sequence's prompt values (bf16 `[Hkv, capacity, d]` of a prefill source) into its
/// compressed range of the value buffer.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "host", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct QuantiseParams {
    /// bf16 source values (device memory).
    pub source: u64,
    /// First element of the sequence's block in `source`.
    pub source_offset: u64,
    /// The value buffer (bytes; mapped host memory or device memory).
    pub target: u64,
    /// The sequence's layout: `host_value_offset` (bytes) and `chunks` say where it goes.
    pub sequence: ShadowSequence,
    /// Rows per head of the source block.
    pub source_capacity: u32,
    pub kv_heads: u32,
    pub head_dim: u32,
    pub chunk_size: u32,
}

const _: () = assert!(core::mem::size_of::<QuantiseParams>() == 24 + 72 + 16);

#[cfg(target_arch = "nvptx64")]
mod kernel {
    use super::*;
    use crate::device::*;
    use core::num::NonZeroU32;

    /// The scale of a chunk whose largest finite magnitude is `amax` (see the module).
    #[inline(always)]
    fn fp8_scale(amax: f32) -> f32 {
        if amax > 0.0 {
            max_f32(amax / FP8_MAX, f32::MIN_POSITIVE)
        } else {
            1.0
        }
    }

    /// Whether `x` is neither infinite nor NaN (its exponent is not all ones).
    #[inline(always)]
    fn is_finite(x: f32) -> bool {
        x.to_bits() & 0x7f80_0000 != 0x7f80_0000
    }

    /// `|x|` when finite, else 0.
    #[inline(always)]
    fn finite_magnitude(x: f32) -> f32 {
        if is_finite(x) {
            f32::from_bits(x.to_bits() & 0x7fff_ffff)
        } else {
            0.0
        }
    }

    /// fp8: one warp per (KV head, chunk): the chunk's largest magnitude (a warp reduction),
    /// its scale, then 16 codes per lane and pass as one 16-byte store.
    ///
    /// # Safety
    /// The host launcher checked the source and the target reach every chunk, and that
    /// `chunk_size * head_dim` is a multiple of [`UNIT`]; a 1-D grid of [`THREADS`] threads.
    #[no_mangle]
    pub unsafe extern "ptx-kernel" fn value_quantise_fp8(p: QuantiseParams) {
        let (c, d) = (p.chunk_size, p.head_dim);
        let Some(chunks) = NonZeroU32::new(p.sequence.chunks) else {
            return;
        };
        let entries = p.kv_heads * chunks.get();
        let warps = grid_dim_x() * (THREADS / 32);
        let lane = lane_id();
        let units = c * d / UNIT;
        let mut entry = block_idx_x() * (THREADS / 32) + warp_id();
        while entry < entries {
            let (kv_head, chunk) = (entry / chunks, entry % chunks);
            let source = (p.source as *const Vec16).add(
                ((p.source_offset
                    + (kv_head as u64 * p.source_capacity as u64 + (chunk * c) as u64) * d as u64)
                    / 8) as usize,
            );
            let mut amax = 0.0f32;
            let mut vector = lane;
            while vector < 2 * units {
                for x in bf16x8_to_f32(load_16(source.add(vector as usize))) {
                    amax = max_f32(amax, finite_magnitude(x));
                }
                vector += 32;
            }
            let mut mask = 16;
            while mask > 0 {
                amax = max_f32(amax, shuffle_xor_f32(amax, mask));
                mask >>= 1;
            }
            let scale = fp8_scale(amax);
            let place = packed_chunk(
                ValueFormat::Fp8,
                &p.sequence,
                p.kv_heads,
                kv_head,
                chunk,
                c,
                d,
            );
            let codes = (p.target + place.codes) as *mut Vec16;
            let mut unit = lane;
            while unit < units {
                let low = bf16x8_to_f32(load_16(source.add(2 * unit as usize)));
                let high = bf16x8_to_f32(load_16(source.add(2 * unit as usize + 1)));
                let mut packed = [0u32; 4];
                for (i, word) in packed.iter_mut().enumerate() {
                    let half = if i < 2 { &low } else { &high };
                    let at = 4 * (i % 2);
                    let first = f32x2_to_e4m3x2(half[at] / scale, half[at + 1] / scale);
                    let second = f32x2_to_e4m3x2(half[at + 2] / scale, half[at + 3] / scale);
                    *word = first as u32 | (second as u32) << 16;
                }
                store_16(codes.add(unit as usize), packed);
                unit += 32;
            }
            if lane == 0 {
                store_4((p.target + place.scales) as *mut u32, scale.to_bits());
            }
            entry += warps;
        }
    }

    /// int4: one thread per (KV head, chunk, token, group): the group's finite minimum and
    /// maximum, its f16 minimum and step, then 16 codes per 8-byte store.
    ///
    /// # Safety
    /// As [`value_quantise_fp8`], with `head_dim` a multiple of [`UNIT`].
    #[no_mangle]
    pub unsafe extern "ptx-kernel" fn value_quantise_int4(p: QuantiseParams) {
        let (c, d) = (p.chunk_size, p.head_dim);
        let groups = d.div_ceil(INT4_GROUP as u32);
        let (Some(c_nonzero), Some(groups_nonzero), Some(per_head)) = (
            NonZeroU32::new(c),
            NonZeroU32::new(groups),
            NonZeroU32::new(p.sequence.chunks * c * groups),
        ) else {
            return;
        };
        let entries = p.kv_heads * per_head.get();
        let threads = grid_dim_x() * THREADS;
        let mut entry = block_idx_x() * THREADS + thread_idx_x();
        while entry < entries {
            let kv_head = entry / per_head;
            let rest = entry % per_head;
            let (row, group) = (rest / groups_nonzero, rest % groups_nonzero);
            let (chunk, token) = (row / c_nonzero, row % c_nonzero);
            let first = group * INT4_GROUP as u32;
            let len = min_u32(INT4_GROUP as u32, d - first);
            let source = (p.source as *const Vec16).add(
                ((p.source_offset
                    + (kv_head as u64 * p.source_capacity as u64 + row as u64) * d as u64
                    + first as u64)
                    / 8) as usize,
            );
            let (mut low, mut high) = (f32::INFINITY, f32::NEG_INFINITY);
            let mut vector = 0;
            while vector < len / 8 {
                for x in bf16x8_to_f32(load_16(source.add(vector as usize))) {
                    if is_finite(x) {
                        low = if x < low { x } else { low };
                        high = if x > high { x } else { high };
                    }
                }
                vector += 1;
            }
            if low == f32::INFINITY {
                (low, high) = (0.0, 0.0);
            }
            let minimum = f32_to_f16(low);
            let minimum_f32 = f16_to_f32(minimum);
            let step = f32_to_f16((high - minimum_f32) / 15.0);
            let step_f32 = f16_to_f32(step);
            let divisor = if step_f32 > 0.0 { step_f32 } else { 1.0 };
            let place = packed_chunk(
                ValueFormat::Int4,
                &p.sequence,
                p.kv_heads,
                kv_head,
                chunk,
                c,
                d,
            );
            let codes =
                (p.target + place.codes + ((token * d + first) / 2) as u64) as *mut [u32; 2];
            let mut unit = 0;
            while unit < len / UNIT {
                let mut packed = [0u32; 2];
                for (half, word) in packed.iter_mut().enumerate() {
                    let values = bf16x8_to_f32(load_16(source.add((2 * unit) as usize + half)));
                    for (i, &x) in values.iter().enumerate() {
                        let level = round_f32((x - minimum_f32) / divisor);
                        // NaN (an infinite input) fails both comparisons and gives 0.
                        let code = if level > 15.0 {
                            15
                        } else if level >= 0.0 {
                            level as u32
                        } else {
                            0
                        };
                        *word |= code << (4 * i);
                    }
                }
                store_8(codes.add(unit as usize), packed);
                unit += 1;
            }
            let scales = (p.target + place.scales) as *mut u32;
            store_4(
                scales.add((token * groups + group) as usize),
                minimum as u32 | (step as u32) << 16,
            );
            entry += threads;
        }
    }
}
