//! ShadowKV device kernels and the parameter structs that the host shares with them.
//!
//! Built two ways:
//! - for `nvptx64-nvidia-cuda` by `shadowkv-codegen` (`#![no_std]`, kernels included), and
//! - for the host as an ordinary dependency of `shadowkv`, where only the `#[repr(C)]`
//!   parameter structs and the layout math exist, so a launch cannot disagree with its kernel.
//!
//! One module per kernel family; the same names are used in `shadowkv` (launchers) and
//! `shadowkv::reference` (CPU references).
#![cfg_attr(target_arch = "nvptx64", no_std)]
#![cfg_attr(
    target_arch = "nvptx64",
    feature(abi_ptx, stdarch_nvptx, asm_experimental_arch)
)]

#[cfg(target_arch = "nvptx64")]
pub mod device;

pub mod attention;
#[cfg(target_arch = "nvptx64")]
pub mod block;
pub mod cache;
pub mod factorise;
pub mod fetch;
pub mod kv;
pub mod layer;
pub mod plan;
pub mod prefill_attention;
pub mod random;
pub mod rebuild;
pub mod rope;
pub mod sampling;
pub mod scoring;
pub mod scripted_selection;
pub mod shadow;
pub mod shadow_prefill;
pub mod tier;
#[cfg(target_arch = "nvptx64")]
pub mod tile;
pub mod topk;
pub mod values;

/// Launch bounds: the most threads per block of the kernels whose entry names start with
/// each prefix. The build step writes them into the PTX as `.maxntid` (CUDA's
/// `__launch_bounds__`, which rustc cannot express), so that ptxas and the driver's JIT keep
/// such a kernel within the registers a whole block can have (64 at 1024 threads); without
/// it the launch fails for want of registers. Only the families whose blocks could exceed
/// that need an entry.
pub const LAUNCH_BOUNDS: &[(&str, u32)] = &[("topk_select_", topk::THREADS)];

/// Most blocks in a thread-block cluster (the portable cluster size).
pub const MAX_CLUSTER_BLOCKS: u32 = 8;

#[cfg(target_arch = "nvptx64")]
#[panic_handler]
fn panic(_: &core::panic::PanicInfo) -> ! {
    device::trap()
}
