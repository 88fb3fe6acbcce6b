//! Value fetch: copies each miss's `c * d` values (2 KiB at the defaults) from pinned,
//! device-mapped host memory into its sparse slot in the GPU value buffer. One warp per
//! chunk, every lane's loads issued before its stores. Runs on the copy stream beside the
//! attention over the resident tokens and `rebuild`.
//!
//! A 1-D grid of `blocks` blocks: warp `w` of the grid takes entries `w`, `w + warps`, ... of
//! the flattened `[sequence, Hkv, budget_chunks]` miss lists, skipping those past their head's
//! count. (Flattened miss-major instead, so that every warp has a miss, the fetch took 22.1
//! µs against 21.2 at 1 x 122K and 283 against 271 at 16 x 122K, and the batch-16 step 495
//! against 469 µs on the H100: more reads in flight only queue.) The host sizes the grid for
//! just enough reads in flight to fill PCIe: more only queue in the memory system and slow
//! the kernels that run beside the fetch.
//!
//! `value_fetch_fp8` and `value_fetch_int4` read compressed values (laid out as the `values`
//! module says) and dequantise them straight into the bf16 slot, with the same grid: each
//! lane loads its share of a chunk's codes and scales before converting and storing any.

use crate::shadow::ShadowShape;

pub const WARPS: u32 = 8;
pub const THREADS: u32 = WARPS * 32;
/// 16-byte vectors each lane loads before storing them.
pub const VECTORS_IN_FLIGHT: u32 = 4;

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq)]
#[cfg_attr(feature = "host", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct FetchParams {
    pub shape: ShadowShape,
    /// `[batch, Hkv, budget_chunks]` misses from `plan`.
    pub misses: u64,
    /// u32 `[batch, Hkv]`.
    pub miss_counts: u64,
    /// The values (device address of mapped host memory, or device memory): bf16 for
    /// `value_fetch`, the compressed bytes of `values::ValueFormat` for the others.
    pub values: u64,
    /// bf16 GPU value buffer (the K/V layout).
    pub v: u64,
    /// Sequences this launch covers, from `shape.first_sequence`.
    pub sequences: u32,
    pub _reserved: u32,
}

pub const KERNEL_NAME: &str = "value_fetch";
/// The fetch of fp8 values, dequantised into the bf16 slots.
pub const FP8_KERNEL: &str = "value_fetch_fp8";
/// The fetch of int4 values, dequantised into the bf16 slots.
pub const INT4_KERNEL: &str = "value_fetch_int4";
/// Units (16 channels) each lane of a compressed fetch loads before converting and storing.
pub const UNITS_IN_FLIGHT: u32 = 2;

#[cfg(target_arch = "nvptx64")]
mod kernel {
    use super::*;
    use crate::device::*;
    use crate::shadow::{slot_base, Miss, ShadowSequence};
    use crate::values::{packed_chunk, ValueFormat, INT4_GROUP, UNIT};
    use core::num::NonZeroU32;

    /// # Safety
    /// The host launcher validated the layouts against the value buffers and launched a 1-D
    /// grid of [`THREADS`]-thread blocks.
    #[no_mangle]
    pub unsafe extern "ptx-kernel" fn value_fetch(p: FetchParams) {
        let shape = &p.shape;
        let (warp, lane) = (warp_id(), lane_id());
        let k = shape.budget_chunks;
        let Some(slots) = NonZeroU32::new(k) else {
            return;
        };
        let grid_warps = grid_dim_x() * WARPS;
        let entries = p.sequences * shape.kv_heads * k;
        let (c, d) = (shape.chunk_size, shape.head_dim);
        let vectors = c * d / 8;
        let mut entry = block_idx_x() * WARPS + warp;
        while entry < entries {
            // (sequence, head) row of the launch and miss index within it.
            let (row, m) = (entry / slots, entry % slots);
            let sequence_index = shape.first_sequence + row / shape.kv_heads.max(1);
            let kv_head = row % shape.kv_heads.max(1);
            // The count, the miss entry and the sequence are loaded together, not each after
            // the last: the miss list has room for every slot, so entry `m` can be read before
            // the count says whether it is a miss (one device-memory latency fewer before the
            // PCIe reads). The non-short-circuit `&` keeps every load ahead of the branch.
            let count = *(p.miss_counts as *const u32)
                .add((sequence_index * shape.kv_heads + kv_head) as usize);
            let miss = *(p.misses as *const Miss)
                .add(slot_base(sequence_index, kv_head, shape.kv_heads, k) + m as usize);
            let sequence = *(shape.sequences as *const ShadowSequence).add(sequence_index as usize);
            if (m < min_u32(count, k)) & (miss.chunk < sequence.chunks) & (miss.slot < k) {
                let source = (p.values as *const Vec16)
                    .add((sequence.host_value_chunk(kv_head, miss.chunk, c, d) / 8) as usize);
                let target = (p.v as *mut Vec16).add(
                    (sequence.kv_row(kv_head, sequence.sparse_start + miss.slot * c, d) / 8)
                        as usize,
                );
                let mut first = lane;
                while first < vectors {
                    let mut held = [[0u32; 4]; VECTORS_IN_FLIGHT as usize];
                    for (i, vector) in held.iter_mut().enumerate() {
                        let at = first + i as u32 * 32;
                        if at < vectors {
                            *vector = load_host_mapped_16(source.add(at as usize));
                        }
                    }
                    for (i, vector) in held.iter().enumerate() {
                        let at = first + i as u32 * 32;
                        if at < vectors {
                            store_16(target.add(at as usize), *vector);
                        }
                    }
                    first += 32 * VECTORS_IN_FLIGHT;
                }
            }
            entry += grid_warps;
        }
    }

    /// The miss entry `entry` of the launch: the sequence, its KV head and the miss, when it
    /// names a chunk and a slot in range (see [`value_fetch`] for why the loads go together).
    #[inline(always)]
    unsafe fn miss_at(p: &FetchParams, entry: u32) -> Option<(ShadowSequence, u32, Miss)> {
        let shape = &p.shape;
        let k = shape.budget_chunks;
        let slots = NonZeroU32::new(k)?;
        let (row, m) = (entry / slots, entry % slots);
        let sequence_index = shape.first_sequence + row / shape.kv_heads.max(1);
        let kv_head = row % shape.kv_heads.max(1);
        let count = *(p.miss_counts as *const u32)
            .add((sequence_index * shape.kv_heads + kv_head) as usize);
        let miss = *(p.misses as *const Miss)
            .add(slot_base(sequence_index, kv_head, shape.kv_heads, k) + m as usize);
        let sequence = *(shape.sequences as *const ShadowSequence).add(sequence_index as usize);
        ((m < min_u32(count, k)) & (miss.chunk < sequence.chunks) & (miss.slot < k))
            .then_some((sequence, kv_head, miss))
    }

    /// fp8 misses: one warp per miss; each lane loads [`UNITS_IN_FLIGHT`] 16-byte vectors of
    /// codes (16 values each) and the chunk's scale before converting and storing any.
    ///
    /// # Safety
    /// As [`value_fetch`], with the values in the fp8 layout (`values` module) and
    /// `head_dim` a multiple of `values::UNIT`.
    #[no_mangle]
    pub unsafe extern "ptx-kernel" fn value_fetch_fp8(p: FetchParams) {
        let shape = &p.shape;
        let (c, d) = (shape.chunk_size, shape.head_dim);
        let units = c * d / UNIT;
        let entries = p.sequences * shape.kv_heads * shape.budget_chunks;
        let grid_warps = grid_dim_x() * WARPS;
        let lane = lane_id();
        let mut entry = block_idx_x() * WARPS + warp_id();
        while entry < entries {
            if let Some((sequence, kv_head, miss)) = miss_at(&p, entry) {
                let place = packed_chunk(
                    ValueFormat::Fp8,
                    &sequence,
                    shape.kv_heads,
                    kv_head,
                    miss.chunk,
                    c,
                    d,
                );
                let codes = (p.values + place.codes) as *const Vec16;
                let target = (p.v as *mut Vec16).add(
                    (sequence.kv_row(kv_head, sequence.sparse_start + miss.slot * c, d) / 8)
                        as usize,
                );
                let scale =
                    f32::from_bits(load_host_mapped_4((p.values + place.scales) as *const u32));
                let mut first = lane;
                while first < units {
                    let mut held = [[0u32; 4]; UNITS_IN_FLIGHT as usize];
                    for (i, vector) in held.iter_mut().enumerate() {
                        let at = first + i as u32 * 32;
                        if at < units {
                            *vector = load_host_mapped_16(codes.add(at as usize));
                        }
                    }
                    for (i, vector) in held.iter().enumerate() {
                        let at = first + i as u32 * 32;
                        if at < units {
                            let mut out = [[0u32; 4]; 2];
                            for (w, &word) in vector.iter().enumerate() {
                                let [a, b] = e4m3x2_to_f32(word as u16);
                                let [e, f] = e4m3x2_to_f32((word >> 16) as u16);
                                out[w / 2][2 * (w % 2)] = f32x2_to_bf16x2(a * scale, b * scale);
                                out[w / 2][2 * (w % 2) + 1] = f32x2_to_bf16x2(e * scale, f * scale);
                            }
                            store_16(target.add(2 * at as usize), out[0]);
                            store_16(target.add(2 * at as usize + 1), out[1]);
                        }
                    }
                    first += 32 * UNITS_IN_FLIGHT;
                }
            }
            entry += grid_warps;
        }
    }

    /// int4 misses: one warp per miss; each lane loads [`UNITS_IN_FLIGHT`] 8-byte vectors of
    /// codes (16 values of one token and group each) and their groups' minimum and step before
    /// converting and storing any.
    ///
    /// # Safety
    /// As [`value_fetch_fp8`], with the values in the int4 layout.
    #[no_mangle]
    pub unsafe extern "ptx-kernel" fn value_fetch_int4(p: FetchParams) {
        let shape = &p.shape;
        let (c, d) = (shape.chunk_size, shape.head_dim);
        let units = c * d / UNIT;
        let Some(units_per_token) = NonZeroU32::new(d / UNIT) else {
            return;
        };
        let groups = d.div_ceil(INT4_GROUP as u32);
        let entries = p.sequences * shape.kv_heads * shape.budget_chunks;
        let grid_warps = grid_dim_x() * WARPS;
        let lane = lane_id();
        let mut entry = block_idx_x() * WARPS + warp_id();
        while entry < entries {
            if let Some((sequence, kv_head, miss)) = miss_at(&p, entry) {
                let place = packed_chunk(
                    ValueFormat::Int4,
                    &sequence,
                    shape.kv_heads,
                    kv_head,
                    miss.chunk,
                    c,
                    d,
                );
                let codes = (p.values + place.codes) as *const [u32; 2];
                let scales = (p.values + place.scales) as *const u32;
                let target = (p.v as *mut Vec16).add(
                    (sequence.kv_row(kv_head, sequence.sparse_start + miss.slot * c, d) / 8)
                        as usize,
                );
                let mut first = lane;
                while first < units {
                    let mut held = [([0u32; 2], 0u32); UNITS_IN_FLIGHT as usize];
                    for (i, (vector, scale)) in held.iter_mut().enumerate() {
                        let at = first + i as u32 * 32;
                        if at < units {
                            let token = at / units_per_token;
                            let group = (at % units_per_token) * UNIT / INT4_GROUP as u32;
                            *vector = load_host_mapped_8(codes.add(at as usize));
                            *scale =
                                load_host_mapped_4(scales.add((token * groups + group) as usize));
                        }
                    }
                    for (i, (vector, scale)) in held.iter().enumerate() {
                        let at = first + i as u32 * 32;
                        if at < units {
                            let minimum = f16_to_f32(*scale as u16);
                            let step = f16_to_f32((*scale >> 16) as u16);
                            let mut out = [[0u32; 4]; 2];
                            for (row, &word) in out.iter_mut().zip(vector.iter()) {
                                for (pair, slot) in row.iter_mut().enumerate() {
                                    let low = (word >> (8 * pair)) & 0xf;
                                    let high = (word >> (8 * pair + 4)) & 0xf;
                                    // A product then a sum, each rounded, as the reference.
                                    *slot = f32x2_to_bf16x2(
                                        minimum + low as f32 * step,
                                        minimum + high as f32 * step,
                                    );
                                }
                            }
                            store_16(target.add(2 * at as usize), out[0]);
                            store_16(target.add(2 * at as usize + 1), out[1]);
                        }
                    }
                    first += 32 * UNITS_IN_FLIGHT;
                }
            }
            entry += grid_warps;
        }
    }
}
