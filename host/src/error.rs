//! Typed errors. Bad input is an [`Error::InvalidArgument`] naming the argument, what was
//! wrong and what was expected; nothing reaches a kernel unchecked.
use std::fmt;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("no usable GPU: {0}")]
    NoGpu(String),
    #[error("CUDA driver error: {0}")]
    Driver(#[from] cudarc::driver::DriverError),
    #[error("invalid `{argument}`: {problem}; expected {expected}")]
    InvalidArgument {
        argument: &'static str,
        problem: String,
        expected: String,
    },
    #[error("no compiled kernel `{name}`: {reason}")]
    MissingKernel { name: String, reason: String },
    /// The device is older than any architecture the kernels are built for; found when the
    /// [`Gpu`](crate::gpu::Gpu) opens it, before any launch.
    #[error(
        "{device} (compute capability {}.{}) cannot run the ShadowKV kernels: they need {needed}",
        compute_capability.0,
        compute_capability.1
    )]
    UnsupportedDevice {
        device: String,
        compute_capability: (i32, i32),
        needed: String,
    },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Builds an [`Error::InvalidArgument`].
pub fn invalid(
    argument: &'static str,
    problem: impl fmt::Display,
    expected: impl fmt::Display,
) -> Error {
    Error::InvalidArgument {
        argument,
        problem: problem.to_string(),
        expected: expected.to_string(),
    }
}

/// Checks that a buffer holds exactly `expected` elements.
pub fn check_len(
    argument: &'static str,
    actual: usize,
    expected: usize,
    shape: impl fmt::Display,
) -> Result<()> {
    if actual == expected {
        Ok(())
    } else {
        Err(invalid(
            argument,
            format!("has {actual} elements"),
            format!("{expected} ({shape})"),
        ))
    }
}

/// Checks that `value` lies in `range`.
pub fn check_range<T: PartialOrd + fmt::Display + Copy>(
    argument: &'static str,
    value: T,
    range: std::ops::RangeInclusive<T>,
) -> Result<()> {
    if range.contains(&value) {
        Ok(())
    } else {
        Err(invalid(
            argument,
            format!("is {value}"),
            format!("a value in {}..={}", range.start(), range.end()),
        ))
    }
}

/// Checks that a buffer reaches at least `needed` elements.
pub fn check_reach(argument: &'static str, len: usize, needed: usize) -> Result<()> {
    if len >= needed {
        Ok(())
    } else {
        Err(invalid(
            argument,
            format!("has {len} elements"),
            format!("at least {needed} for the batch's layouts"),
        ))
    }
}
