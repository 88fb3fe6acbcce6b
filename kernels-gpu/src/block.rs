//! Block-wide building blocks that several kernels share (device only).
use crate::device::*;

/// Most warps in a block: the size of the scratch that [`exclusive_count`] needs.
pub const MAX_WARPS: usize = 32;

/// Block-wide ordered count of a per-thread flag: `(set flags in lower threads, total)`.
/// Ranks follow thread order, so a compaction that writes at `running + rank` keeps the
/// input order (deterministic output). Every thread of the block must call it; `scratch` is
/// [`MAX_WARPS`] words of shared memory. Ends with a barrier, so it may be called again at once.
///
/// Never inlined: inline `asm!` is not marked convergent, so LLVM may clone an inlined ballot
/// and its barriers into the divergent branches that compute `flag` (it did, in `plan`). Lanes
/// of one warp then wait at different `vote.sync` instructions and the block deadlocks. Out of
/// line, every thread runs the same instructions.
///
/// # Safety
/// `scratch` points to [`MAX_WARPS`] words of shared memory, and every thread of the block
/// calls this from the same loop iteration.
#[inline(never)]
pub unsafe fn exclusive_count(flag: bool, scratch: *mut u32) -> (u32, u32) {
    let lane = lane_id();
    let warp = warp_id();
    let votes = ballot(flag);
    let below = popcount(votes & ((1u32 << lane) - 1));
    if lane == 0 {
        *scratch.add(warp as usize) = popcount(votes);
    }
    let (before, total) = sum_warp_totals(scratch);
    (before + below, total)
}

/// After each warp wrote its total to `scratch[warp]`: (totals of lower warps, block total).
/// Barriers before (the totals are written) and after (`scratch` may be reused).
#[inline(always)]
unsafe fn sum_warp_totals(scratch: *mut u32) -> (u32, u32) {
    sync_threads();
    let warp = warp_id();
    let (mut before, mut total) = (0u32, 0u32);
    let warps = block_dim_x() / 32;
    let mut w = 0;
    while w < warps {
        let count = *scratch.add(w as usize);
        if w < warp {
            before += count;
        }
        total += count;
        w += 1;
    }
    sync_threads();
    (before, total)
}

/// Block-wide exclusive prefix sum of a per-thread count: `(sum over lower threads, total)`.
/// Same contract as [`exclusive_count`] (never inlined, every thread calls it, `scratch` is
/// [`MAX_WARPS`] words of shared memory, ends with a barrier).
///
/// # Safety
/// As for [`exclusive_count`].
#[inline(never)]
pub unsafe fn exclusive_sum(value: u32, scratch: *mut u32) -> (u32, u32) {
    let warp = warp_id();
    let inclusive = warp_inclusive_sum(value);
    if lane_id() == 31 {
        *scratch.add(warp as usize) = inclusive;
    }
    let (before, total) = sum_warp_totals(scratch);
    (before + inclusive - value, total)
}

/// Warp-wide inclusive prefix sum (`shfl.sync.up` steps 1, 2, 4, 8, 16).
#[inline(always)]
pub fn warp_inclusive_sum(value: u32) -> u32 {
    let lane = lane_id();
    let mut sum = value;
    let mut delta = 1;
    while delta < 32 {
        let other = shuffle_up_u32(sum, delta);
        if lane >= delta {
            sum += other;
        }
        delta <<= 1;
    }
    sum
}

/// Block-wide sum of one f32 per thread, returned to every thread (warp butterflies, then the
/// warp sums through `scratch`). Same contract as [`exclusive_count`]: never inlined, every
/// thread calls it, `scratch` is [`MAX_WARPS`] words of shared memory, ends with a barrier.
///
/// # Safety
/// As for [`exclusive_count`].
#[inline(never)]
pub unsafe fn sum_f32(value: f32, scratch: *mut f32) -> f32 {
    let mut sum = value;
    let mut mask = 16;
    while mask > 0 {
        sum += shuffle_xor_f32(sum, mask);
        mask >>= 1;
    }
    if lane_id() == 0 {
        *scratch.add(warp_id() as usize) = sum;
    }
    sync_threads();
    let mut total = 0.0f32;
    let mut w = 0;
    while w < block_dim_x() / 32 {
        total += *scratch.add(w as usize);
        w += 1;
    }
    sync_threads();
    total
}
