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
pub mod layer;
pub mod plan;
pub mod prefill_attention;
pub mod random;
pub mod rebuild;
pub mod rope;
pub mod sampling;
pub mod scoring;
pub mod shadow;
pub mod shadow_prefill;
#[cfg(target_arch = "nvptx64")]
pub mod tile;
pub mod topk;

/// Most blocks in a thread-block cluster (the portable cluster size).
pub const MAX_CLUSTER_BLOCKS: u32 = 8;

#[cfg(target_arch = "nvptx64")]
#[panic_handler]
fn panic(_: &core::panic::PanicInfo) -> ! {
    device::trap()
}
