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
    let warp_total = popcount(votes);
    if lane == 0 {
        *scratch.add(warp as usize) = warp_total;
    }
    let (before, total) = sum_warp_totals(scratch, warp_total);
    (before + below, total)
}

/// After each warp wrote its total to `scratch[warp]`: (totals of lower warps, block total).
/// Warp 0 scans the totals in place (inclusive), so each thread reads two words instead of
/// summing every warp's total itself (that loop was a fifth of the top-k's instructions).
/// Barriers before (the totals are written), between, and after (`scratch` may be reused).
#[inline(always)]
unsafe fn sum_warp_totals(scratch: *mut u32, warp_total: u32) -> (u32, u32) {
    sync_threads();
    let (warp, lane) = (warp_id(), lane_id());
    let warps = block_dim_x() / 32;
    // Warp-uniform: all of warp 0's lanes take part in the shuffles.
    if warp == 0 {
        let total = if lane < warps {
            *scratch.add(lane as usize)
        } else {
            0
        };
        let inclusive = warp_inclusive_sum(total);
        if lane < warps {
            *scratch.add(lane as usize) = inclusive;
        }
    }
    sync_threads();
    let through_mine = *scratch.add(warp as usize);
    let total = *scratch.add(warps as usize - 1);
    sync_threads();
    (through_mine - warp_total, total)
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
    let warp_total = shuffle_idx_u32(inclusive, 31);
    if lane_id() == 31 {
        *scratch.add(warp as usize) = inclusive;
    }
    let (before, total) = sum_warp_totals(scratch, warp_total);
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
    let sum = warp_sum_f32(value);
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

/// Warp-wide sum of one f32 per lane, returned to every lane (`shfl.sync.bfly` butterflies).
#[inline(always)]
pub fn warp_sum_f32(value: f32) -> f32 {
    let mut sum = value;
    let mut mask = 16;
    while mask > 0 {
        sum += shuffle_xor_f32(sum, mask);
        mask >>= 1;
    }
    sum
}

/// Zeroes `bins` words of shared memory, spread over the block's threads (no barrier).
///
/// # Safety
/// `histogram` points to at least `bins` words of shared memory.
pub unsafe fn clear_u32(histogram: *mut u32, bins: u32) {
    let mut bin = thread_idx_x();
    while bin < bins {
        *histogram.add(bin as usize) = 0;
        bin += block_dim_x();
    }
}

/// Finds the digit of the `remaining`-th largest key among the `bins` counted: writes the
/// digit to `state[0]` and the count in higher bins to `state[1]`. Every thread calls it;
/// thread `t` scans bins `bins - 1 - per * t` downwards (`bins` is a multiple of the block
/// size). Ends with a barrier.
#[inline(always)]
unsafe fn find_digit(
    histogram: *const u32,
    bins: u32,
    remaining: u32,
    scratch: *mut u32,
    state: *mut u32,
) {
    let per = bins / block_dim_x();
    let top = bins - 1 - per * thread_idx_x();
    let mut total = 0;
    for i in 0..per {
        total += *histogram.add((top - i) as usize);
    }
    let (mut above, _) = exclusive_sum(total, scratch);
    if above < remaining && remaining <= above + total {
        for i in 0..per {
            let count = *histogram.add((top - i) as usize);
            if above + count >= remaining {
                *state = top - i;
                *state.add(1) = above;
                break;
            }
            above += count;
        }
    }
    sync_threads();
}

/// Block-wide radix select: the `k`-th largest of the `count` keys `key(0..count)`, whose
/// significant bits are the top `digit_bits.iter().sum()` of the low 32 (keys must be below
/// `1 << that sum`). Returns `(threshold, needed_equal)`: the selection is every key above
/// `threshold` and `needed_equal` of the keys equal to it. The caller has built the
/// histogram of the first digit (`key >> (bits - digit_bits[0])`) in `histogram`, which
/// holds `1 << max(digit_bits)` words of shared memory; `scratch` is [`MAX_WARPS`] words and
/// `state` two. `1 <= k <= count`. Every thread of the block calls it; ends with a barrier.
///
/// # Safety
/// The pointers are shared memory of the sizes above and `key` reads only valid memory for
/// indices below `count`.
#[inline(always)]
pub unsafe fn radix_select(
    key: impl Fn(u32) -> u32,
    count: u32,
    k: u32,
    digit_bits: &[u32],
    histogram: *mut u32,
    scratch: *mut u32,
    state: *mut u32,
) -> (u32, u32) {
    let tid = thread_idx_x();
    let mut shift: u32 = digit_bits.iter().sum();
    // After each pass, `prefix` holds the top bits of the threshold and `remaining` how many
    // of the keys that share them are still to be taken.
    let (mut prefix, mut prefix_mask, mut remaining) = (0u32, 0u32, k);
    for pass in 0..digit_bits.len() {
        let bins = 1u32 << digit_bits[pass];
        shift -= digit_bits[pass];
        find_digit(histogram, bins, remaining, scratch, state);
        let digit = *state;
        remaining -= *state.add(1);
        prefix |= digit << shift;
        prefix_mask |= (bins - 1) << shift;
        if pass + 1 == digit_bits.len() {
            break;
        }
        let next_bins = 1u32 << digit_bits[pass + 1];
        let next_shift = shift - digit_bits[pass + 1];
        // Every thread has read `state` (the barrier of the next `find_digit` or the one
        // below orders its next write after these reads).
        clear_u32(histogram, next_bins);
        sync_threads();
        let mut j = tid;
        while j < count {
            let bits = key(j);
            if bits & prefix_mask == prefix {
                atomic_add_shared_u32(
                    histogram.add(((bits >> next_shift) & (next_bins - 1)) as usize),
                    1,
                );
            }
            j += block_dim_x();
        }
        sync_threads();
    }
    (prefix, remaining)
}
