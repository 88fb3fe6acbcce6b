//! Names of the compiled kernels, generated from the PTX by `shadowkv-codegen`.
//!
//! A [`KernelName`] can only come from this module (the generated constants or
//! [`KernelName::lookup`]), so the host cannot name a kernel that the PTX lacks.
use crate::error::{Error, Result};

/// The entry-point name of a kernel present in [`PTX`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct KernelName(&'static str);

impl KernelName {
    pub fn as_str(self) -> &'static str {
        self.0
    }

    /// The kernel named `name`, or an error saying it was not compiled.
    pub fn lookup(name: &str) -> Result<KernelName> {
        ALL.iter()
            .copied()
            .find(|kernel| kernel.0 == name)
            .ok_or_else(|| Error::MissingKernel {
                name: name.to_owned(),
                reason: format!("the PTX has {} kernels and none of that name", ALL.len()),
            })
    }
}

include!(concat!(env!("OUT_DIR"), "/kernels.rs"));
