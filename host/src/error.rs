//! Typed errors. Bad input is an [`Error::InvalidArgument`] naming the argument, what was
//! wrong and what was expected; nothing reaches a kernel unchecked. Each other variant carries
//! what a caller needs to react to it.
use std::fmt;

/// Which CUDA library a [`Error::Library`] failure came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Library {
    /// cuBLAS (the factorisation's products, the model's GEMMs).
    Cublas,
    /// cuSOLVER (the factorisation's QR and eigen-decompositions).
    Cusolver,
}

impl fmt::Display for Library {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Library::Cublas => "cuBLAS",
            Library::Cusolver => "cuSOLVER",
        })
    }
}

/// Everything the crate can fail with, by what a caller does about it: fix the input
/// ([`InvalidArgument`](Error::InvalidArgument)), make room or wait for sequences to leave
/// ([`CapacityExhausted`](Error::CapacityExhausted)), use another GPU or driver
/// ([`NoGpu`](Error::NoGpu), [`UnsupportedDevice`](Error::UnsupportedDevice)), check the
/// installation ([`Library`](Error::Library), [`MissingKernel`](Error::MissingKernel)), or
/// look at the data ([`NotConverged`](Error::NotConverged)).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// No CUDA device can be used here (no driver library, or no device).
    #[error("no usable GPU: {0}")]
    NoGpu(String),
    /// The device or its driver lacks what the kernels need.
    #[error(
        "{device} (compute capability {}.{}) cannot run the ShadowKV kernels: they need {needed}",
        compute_capability.0,
        compute_capability.1
    )]
    UnsupportedDevice {
        /// The device's name.
        device: String,
        /// Its compute capability (major, minor).
        compute_capability: (i32, i32),
        /// What the kernels need of the device or the driver.
        needed: String,
    },
    /// A CUDA driver call failed.
    #[error("CUDA driver error: {0}")]
    Driver(#[from] cudarc::driver::DriverError),
    /// A call into a CUDA library failed.
    #[error("{library} call `{call}` failed with {status}")]
    Library {
        /// The library.
        library: Library,
        /// The function, or what the crate asked of the library.
        call: &'static str,
        /// The library's status code, as it names it.
        status: String,
    },
    /// An argument was wrong: which, what was wrong, and what was expected.
    #[error("invalid `{argument}`: {problem}; expected {expected}")]
    InvalidArgument {
        /// The argument's name (or field path).
        argument: &'static str,
        /// What was wrong with it.
        problem: String,
        /// What would have been accepted.
        expected: String,
    },
    /// A resource sized in advance is used up: GPU or pinned host memory, a cache's
    /// sequences, its buffers' free ranges, or a sequence's generated tokens.
    #[error("{what} exhausted: {needed} {unit} needed, {available} {unit} available{what_fits}")]
    CapacityExhausted {
        /// What ran out.
        what: &'static str,
        /// How much the request needed, in `unit`.
        needed: u64,
        /// How much was left, in `unit`.
        available: u64,
        /// The unit of `needed` and `available` (bytes, sequences, elements, tokens).
        unit: &'static str,
        /// What would fit instead (starting with "; "), or empty.
        what_fits: String,
    },
    /// An iterative computation did not converge.
    #[error("{what} did not converge: {detail}")]
    NotConverged {
        /// The computation.
        what: &'static str,
        /// What was observed (a solver's info code, a non-finite value).
        detail: String,
    },
    /// The PTX lacks a kernel the host asked for.
    #[error("no compiled kernel `{name}`: {reason}")]
    MissingKernel {
        /// The kernel's entry name.
        name: String,
        /// Why it is missing.
        reason: String,
    },
}

/// The crate's result type.
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

/// Builds an [`Error::CapacityExhausted`].
pub fn exhausted(what: &'static str, needed: u64, available: u64, unit: &'static str) -> Error {
    Error::CapacityExhausted {
        what,
        needed,
        available,
        unit,
        what_fits: String::new(),
    }
}

/// An [`Error::CapacityExhausted`] that also says what would fit (`what_fits`, a sentence).
pub fn exhausted_with(
    what: &'static str,
    needed: u64,
    available: u64,
    unit: &'static str,
    what_fits: impl fmt::Display,
) -> Error {
    Error::CapacityExhausted {
        what,
        needed,
        available,
        unit,
        what_fits: format!("; {what_fits}"),
    }
}
