//! The model driver's errors: a model file that cannot be used ([`ModelFileError`]), a GPU
//! operation that failed (with the `shadowkv` or CUDA driver error as its `source()`), ShadowKV
//! parameters that do not fit, and requests the model cannot run as given.
use shadowkv::cudarc::driver::DriverError;

/// A model file that cannot be used, with where and why.
#[derive(Debug, thiserror::Error, PartialEq)]
#[error("{file}{}: {reason}", tensor.as_ref().map(|t| format!(", tensor `{t}`")).unwrap_or_default())]
pub struct ModelFileError {
    /// The file (or named shape) at fault.
    pub file: String,
    /// The tensor at fault, where there is one.
    pub tensor: Option<String>,
    /// What is wrong with it.
    pub reason: String,
}

/// Everything that can go wrong in the model driver.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A model file (or named shape) that cannot be used.
    #[error(transparent)]
    File(#[from] ModelFileError),
    /// A `shadowkv` operation on the GPU failed while the model was doing `what`.
    #[error("{what}: {source}")]
    Gpu {
        /// What the model was doing ("uploading the weights", "attention").
        what: &'static str,
        /// The failure as the `shadowkv` crate reports it.
        #[source]
        source: shadowkv::Error,
    },
    /// A CUDA driver call of the model's own (an allocation, a copy) failed while it was
    /// doing `what`.
    #[error("{what}: CUDA driver error: {source}")]
    Driver {
        /// What the model was doing.
        what: &'static str,
        /// The driver's error.
        #[source]
        source: DriverError,
    },
    /// ShadowKV parameters that do not fit the kernels, the model or the prompt.
    #[error("ShadowKV parameters: {0}")]
    Parameters(#[source] shadowkv::Error),
    /// A request the model cannot run as given: a token past the vocabulary, a full
    /// sequence, a sampler setting out of range.
    #[error("invalid `{argument}`: {problem}; expected {expected}")]
    InvalidInput {
        /// The argument at fault.
        argument: &'static str,
        /// What is wrong with it.
        problem: String,
        /// What was needed instead.
        expected: String,
    },
    /// A scheduler call naming a request it cannot act on (see [`crate::serve`]); the
    /// scheduler is left as it was.
    #[error("request {id}: {problem}")]
    Request {
        /// The request's id.
        id: u64,
        /// Why the call cannot act on it.
        problem: RequestProblem,
    },
    /// A decode step whose batch is past the largest the decode runner captures steps for
    /// (`StepLimits::max_batch`), or empty; nothing was run or changed.
    #[error("a decode step of {batch} sequences is past the captured batch shapes (1 to {max_batch} sequences)")]
    PastCapturedShapes {
        /// Sequences in the step.
        batch: usize,
        /// The largest batch the runner captures.
        max_batch: usize,
    },
    /// A model that cannot be split over the GPUs asked for, or NCCL that cannot be used.
    #[error("tensor parallelism: {0}")]
    TensorParallel(#[from] crate::tp::TensorParallelError),
    /// Not enough free GPU memory for `what`.
    #[error("{what} needs {needed} bytes of GPU memory; {free} bytes are free")]
    OutOfMemory {
        /// What was to be allocated.
        what: String,
        /// Bytes it needs.
        needed: usize,
        /// Bytes of GPU memory free when it was asked for.
        free: usize,
    },
}

/// Why a scheduler call cannot act on the request it names.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RequestProblem {
    /// No request was given this id.
    #[error("no such request")]
    Unknown,
    /// The request has finished or was cancelled.
    #[error("the request has finished")]
    Finished,
    /// A prompt piece after the prompt was declared complete.
    #[error("its prompt is already complete")]
    PromptComplete,
    /// A prompt piece that goes past the prompt length the request declared.
    #[error("a piece ending at token {given} goes past the declared prompt length {declared}")]
    PastPromptLength {
        /// The declared prompt length.
        declared: usize,
        /// Where the piece would end.
        given: usize,
    },
    /// The prompt was declared complete before reaching its declared length.
    #[error("the prompt ends at token {given}, short of the declared prompt length {declared}")]
    ShortOfPromptLength {
        /// The declared prompt length.
        declared: usize,
        /// Where the prompt ends.
        given: usize,
    },
    /// A decode naming a request whose prompt is not complete and prefilled yet.
    #[error("its prompt is not prefilled yet")]
    Prefilling,
    /// A decode naming the same request twice.
    #[error("named twice in one decode")]
    Repeated,
    /// A prompt piece or a decoded token that goes past the tokens the backend holds for the
    /// sequence (its cache block, or the generated tokens its shadow has room for).
    #[error("token {given} goes past the {capacity} tokens the backend holds for it")]
    PastCapacity {
        /// Tokens the backend holds for the sequence.
        capacity: usize,
        /// Where the sequence would end.
        given: usize,
    },
    /// A new sequence while every place of the backend is taken.
    #[error("all {places} places of the backend are taken")]
    NoRoom {
        /// Sequences the backend holds at once.
        places: usize,
    },
    /// A new sequence under an id that is live already.
    #[error("the id is live already")]
    Live,
    /// A request whose cache mode the backend does not serve (ShadowKV parameters other
    /// than the backend's).
    #[error("its cache mode {mode} is not served here; expected {expected}")]
    Mode {
        /// The request's mode.
        mode: String,
        /// The modes served.
        expected: String,
    },
}

/// The model driver's result.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Builds an [`Error::InvalidInput`].
pub(crate) fn invalid_input(
    argument: &'static str,
    problem: impl std::fmt::Display,
    expected: impl std::fmt::Display,
) -> Error {
    Error::InvalidInput {
        argument,
        problem: problem.to_string(),
        expected: expected.to_string(),
    }
}

/// Attaches what the model was doing to a GPU-side failure, keeping the failure as the
/// error's `source()`.
pub(crate) trait OnGpu<T> {
    /// The error as [`Error::Gpu`] or [`Error::Driver`], doing `what`.
    fn on_gpu(self, what: &'static str) -> Result<T>;
}

impl<T> OnGpu<T> for std::result::Result<T, shadowkv::Error> {
    fn on_gpu(self, what: &'static str) -> Result<T> {
        self.map_err(|source| Error::Gpu { what, source })
    }
}

impl<T> OnGpu<T> for std::result::Result<T, DriverError> {
    fn on_gpu(self, what: &'static str) -> Result<T> {
        self.map_err(|source| Error::Driver { what, source })
    }
}
