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
//!
//! With a GPU value tier (`tier`, `FetchParams::tier`), each kernel first asks the tier about
//! its miss (one tag load; for a miss not found, one pass of the warp over the head's miss
//! list): a tier hit reads the chunk's bytes from the tier's entry (device memory) instead of
//! the host, and a miss the tier keeps also stores the bytes it read, as read, into its entry.

use crate::shadow::ShadowShape;
use crate::tier::TierParams;

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
    /// The GPU value tier (see `tier`), all zero for none.
    pub tier: TierParams,
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
    use crate::tier::{
        entry_bytes, entry_index, entry_of, OUTCOME_FETCHED, OUTCOME_INSERTED, OUTCOME_TIER_HIT,
    };
    use crate::values::{packed_chunk, ValueFormat, INT4_GROUP, UNIT};
    use core::num::NonZeroU32;

    /// One valid miss entry of a launch.
    struct MissEntry {
        sequence: ShadowSequence,
        sequence_index: u32,
        kv_head: u32,
        miss: Miss,
        /// Its index in the head's miss list, and the list's valid length.
        index: u32,
        count: u32,
    }

    /// The miss entry `entry` of the launch: the sequence, its KV head and the miss, when it
    /// names a chunk and a slot in range. The count, the miss entry and the sequence are
    /// loaded together, not each after the last: the miss list has room for every slot, so
    /// entry `m` can be read before the count says whether it is a miss (one device-memory
    /// latency fewer before the PCIe reads). The non-short-circuit `&` keeps every load ahead
    /// of the branch.
    #[inline(always)]
    unsafe fn miss_at(p: &FetchParams, entry: u32) -> Option<MissEntry> {
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
        let count = min_u32(count, k);
        ((m < count) & (miss.chunk < sequence.chunks) & (miss.slot < k)).then_some(MissEntry {
            sequence,
            sequence_index,
            kv_head,
            miss,
            index: m,
            count,
        })
    }

    /// The tier's answer for one miss, the same in every lane of the warp.
    struct Verdict {
        /// The chunk's bytes are in the tier's entry.
        hit: bool,
        /// The bytes fetched over PCIe go into the entry.
        insert: bool,
        /// The entry's first byte (0 without a tier).
        entry: u64,
        /// The entry's tag.
        tag: *mut u32,
    }

    /// Looks up `e`'s chunk in the tier and decides whether a PCIe fetch of it is kept (see
    /// the `tier` module for the policy); writes the outcome for the statistics. Every lane
    /// of the warp calls it with the same entry.
    #[inline(always)]
    unsafe fn tier_verdict(p: &FetchParams, e: &MissEntry, entry_bytes: u64) -> Verdict {
        let tier = &p.tier;
        let chunks_per_head = tier.chunks_per_head;
        if chunks_per_head == 0 {
            return Verdict {
                hit: false,
                insert: false,
                entry: 0,
                tag: core::ptr::null_mut(),
            };
        }
        let shape = &p.shape;
        let entry = entry_of(e.miss.chunk, chunks_per_head);
        let index = entry_index(
            e.sequence.resident_row,
            e.kv_head,
            shape.kv_heads,
            chunks_per_head,
            entry,
        );
        let tag = (tier.tags as *mut u32).add(index);
        // Other warps of the launch may write tags: one lane reads it from memory (not a
        // cached copy) for the whole warp, so every lane decides alike.
        let mut held = 0;
        if lane_id() == 0 {
            held = core::ptr::read_volatile(tag);
        }
        let held = shuffle_idx_u32(held, 0);
        let hit = held == e.miss.chunk;
        // A later miss of the head in the same entry, or a miss that is the entry's chunk
        // (a tier hit reading it), keeps this fetch out of the entry.
        let base = slot_base(
            e.sequence_index,
            e.kv_head,
            shape.kv_heads,
            shape.budget_chunks,
        );
        let misses = (p.misses as *const Miss).add(base);
        let mut conflict = false;
        let mut j = lane_id();
        while j < e.count {
            let other = (*misses.add(j as usize)).chunk;
            conflict |=
                ((j > e.index) & (entry_of(other, chunks_per_head) == entry)) | (other == held);
            j += 32;
        }
        let insert = !hit & (ballot(conflict) == 0);
        if (tier.outcomes != 0) & (lane_id() == 0) {
            let outcome = if hit {
                OUTCOME_TIER_HIT
            } else if insert {
                OUTCOME_INSERTED
            } else {
                OUTCOME_FETCHED
            };
            store_4(
                (tier.outcomes as *mut u32).add(base + e.index as usize),
                outcome,
            );
        }
        Verdict {
            hit,
            insert,
            entry: tier.data + index as u64 * entry_bytes,
            tag,
        }
    }

    /// After the warp's stores: the inserted entry names its chunk. (Nothing reads the entry
    /// in this launch, see the `tier` module, so no fence orders the two.)
    #[inline(always)]
    unsafe fn tier_commit(verdict: &Verdict, chunk: u32) {
        if verdict.insert & (lane_id() == 0) {
            core::ptr::write_volatile(verdict.tag, chunk);
        }
    }

    /// # Safety
    /// The host launcher validated the layouts against the value buffers (and the tier's,
    /// if any) and launched a 1-D grid of [`THREADS`]-thread blocks.
    #[no_mangle]
    pub unsafe extern "ptx-kernel" fn value_fetch(p: FetchParams) {
        let shape = &p.shape;
        let (warp, lane) = (warp_id(), lane_id());
        let grid_warps = grid_dim_x() * WARPS;
        let entries = p.sequences * shape.kv_heads * shape.budget_chunks;
        let (c, d) = (shape.chunk_size, shape.head_dim);
        let vectors = c * d / 8;
        let stride = entry_bytes(ValueFormat::Bf16, c as usize, d as usize) as u64;
        let mut entry = block_idx_x() * WARPS + warp;
        while entry < entries {
            if let Some(e) = miss_at(&p, entry) {
                let verdict = tier_verdict(&p, &e, stride);
                let (sequence, kv_head, miss) = (&e.sequence, e.kv_head, e.miss);
                let host = (p.values as *const Vec16)
                    .add((sequence.host_value_chunk(kv_head, miss.chunk, c, d) / 8) as usize);
                let source = if verdict.hit {
                    verdict.entry as *const Vec16
                } else {
                    host
                };
                let kept = verdict.entry as *mut Vec16;
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
                            if verdict.insert {
                                store_16(kept.add(at as usize), *vector);
                            }
                        }
                    }
                    first += 32 * VECTORS_IN_FLIGHT;
                }
                tier_commit(&verdict, miss.chunk);
            }
            entry += grid_warps;
        }
    }

    /// Where a packed miss's codes and scales are read from (the tier's entry on a tier hit,
    /// else the stored values) and the first 16-byte vector of its bf16 slot.
    #[inline(always)]
    unsafe fn packed_source(
        p: &FetchParams,
        e: &MissEntry,
        verdict: &Verdict,
        format: ValueFormat,
        code_bytes: u64,
    ) -> (u64, u64, *mut Vec16) {
        let shape = &p.shape;
        let (c, d) = (shape.chunk_size, shape.head_dim);
        let (sequence, miss) = (&e.sequence, e.miss);
        let (codes, scales) = if verdict.hit {
            (verdict.entry, verdict.entry + code_bytes)
        } else {
            let place = packed_chunk(
                format,
                sequence,
                shape.kv_heads,
                e.kv_head,
                miss.chunk,
                c,
                d,
            );
            (p.values + place.codes, p.values + place.scales)
        };
        let row = sequence.kv_row(e.kv_head, sequence.sparse_start + miss.slot * c, d);
        let target = (p.v as *mut Vec16).add((row / 8) as usize);
        (codes, scales, target)
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
        let code_bytes = ValueFormat::Fp8.code_bytes(c as usize, d as usize) as u64;
        let stride = entry_bytes(ValueFormat::Fp8, c as usize, d as usize) as u64;
        let entries = p.sequences * shape.kv_heads * shape.budget_chunks;
        let grid_warps = grid_dim_x() * WARPS;
        let lane = lane_id();
        let mut entry = block_idx_x() * WARPS + warp_id();
        while entry < entries {
            if let Some(e) = miss_at(&p, entry) {
                let verdict = tier_verdict(&p, &e, stride);
                let (codes, scales, target) =
                    packed_source(&p, &e, &verdict, ValueFormat::Fp8, code_bytes);
                let codes = codes as *const Vec16;
                let kept = verdict.entry as *mut Vec16;
                let scale_bits = load_host_mapped_4(scales as *const u32);
                if verdict.insert & (lane == 0) {
                    store_4((verdict.entry + code_bytes) as *mut u32, scale_bits);
                }
                let scale = f32::from_bits(scale_bits);
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
                            if verdict.insert {
                                store_16(kept.add(at as usize), *vector);
                            }
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
                tier_commit(&verdict, e.miss.chunk);
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
        let code_bytes = ValueFormat::Int4.code_bytes(c as usize, d as usize) as u64;
        let stride = entry_bytes(ValueFormat::Int4, c as usize, d as usize) as u64;
        let entries = p.sequences * shape.kv_heads * shape.budget_chunks;
        let grid_warps = grid_dim_x() * WARPS;
        let lane = lane_id();
        let mut entry = block_idx_x() * WARPS + warp_id();
        while entry < entries {
            if let Some(e) = miss_at(&p, entry) {
                let verdict = tier_verdict(&p, &e, stride);
                let (codes, scales, target) =
                    packed_source(&p, &e, &verdict, ValueFormat::Int4, code_bytes);
                let codes = codes as *const [u32; 2];
                let scales = scales as *const u32;
                let kept_codes = verdict.entry as *mut [u32; 2];
                let kept_scales = (verdict.entry + code_bytes) as *mut u32;
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
                            if verdict.insert {
                                store_8(kept_codes.add(at as usize), *vector);
                                // The first unit of a group keeps the group's scale.
                                let channel = (at % units_per_token) * UNIT;
                                if channel.is_multiple_of(INT4_GROUP as u32) {
                                    let token = at / units_per_token;
                                    let group = channel / INT4_GROUP as u32;
                                    store_4(
                                        kept_scales.add((token * groups + group) as usize),
                                        *scale,
                                    );
                                }
                            }
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
                tier_commit(&verdict, e.miss.chunk);
            }
            entry += grid_warps;
        }
    }
}
