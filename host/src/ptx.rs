//! Names of the compiled kernels and the PTX modules, generated from the PTX by
//! `shadowkv-codegen`.
//!
//! A [`KernelName`] can only come from this module (the generated constants, the generated
//! family functions such as `decode_attention(group, head_dim)`, or [`KernelName::lookup`]),
//! so the host cannot name a kernel that the PTX lacks. Every module of [`MODULES`] has the
//! same kernels (the build step checks it).
use std::fmt;

use crate::error::{Error, Result};

/// The entry-point name of a kernel present in every PTX module.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct KernelName(&'static str);

impl KernelName {
    /// The entry's name in the PTX.
    pub fn as_str(self) -> &'static str {
        self.0
    }

    /// The kernel named `name`, or an error saying it was not compiled (for checks on names
    /// built at run time; launchers use the constants and family functions).
    pub fn lookup(name: &str) -> Result<KernelName> {
        ALL.iter()
            .copied()
            .find(|kernel| kernel.0 == name)
            .ok_or_else(|| missing_kernel(name.to_owned()))
    }
}

/// The error of a family function asked for values that have no compiled kernel.
fn missing_kernel(name: String) -> Error {
    Error::MissingKernel {
        name,
        reason: format!("the PTX has {} kernels and none of that name", ALL.len()),
    }
}

/// The GPU architecture a PTX module was built for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PtxTarget {
    /// A100 and the other 8.0-8.7 GPUs: no thread-block clusters; PTX ISA 7.8.
    Sm80,
    /// L40S, RTX 4090 (8.9): no thread-block clusters; fp8 conversions; PTX ISA 8.1.
    Sm89,
    /// H100, H200 (9.x), and newer GPUs through the driver's JIT: clusters; PTX ISA 8.6,
    /// which needs a CUDA 12.8 (570) driver or later.
    Sm90,
}

impl PtxTarget {
    /// Every target, oldest first.
    pub const ALL: [PtxTarget; 3] = [PtxTarget::Sm80, PtxTarget::Sm89, PtxTarget::Sm90];

    /// The PTX module built for this target.
    pub fn ptx(self) -> &'static str {
        match self {
            PtxTarget::Sm80 => PTX_SM80,
            PtxTarget::Sm89 => PTX_SM89,
            PtxTarget::Sm90 => PTX_SM90,
        }
    }

    /// The architecture's name as ptxas and `SHADOWKV_PTX_TARGET` spell it (`sm_90`).
    pub fn name(self) -> &'static str {
        match self {
            PtxTarget::Sm80 => "sm_80",
            PtxTarget::Sm89 => "sm_89",
            PtxTarget::Sm90 => "sm_90",
        }
    }

    /// The oldest compute capability that runs this target's code.
    pub fn compute_capability(self) -> (i32, i32) {
        match self {
            PtxTarget::Sm80 => (8, 0),
            PtxTarget::Sm89 => (8, 9),
            PtxTarget::Sm90 => (9, 0),
        }
    }

    /// Whether the kernels of this target use thread-block clusters (only sm_90 compiles
    /// them in).
    pub fn has_clusters(self) -> bool {
        self == PtxTarget::Sm90
    }

    /// The target named `name` (`sm_80`, `sm_89` or `sm_90`).
    pub fn from_name(name: &str) -> Option<PtxTarget> {
        PtxTarget::ALL
            .into_iter()
            .find(|target| target.name() == name)
    }
}

impl fmt::Display for PtxTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

include!(concat!(env!("OUT_DIR"), "/kernels.rs"));

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_target_has_its_generated_module() {
        assert_eq!(MODULES.len(), PtxTarget::ALL.len());
        for (target, (arch, ptx)) in PtxTarget::ALL.into_iter().zip(MODULES) {
            let (major, minor) = target.compute_capability();
            assert_eq!(*arch, (major * 10 + minor) as u32);
            assert_eq!(target.ptx(), *ptx);
            assert!(ptx.contains(&format!(".target {}", target.name())));
            assert_eq!(PtxTarget::from_name(target.name()), Some(target));
        }
        assert_eq!(PtxTarget::from_name("sm_70"), None);
    }

    #[test]
    fn family_functions_return_the_constants_or_a_missing_kernel() {
        assert_eq!(decode_attention(4, 128).unwrap(), DECODE_ATTENTION_G4_D128);
        assert_eq!(topk_select(8).unwrap(), TOPK_SELECT_G8);
        assert!(matches!(
            decode_attention(9, 128),
            Err(Error::MissingKernel { name, .. }) if name == "decode_attention_g9_d128"
        ));
    }
}
