//! Block-wide building blocks that several kernels share (device only).
use crate::device::*;

/// Most warps in a block: the size of the scratch that [`exclusive_count`] needs.
pub const MAX_WARPS: usize = 32;

/// The blocks that share one block-wide operation: the blocks of a thread-block cluster, or
/// one block alone. Their shared memory is read across blocks after [`Cluster::sync`] or
/// [`Cluster::sync_shared`].
#[derive(Clone, Copy)]
pub struct Cluster {
    pub rank: u32,
    pub blocks: u32,
}

impl Cluster {
    /// This block's cluster (a cluster of one when launched without clusters).
    #[inline(always)]
    pub fn current() -> Self {
        Cluster {
            rank: cluster_rank(),
            // Never 0; the bound lets the compiler drop division-by-zero checks.
            blocks: cluster_blocks().max(1),
        }
    }

    /// The block alone, whatever the launch.
    pub const SINGLE: Cluster = Cluster { rank: 0, blocks: 1 };

    /// A barrier over the cluster's blocks, none for one block (its callers' block barriers
    /// order its own accesses). Every thread of every block calls it.
    #[inline(always)]
    pub fn sync(self) {
        if self.blocks > 1 {
            sync_cluster();
        }
    }

    /// [`sync`](Self::sync) for exchanges of shared memory alone: it orders this block's
    /// shared-memory accesses before it with the cluster's after it, not global memory.
    #[inline(always)]
    pub fn sync_shared(self) {
        if self.blocks > 1 {
            sync_cluster_shared();
        }
    }

    /// The sum over the cluster's blocks of rank below `below_rank` of the shared-memory
    /// word that `pointer` names in each (every load issued before any is added).
    ///
    /// # Safety
    /// `pointer` is a generic pointer into shared memory, and every block has written the
    /// word before a [`Cluster::sync_shared`] (or [`Cluster::sync`]) that this thread has
    /// passed.
    #[inline(always)]
    pub unsafe fn sum_below(self, pointer: *mut u32, below_rank: u32) -> u32 {
        if self.blocks == 1 {
            return if below_rank > 0 { *pointer } else { 0 };
        }
        let mut words = [0u32; crate::MAX_CLUSTER_BLOCKS as usize];
        for (rank, word) in words.iter_mut().enumerate() {
            if (rank as u32) < min_u32(below_rank, self.blocks) {
                *word = *shared_in_block(pointer, rank as u32);
            }
        }
        words.iter().sum()
    }

    /// [`sum_below`](Self::sum_below) over every block of the cluster.
    ///
    /// # Safety
    /// As for [`sum_below`](Self::sum_below).
    #[inline(always)]
    pub unsafe fn sum(self, pointer: *mut u32) -> u32 {
        self.sum_below(pointer, self.blocks)
    }
}

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

/// Finds the digit of the `remaining`-th largest key among the `bins` counted (summed over
/// the cluster's histograms): writes the digit to `state[0]` and the count in higher bins to
/// `state[1]`. Every thread calls it; thread `t` scans bins `bins - 1 - per * t` downwards
/// (`bins` is a multiple of the block size). Ends with a barrier.
#[inline(always)]
unsafe fn find_digit(
    histogram: *mut u32,
    bins: u32,
    remaining: u32,
    scratch: *mut u32,
    state: *mut u32,
    cluster: Cluster,
) {
    let per = bins / block_dim_x();
    let top = bins - 1 - per * thread_idx_x();
    let mut total = 0;
    for i in 0..per {
        total += cluster.sum(histogram.add((top - i) as usize));
    }
    let (mut above, _) = exclusive_sum(total, scratch);
    if above < remaining && remaining <= above + total {
        for i in 0..per {
            let count = cluster.sum(histogram.add((top - i) as usize));
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

/// Cluster-wide radix select: the `k`-th largest of the keys of the cluster's blocks, this
/// block's being `key(0..count)`, whose significant bits are the top
/// `digit_bits.iter().sum()` of the low 32 (keys must be below `1 << that sum`). Returns
/// `(threshold, needed_equal)`, the same in every block: the selection is every key above
/// `threshold` and `needed_equal` of the keys equal to it. Each block has built the
/// histogram of the first digit of its keys (`key >> (bits - digit_bits[0])`) in
/// `histogram`, which holds `1 << max(digit_bits)` words of shared memory; `scratch` is
/// [`MAX_WARPS`] words and `state` two. `1 <= k <=` the cluster's keys. Every thread of every
/// block of the cluster calls it; ends with a block barrier, after which the other blocks may
/// still read this block's histogram until the next [`Cluster::sync_shared`].
///
/// # Safety
/// The pointers are shared memory of the sizes above and `key` reads only valid memory for
/// indices below `count`.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
pub unsafe fn radix_select(
    key: impl Fn(u32) -> u32,
    count: u32,
    k: u32,
    digit_bits: &[u32],
    histogram: *mut u32,
    scratch: *mut u32,
    state: *mut u32,
    cluster: Cluster,
) -> (u32, u32) {
    let tid = thread_idx_x();
    let mut shift: u32 = digit_bits.iter().sum();
    // After each pass, `prefix` holds the top bits of the threshold and `remaining` how many
    // of the keys that share them are still to be taken.
    let (mut prefix, mut prefix_mask, mut remaining) = (0u32, 0u32, k);
    for pass in 0..digit_bits.len() {
        let bins = 1u32 << digit_bits[pass];
        shift -= digit_bits[pass];
        // Every block's histogram is complete.
        cluster.sync_shared();
        find_digit(histogram, bins, remaining, scratch, state, cluster);
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
        // below orders its next write after these reads), and every block of the cluster
        // has read this block's histogram before it is cleared.
        cluster.sync_shared();
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
