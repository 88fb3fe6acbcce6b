//! Device primitives: the only place that writes PTX by hand. Kernels call these and never
//! use `asm!` themselves. Each function names the PTX it emits.
//!
//! All functions are `#[inline(always)]`: they are a vocabulary, not calls.
#![allow(clippy::missing_safety_doc)]

use core::arch::asm;
use core::arch::nvptx;

// ---------------------------------------------------------------------------------------
// Ids and barriers
// ---------------------------------------------------------------------------------------

/// `mov.u32 %r, %tid.x`
#[inline(always)]
pub fn thread_idx_x() -> u32 {
    // SAFETY: reads a special register; no memory is touched.
    unsafe { nvptx::_thread_idx_x() as u32 }
}

/// `mov.u32 %r, %ntid.x`
#[inline(always)]
pub fn block_dim_x() -> u32 {
    // SAFETY: reads a special register.
    unsafe { nvptx::_block_dim_x() as u32 }
}

/// `mov.u32 %r, %nctaid.x`
#[inline(always)]
pub fn grid_dim_x() -> u32 {
    // SAFETY: reads a special register.
    unsafe { nvptx::_grid_dim_x() as u32 }
}

/// `mov.u32 %r, %ctaid.x`
#[inline(always)]
pub fn block_idx_x() -> u32 {
    // SAFETY: reads a special register.
    unsafe { nvptx::_block_idx_x() as u32 }
}

/// `mov.u32 %r, %ctaid.y`
#[inline(always)]
pub fn block_idx_y() -> u32 {
    // SAFETY: reads a special register.
    unsafe { nvptx::_block_idx_y() as u32 }
}

/// `mov.u32 %r, %ctaid.z`
#[inline(always)]
pub fn block_idx_z() -> u32 {
    // SAFETY: reads a special register.
    unsafe { nvptx::_block_idx_z() as u32 }
}

/// Lane within the warp (`%tid.x & 31`).
#[inline(always)]
pub fn lane_id() -> u32 {
    thread_idx_x() & 31
}

/// Warp within the block (`%tid.x >> 5`).
#[inline(always)]
pub fn warp_id() -> u32 {
    thread_idx_x() >> 5
}

/// `bar.sync 0`: every thread of the block; orders shared-memory accesses.
#[inline(always)]
pub fn sync_threads() {
    // SAFETY: a block-wide barrier; all kernels call it from uniform control flow.
    unsafe { nvptx::_syncthreads() }
}

/// `trap`: used by the panic handler.
#[inline(always)]
pub fn trap() -> ! {
    // SAFETY: aborts the kernel.
    unsafe { nvptx::trap() }
}

// ---------------------------------------------------------------------------------------
// Thread-block clusters (sm_90)
// ---------------------------------------------------------------------------------------
// Before sm_90 there are no clusters (the host never launches one there), so the same names
// describe a block alone: rank 0 of 1, a block barrier, the block's own shared memory. With
// the rank and count constant, the cluster code of the kernels folds away.

/// `mov.u32 %r, %cluster_ctarank`: this block's rank in its cluster (0 without clusters).
#[cfg(target_feature = "sm_90")]
#[inline(always)]
pub fn cluster_rank() -> u32 {
    let rank: u32;
    // SAFETY: reads a special register.
    unsafe { asm!("mov.u32 {r}, %cluster_ctarank;", r = out(reg32) rank, options(nostack)) }
    rank
}

/// `mov.u32 %r, %cluster_nctarank`: blocks in this block's cluster (1 without clusters).
#[cfg(target_feature = "sm_90")]
#[inline(always)]
pub fn cluster_blocks() -> u32 {
    let blocks: u32;
    // SAFETY: reads a special register.
    unsafe { asm!("mov.u32 {r}, %cluster_nctarank;", r = out(reg32) blocks, options(nostack)) }
    blocks
}

/// `barrier.cluster.arrive.aligned` then `barrier.cluster.wait.aligned` (release and acquire,
/// their default semantics): every thread of every block of the cluster; orders all the
/// memory accesses before it, global included, with those after it. The release compiles to
/// `MEMBAR.ALL.GPU` + `ERRBAR`, which wait for every store in flight: about a microsecond
/// after a pass of global stores. Where only shared memory is exchanged, use
/// [`sync_cluster_shared`].
#[cfg(target_feature = "sm_90")]
#[inline(always)]
pub fn sync_cluster() {
    // SAFETY: a cluster-wide barrier; callers reach it from block-uniform control flow in
    // every block of the cluster.
    unsafe {
        asm!(
            "barrier.cluster.arrive.aligned;",
            "barrier.cluster.wait.aligned;",
            options(nostack)
        )
    }
}

/// `fence.release.sync_restrict::shared::cta.cluster`, `barrier.cluster.arrive.relaxed.aligned`,
/// `barrier.cluster.wait.aligned`: a cluster barrier that orders only this block's
/// shared-memory accesses before it with the cluster's accesses after it (the release fence
/// covers shared memory alone: `MEMBAR.ALL.CTA`, no wait for global stores). Every thread of
/// every block of the cluster calls it.
#[cfg(target_feature = "sm_90")]
#[inline(always)]
pub fn sync_cluster_shared() {
    // SAFETY: a cluster-wide barrier; callers reach it from block-uniform control flow in
    // every block of the cluster.
    unsafe {
        asm!(
            "fence.release.sync_restrict::shared::cta.cluster;",
            "barrier.cluster.arrive.relaxed.aligned;",
            "barrier.cluster.wait.aligned;",
            options(nostack)
        )
    }
}

/// `mapa.u64 d, p, rank`: the generic address of the shared-memory word that `pointer` (a
/// generic pointer into this block's shared memory) names in block `rank` of the cluster.
#[cfg(target_feature = "sm_90")]
#[inline(always)]
pub fn shared_in_block<T>(pointer: *mut T, rank: u32) -> *mut T {
    let mapped: u64;
    // SAFETY: address arithmetic only.
    unsafe {
        asm!(
            "mapa.u64 {d}, {p}, {r};",
            d = out(reg64) mapped, p = in(reg64) pointer as u64, r = in(reg32) rank,
            options(nostack)
        );
    }
    mapped as *mut T
}

/// Rank 0: without clusters (before sm_90) every block is alone.
#[cfg(not(target_feature = "sm_90"))]
#[inline(always)]
pub fn cluster_rank() -> u32 {
    0
}

/// 1: without clusters (before sm_90) every block is alone.
#[cfg(not(target_feature = "sm_90"))]
#[inline(always)]
pub fn cluster_blocks() -> u32 {
    1
}

/// `bar.sync 0`: the barrier of a cluster of one block (before sm_90).
#[cfg(not(target_feature = "sm_90"))]
#[inline(always)]
pub fn sync_cluster() {
    sync_threads();
}

/// `bar.sync 0`: the barrier of a cluster of one block (before sm_90).
#[cfg(not(target_feature = "sm_90"))]
#[inline(always)]
pub fn sync_cluster_shared() {
    sync_threads();
}

/// `pointer` itself: block `rank` of a cluster of one is this block (before sm_90).
#[cfg(not(target_feature = "sm_90"))]
#[inline(always)]
pub fn shared_in_block<T>(pointer: *mut T, _rank: u32) -> *mut T {
    pointer
}

// ---------------------------------------------------------------------------------------
// Warp shuffles
// ---------------------------------------------------------------------------------------

/// `shfl.sync.bfly.b32 d, v, lane_mask, 0x1f, 0xffffffff`: the value of lane `lane ^ lane_mask`.
/// All 32 lanes must call it.
#[inline(always)]
pub fn shuffle_xor_f32(value: f32, lane_mask: u32) -> f32 {
    let out: f32;
    // SAFETY: register-only warp exchange with a full member mask.
    unsafe {
        asm!(
            "shfl.sync.bfly.b32 {out}, {value}, {mask}, 0x1f, 0xffffffff;",
            out = out(reg32) out, value = in(reg32) value, mask = in(reg32) lane_mask,
        );
    }
    out
}

/// `shfl.sync.idx.b32 d, v, src_lane, 0x1f, 0xffffffff`: the value of lane `src_lane`.
#[inline(always)]
pub fn shuffle_idx_u32(value: u32, src_lane: u32) -> u32 {
    let out: u32;
    // SAFETY: register-only warp exchange with a full member mask.
    unsafe {
        asm!(
            "shfl.sync.idx.b32 {out}, {value}, {src}, 0x1f, 0xffffffff;",
            out = out(reg32) out, value = in(reg32) value, src = in(reg32) src_lane,
        );
    }
    out
}

/// `shfl.sync.up.b32 d, v, delta, 0, 0xffffffff`: the value of lane `lane - delta` (a lane
/// below `delta` gets its own value).
#[inline(always)]
pub fn shuffle_up_u32(value: u32, delta: u32) -> u32 {
    let out: u32;
    // SAFETY: register-only warp exchange with a full member mask.
    unsafe {
        asm!(
            "shfl.sync.up.b32 {out}, {value}, {delta}, 0, 0xffffffff;",
            out = out(reg32) out, value = in(reg32) value, delta = in(reg32) delta,
        );
    }
    out
}

/// `vote.sync.ballot.b32 d, p, 0xffffffff`: bit `i` set where lane `i` passed `true`.
/// All 32 lanes must call it.
#[inline(always)]
pub fn ballot(predicate: bool) -> u32 {
    let out: u32;
    // SAFETY: register-only warp vote with a full member mask.
    unsafe {
        asm!(
            "{{ .reg .pred p; setp.ne.u32 p, {v}, 0; vote.sync.ballot.b32 {out}, p, 0xffffffff; }}",
            out = out(reg32) out, v = in(reg32) predicate as u32,
        );
    }
    out
}

/// `popc.b32`: set bits of a word.
#[inline(always)]
pub fn popcount(word: u32) -> u32 {
    word.count_ones()
}

/// `bar.warp.sync 0xffffffff`: orders the warp's shared-memory accesses (and waits for its
/// lanes), as after a warp's own `cp.async` copies land.
#[inline(always)]
pub fn sync_warp() {
    // SAFETY: a warp barrier; callers reach it from warp-uniform control flow.
    unsafe { asm!("bar.warp.sync 0xffffffff;", options(nostack)) }
}

// ---------------------------------------------------------------------------------------
// Shared memory
// ---------------------------------------------------------------------------------------

core::arch::global_asm!(".extern .shared .align 16 .b8 SHADOWKV_DYNAMIC_SHARED[];");

/// Generic pointer to the block's dynamic shared memory (`cvta.shared.u64 p, SYMBOL`).
/// Its size is the launch's `shared_mem_bytes`, which each family computes in its shared
/// layout module.
#[inline(always)]
pub fn dynamic_shared<T>() -> *mut T {
    let pointer: u64;
    // SAFETY: takes the address of a shared-memory symbol; no access.
    unsafe {
        asm!("cvta.shared.u64 {p}, SHADOWKV_DYNAMIC_SHARED;", p = out(reg64) pointer);
    }
    pointer as *mut T
}

/// Declares a static shared-memory array of `bytes` bytes and a function returning its
/// generic address (`.shared .align 16 .b8 NAME_SHARED[bytes]` and `cvta.shared.u64`).
///
/// `static_shared!(pub fn scratch() -> *mut f32; bytes = 1024);`
#[macro_export]
macro_rules! static_shared {
    ($vis:vis fn $name:ident() -> *mut $ty:ty; bytes = $bytes:literal) => {
        core::arch::global_asm!(concat!(
            ".shared .align 16 .b8 ", stringify!($name), "_SHARED[", $bytes, "];"
        ));
        #[inline(always)]
        $vis fn $name() -> *mut $ty {
            let pointer: u64;
            // SAFETY: takes the address of a shared-memory symbol; no access.
            unsafe {
                core::arch::asm!(
                    concat!("cvta.shared.u64 {p}, ", stringify!($name), "_SHARED;"),
                    p = out(reg64) pointer,
                );
            }
            pointer as *mut $ty
        }
    };
}

/// The 32-bit shared-window address of a generic pointer into shared memory
/// (`cvta.to.shared.u64` then truncation), as `ldmatrix` and `cp.async` take it.
#[inline(always)]
pub fn shared_address<T>(pointer: *const T) -> u32 {
    let address: u64;
    // SAFETY: address arithmetic only.
    unsafe {
        asm!("cvta.to.shared.u64 {a}, {p};", a = out(reg64) address, p = in(reg64) pointer as u64);
    }
    address as u32
}

/// `atom.shared.add.u32`: adds to a shared-memory word, returns the old value.
#[inline(always)]
pub unsafe fn atomic_add_shared_u32(pointer: *mut u32, value: u32) -> u32 {
    let old: u32;
    asm!(
        "atom.shared.add.u32 {old}, [{a}], {v};",
        old = out(reg32) old, a = in(reg32) shared_address(pointer), v = in(reg32) value,
        options(nostack),
    );
    old
}

/// `atom.shared.or.b32`: sets bits of a shared-memory word.
#[inline(always)]
pub unsafe fn atomic_or_shared_u32(pointer: *mut u32, bits: u32) {
    asm!(
        "red.shared.or.b32 [{a}], {v};",
        a = in(reg32) shared_address(pointer), v = in(reg32) bits,
        options(nostack),
    );
}

// ---------------------------------------------------------------------------------------
// Global and host-mapped memory
// ---------------------------------------------------------------------------------------

/// Sixteen bytes: eight bf16 values, or four f32.
pub type Vec16 = [u32; 4];

/// A 16-byte global load through the PTX instruction `$instruction` (`ld.global...v4.u32`);
/// the loads below differ only in their cache qualifiers.
macro_rules! load_16_with {
    ($(#[$doc:meta])* $name:ident = $instruction:literal) => {
        $(#[$doc])*
        #[inline(always)]
        pub unsafe fn $name(pointer: *const Vec16) -> Vec16 {
            let (a, b, c, d): (u32, u32, u32, u32);
            asm!(
                concat!($instruction, " {{{a}, {b}, {c}, {d}}}, [{p}];"),
                a = out(reg32) a, b = out(reg32) b, c = out(reg32) c, d = out(reg32) d,
                p = in(reg64) pointer as u64,
                options(readonly, nostack),
            );
            [a, b, c, d]
        }
    };
}

load_16_with! {
    /// `ld.global.nc.L1::no_allocate.v4.u32`: a 16-byte read-only load that streams past L1
    /// (K/V rows are read once per step).
    load_stream_16 = "ld.global.nc.L1::no_allocate.v4.u32"
}

load_16_with! {
    /// `ld.global.nc.L1::no_allocate.L2::256B.v4.u32`: as [`load_stream_16`], and L2 fetches
    /// the whole 256-byte block around it from memory (for loads that touch part of a row
    /// each and the rest of it in the next few loads).
    load_stream_16_block = "ld.global.nc.L1::no_allocate.L2::256B.v4.u32"
}

load_16_with! {
    /// `ld.global.nc.v4.u32`: a 16-byte read-only load that may be reused from L1.
    load_16 = "ld.global.nc.v4.u32"
}

load_16_with! {
    /// `ld.global.cs.v4.u32`: a 16-byte load from pinned, device-mapped host memory, read
    /// once over PCIe (cache-streaming, evict first).
    load_host_mapped_16 = "ld.global.cs.v4.u32"
}

/// `st.global.v4.u32`: a 16-byte store.
#[inline(always)]
pub unsafe fn store_16(pointer: *mut Vec16, value: Vec16) {
    asm!(
        "st.global.v4.u32 [{p}], {{{a}, {b}, {c}, {d}}};",
        p = in(reg64) pointer as u64,
        a = in(reg32) value[0], b = in(reg32) value[1], c = in(reg32) value[2], d = in(reg32) value[3],
        options(nostack),
    );
}

/// `ld.global.cs.v2.u32`: an 8-byte load from pinned, device-mapped host memory, read once
/// over PCIe (cache-streaming, evict first).
#[inline(always)]
pub unsafe fn load_host_mapped_8(pointer: *const [u32; 2]) -> [u32; 2] {
    let (a, b): (u32, u32);
    asm!(
        "ld.global.cs.v2.u32 {{{a}, {b}}}, [{p}];",
        a = out(reg32) a, b = out(reg32) b, p = in(reg64) pointer as u64,
        options(readonly, nostack),
    );
    [a, b]
}

/// `ld.global.cs.u32`: a 4-byte load from pinned, device-mapped host memory, read once over
/// PCIe (cache-streaming, evict first).
#[inline(always)]
pub unsafe fn load_host_mapped_4(pointer: *const u32) -> u32 {
    let a: u32;
    asm!(
        "ld.global.cs.u32 {a}, [{p}];",
        a = out(reg32) a, p = in(reg64) pointer as u64,
        options(readonly, nostack),
    );
    a
}

/// `st.global.v2.u32`: an 8-byte store.
#[inline(always)]
pub unsafe fn store_8(pointer: *mut [u32; 2], value: [u32; 2]) {
    asm!(
        "st.global.v2.u32 [{p}], {{{a}, {b}}};",
        p = in(reg64) pointer as u64, a = in(reg32) value[0], b = in(reg32) value[1],
        options(nostack),
    );
}

/// `st.global.u32`: a 4-byte store.
#[inline(always)]
pub unsafe fn store_4(pointer: *mut u32, value: u32) {
    asm!(
        "st.global.u32 [{p}], {a};",
        p = in(reg64) pointer as u64, a = in(reg32) value,
        options(nostack),
    );
}

/// `ld.global.cg.f32`: a load cached in L2 only, for data other blocks wrote during this
/// launch (L1 is not coherent across multiprocessors).
#[inline(always)]
pub unsafe fn load_l2_f32(pointer: *const f32) -> f32 {
    let value: f32;
    asm!(
        "ld.global.cg.f32 {v}, [{p}];",
        v = out(reg32) value, p = in(reg64) pointer as u64,
        options(readonly, nostack),
    );
    value
}

/// `atom.global.acq_rel.gpu.add.u32`: adds `value` and returns the old value, ordered with
/// the surrounding loads and stores at GPU scope.
#[inline(always)]
pub unsafe fn atomic_add_u32(pointer: *mut u32, value: u32) -> u32 {
    let old: u32;
    asm!(
        "atom.global.acq_rel.gpu.add.u32 {old}, [{p}], {v};",
        old = out(reg32) old, p = in(reg64) pointer as u64, v = in(reg32) value,
        options(nostack),
    );
    old
}

/// `fence.acq_rel.gpu`: makes this thread's earlier writes visible GPU-wide before its later
/// ones (`__threadfence()`).
#[inline(always)]
pub fn fence_gpu() {
    // SAFETY: a memory fence.
    unsafe { asm!("fence.acq_rel.gpu;", options(nostack)) }
}

// ---------------------------------------------------------------------------------------
// Asynchronous copies (global -> shared)
// ---------------------------------------------------------------------------------------

/// `cp.async.cg.shared.global [s], [g], 16`: start a 16-byte copy that bypasses registers.
#[inline(always)]
pub unsafe fn copy_async_16(shared: u32, global: *const Vec16) {
    asm!(
        "cp.async.cg.shared.global [{s}], [{g}], 16;",
        s = in(reg32) shared, g = in(reg64) global as u64,
        options(nostack),
    );
}

/// `cp.async.commit_group`: close the group of copies started since the last commit.
#[inline(always)]
pub fn copy_async_commit() {
    // SAFETY: bookkeeping of the thread's own async copies.
    unsafe { asm!("cp.async.commit_group;", options(nostack)) }
}

/// `cp.async.wait_group N`: wait until at most `PENDING` committed groups are in flight.
#[inline(always)]
pub fn copy_async_wait<const PENDING: u32>() {
    // SAFETY: waits on the thread's own async copies.
    unsafe { asm!("cp.async.wait_group {n};", n = const PENDING, options(nostack)) }
}

// ---------------------------------------------------------------------------------------
// Tensor cores
// ---------------------------------------------------------------------------------------

/// `ldmatrix.sync.aligned.m8n8.x4.shared.b16`: four 8x8 b16 tiles from shared memory, lane
/// `i` giving the row address for tile `i / 8`; each lane receives one 32-bit fragment per tile.
#[inline(always)]
pub unsafe fn load_matrix_x4(shared_row: u32) -> [u32; 4] {
    let (a, b, c, d): (u32, u32, u32, u32);
    asm!(
        "ldmatrix.sync.aligned.m8n8.x4.shared.b16 {{{a}, {b}, {c}, {d}}}, [{s}];",
        a = out(reg32) a, b = out(reg32) b, c = out(reg32) c, d = out(reg32) d,
        s = in(reg32) shared_row,
        options(readonly, nostack),
    );
    [a, b, c, d]
}

/// `ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16`: two transposed 8x8 b16 tiles (lanes 0-15
/// give the row addresses), the B operand of `mma` from a row-major `[k, n]` tile.
#[inline(always)]
pub unsafe fn load_matrix_x2_transposed(shared_row: u32) -> [u32; 2] {
    let (a, b): (u32, u32);
    asm!(
        "ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {{{a}, {b}}}, [{s}];",
        a = out(reg32) a, b = out(reg32) b,
        s = in(reg32) shared_row,
        options(readonly, nostack),
    );
    [a, b]
}

/// `ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16`: four transposed 8x8 b16 tiles (lane `i`
/// gives the row address for tile `i / 8`): the B operands of two `mma` n-tiles at once.
#[inline(always)]
pub unsafe fn load_matrix_x4_transposed(shared_row: u32) -> [u32; 4] {
    let (a, b, c, d): (u32, u32, u32, u32);
    asm!(
        "ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {{{a}, {b}, {c}, {d}}}, [{s}];",
        a = out(reg32) a, b = out(reg32) b, c = out(reg32) c, d = out(reg32) d,
        s = in(reg32) shared_row,
        options(readonly, nostack),
    );
    [a, b, c, d]
}

/// `mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32`: `D = A·B + C` for a 16x16 bf16 A
/// (four registers), a 16x8 bf16 B (two registers) and a 16x8 f32 accumulator (four).
#[inline(always)]
pub fn mma_bf16_m16n8k16(a: [u32; 4], b: [u32; 2], c: [f32; 4]) -> [f32; 4] {
    let [mut d0, mut d1, mut d2, mut d3] = c;
    // SAFETY: register-only warp-wide matrix op; all lanes call it.
    unsafe {
        asm!(
            "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {{{d0}, {d1}, {d2}, {d3}}}, {{{a0}, {a1}, {a2}, {a3}}}, {{{b0}, {b1}}}, {{{d0}, {d1}, {d2}, {d3}}};",
            d0 = inout(reg32) d0, d1 = inout(reg32) d1, d2 = inout(reg32) d2, d3 = inout(reg32) d3,
            a0 = in(reg32) a[0], a1 = in(reg32) a[1], a2 = in(reg32) a[2], a3 = in(reg32) a[3],
            b0 = in(reg32) b[0], b1 = in(reg32) b[1],
            options(pure, nomem, nostack),
        );
    }
    [d0, d1, d2, d3]
}

// ---------------------------------------------------------------------------------------
// Conversions and fast math
// ---------------------------------------------------------------------------------------

/// The two bf16 halves of a 32-bit word as f32 (low half first). A bf16 is the top half of
/// an f32, so this is two integer ops and no instruction of its own.
#[inline(always)]
pub fn bf16x2_to_f32(word: u32) -> [f32; 2] {
    [
        f32::from_bits(word << 16),
        f32::from_bits(word & 0xffff_0000),
    ]
}

/// Eight bf16 values in a 16-byte vector as f32.
#[inline(always)]
pub fn bf16x8_to_f32(vector: Vec16) -> [f32; 8] {
    let mut out = [0.0f32; 8];
    let mut i = 0;
    while i < 4 {
        let [lo, hi] = bf16x2_to_f32(vector[i]);
        out[2 * i] = lo;
        out[2 * i + 1] = hi;
        i += 1;
    }
    out
}

/// One bf16 (its bits) as f32: the bits are the top half of the f32 (no instruction).
#[inline(always)]
pub fn bf16_to_f32(bits: u16) -> f32 {
    f32::from_bits((bits as u32) << 16)
}

/// `cvt.rn.bf16x2.f32 d, hi, lo`: two f32 rounded to nearest-even bf16, `lo` in the low half.
#[inline(always)]
pub fn f32x2_to_bf16x2(lo: f32, hi: f32) -> u32 {
    let out: u32;
    // SAFETY: register-only conversion.
    unsafe {
        asm!(
            "cvt.rn.bf16x2.f32 {d}, {hi}, {lo};",
            d = out(reg32) out, hi = in(reg32) hi, lo = in(reg32) lo,
            options(pure, nomem, nostack),
        );
    }
    out
}

/// `x` with its low 16 bits cleared: the bf16 nearest `x` toward zero, as an f32 (one integer
/// op; `x - bf16_truncate(x)` is exact in f32 and below `x`'s bf16 spacing).
#[inline(always)]
pub fn bf16_truncate(x: f32) -> f32 {
    f32::from_bits(x.to_bits() & 0xffff_0000)
}

/// `cvt.rn.bf16.f32`: one f32 rounded to nearest-even bf16 (returned as its bits).
#[inline(always)]
pub fn f32_to_bf16(value: f32) -> u16 {
    let out: u16;
    // SAFETY: register-only conversion.
    unsafe {
        asm!(
            "cvt.rn.bf16.f32 {d}, {v};",
            d = out(reg16) out, v = in(reg32) value,
            options(pure, nomem, nostack),
        );
    }
    out
}

/// `cvt.rn.f16.f32`: one f32 rounded to nearest-even f16 (its bits; out of range gives
/// infinity).
#[inline(always)]
pub fn f32_to_f16(value: f32) -> u16 {
    let out: u16;
    // SAFETY: register-only conversion.
    unsafe {
        asm!(
            "cvt.rn.f16.f32 {d}, {v};",
            d = out(reg16) out, v = in(reg32) value,
            options(pure, nomem, nostack),
        );
    }
    out
}

/// `cvt.f32.f16`: one f16 (its bits) as f32 (exact).
#[inline(always)]
pub fn f16_to_f32(bits: u16) -> f32 {
    let out: f32;
    // SAFETY: register-only conversion.
    unsafe {
        asm!(
            "cvt.f32.f16 {d}, {v};",
            d = out(reg32) out, v = in(reg16) bits,
            options(pure, nomem, nostack),
        );
    }
    out
}

/// `cvt.rni.f32.f32`: the nearest integer (ties to even) as an f32 (NaN stays NaN).
#[inline(always)]
pub fn round_f32(x: f32) -> f32 {
    let out: f32;
    // SAFETY: register-only conversion.
    unsafe {
        asm!("cvt.rni.f32.f32 {d}, {x};", d = out(reg32) out, x = in(reg32) x,
             options(pure, nomem, nostack));
    }
    out
}

// fp8 (e4m3) conversions. sm_89 and later convert in hardware (PTX ISA 8.1 on sm_89); the
// sm_80 module converts in software to the same bits (round to nearest even, saturating at ±448, NaN to 0x7f), so
// that every target writes and reads the same host layout.

/// `cvt.rn.satfinite.e4m3x2.f32 d, hi, lo`: two f32 rounded to nearest-even e4m3, saturating
/// at ±448 (NaN gives 0x7f), `lo` in the low byte.
#[cfg(all(target_feature = "sm_89", target_feature = "ptx81"))]
#[inline(always)]
pub fn f32x2_to_e4m3x2(lo: f32, hi: f32) -> u16 {
    let out: u16;
    // SAFETY: register-only conversion.
    unsafe {
        asm!(
            "cvt.rn.satfinite.e4m3x2.f32 {d}, {hi}, {lo};",
            d = out(reg16) out, hi = in(reg32) hi, lo = in(reg32) lo,
            options(pure, nomem, nostack),
        );
    }
    out
}

/// Two f32 rounded to nearest-even e4m3, saturating at ±448 (NaN gives 0x7f), `lo` in the
/// low byte: the bits `cvt.rn.satfinite.e4m3x2.f32` gives on sm_89, in integer code (sm_80
/// has no fp8 conversion).
#[cfg(not(all(target_feature = "sm_89", target_feature = "ptx81")))]
#[inline(always)]
pub fn f32x2_to_e4m3x2(lo: f32, hi: f32) -> u16 {
    use crate::values::fp8_encode_bits;
    fp8_encode_bits(lo) as u16 | (fp8_encode_bits(hi) as u16) << 8
}

/// `cvt.rn.f16x2.e4m3x2 d, a` then `cvt.f32.f16`: two e4m3 values (low byte first) as f32,
/// exact (every e4m3 value is an f16).
#[cfg(all(target_feature = "sm_89", target_feature = "ptx81"))]
#[inline(always)]
pub fn e4m3x2_to_f32(codes: u16) -> [f32; 2] {
    let halves: u32;
    // SAFETY: register-only conversion.
    unsafe {
        asm!(
            "cvt.rn.f16x2.e4m3x2 {d}, {a};",
            d = out(reg32) halves, a = in(reg16) codes,
            options(pure, nomem, nostack),
        );
    }
    [f16_to_f32(halves as u16), f16_to_f32((halves >> 16) as u16)]
}

/// Two e4m3 values (low byte first) as f32, exact: what `cvt.rn.f16x2.e4m3x2` gives on sm_89,
/// in integer code (sm_80 has no fp8 conversion).
#[cfg(not(all(target_feature = "sm_89", target_feature = "ptx81")))]
#[inline(always)]
pub fn e4m3x2_to_f32(codes: u16) -> [f32; 2] {
    use crate::values::fp8_decode_bits;
    [
        fp8_decode_bits(codes as u8),
        fp8_decode_bits((codes >> 8) as u8),
    ]
}

/// `ex2.approx.ftz.f32`: 2^x (2 ulp; -inf gives +0).
#[inline(always)]
pub fn exp2(x: f32) -> f32 {
    let out: f32;
    // SAFETY: register-only special function.
    unsafe {
        asm!("ex2.approx.ftz.f32 {d}, {x};", d = out(reg32) out, x = in(reg32) x,
             options(pure, nomem, nostack));
    }
    out
}

/// `lg2.approx.ftz.f32`: log2(x).
#[inline(always)]
pub fn log2(x: f32) -> f32 {
    let out: f32;
    // SAFETY: register-only special function.
    unsafe {
        asm!("lg2.approx.ftz.f32 {d}, {x};", d = out(reg32) out, x = in(reg32) x,
             options(pure, nomem, nostack));
    }
    out
}

/// `sqrt.rn.f32`: correctly rounded square root.
#[inline(always)]
pub fn sqrt(x: f32) -> f32 {
    let out: f32;
    // SAFETY: register-only arithmetic.
    unsafe {
        asm!("sqrt.rn.f32 {d}, {x};", d = out(reg32) out, x = in(reg32) x, options(pure, nomem, nostack));
    }
    out
}

/// `rcp.approx.ftz.f32`: 1/x.
#[inline(always)]
pub fn reciprocal(x: f32) -> f32 {
    let out: f32;
    // SAFETY: register-only special function.
    unsafe {
        asm!("rcp.approx.ftz.f32 {d}, {x};", d = out(reg32) out, x = in(reg32) x,
             options(pure, nomem, nostack));
    }
    out
}

/// `max.f32`
#[inline(always)]
pub fn max_f32(a: f32, b: f32) -> f32 {
    if a > b {
        a
    } else {
        b
    }
}

/// `sin.approx.ftz.f32` and `cos.approx.ftz.f32`: absolute error about 2^-21 on [-pi, pi]
/// (callers reduce the angle first).
#[inline(always)]
pub fn sin_cos(x: f32) -> (f32, f32) {
    let (sin, cos): (f32, f32);
    // SAFETY: register-only special functions.
    unsafe {
        asm!(
            "sin.approx.ftz.f32 {s}, {x}; cos.approx.ftz.f32 {c}, {x};",
            s = out(reg32) sin, c = out(reg32) cos, x = in(reg32) x,
            options(pure, nomem, nostack),
        );
    }
    (sin, cos)
}

/// `cvt.rni.f64.f64`: the nearest integer (ties to even) as an f64.
#[inline(always)]
pub fn round_f64(x: f64) -> f64 {
    let out: f64;
    // SAFETY: register-only conversion.
    unsafe {
        asm!("cvt.rni.f64.f64 {d}, {x};", d = out(reg64) out, x = in(reg64) x,
             options(pure, nomem, nostack));
    }
    out
}

/// `min.u32`
#[inline(always)]
pub fn min_u32(a: u32, b: u32) -> u32 {
    if a < b {
        a
    } else {
        b
    }
}

/// `min.u64` on an index.
#[inline(always)]
pub fn min_usize(a: usize, b: usize) -> usize {
    if a < b {
        a
    } else {
        b
    }
}

/// `fma.rn.f32`: `a * b + c` with one rounding. Rust never contracts `a * b + c` into a fused
/// multiply-add itself, so without this each is a multiply and an add (Nsight Compute counted
/// 27M unfused FP32 instructions of 40M in the decode attention at batch 16).
#[inline(always)]
pub fn fma(a: f32, b: f32, c: f32) -> f32 {
    let out: f32;
    // SAFETY: register-only arithmetic.
    unsafe {
        asm!("fma.rn.f32 {d}, {a}, {b}, {c};", d = out(reg32) out, a = in(reg32) a,
             b = in(reg32) b, c = in(reg32) c, options(pure, nomem, nostack));
    }
    out
}
