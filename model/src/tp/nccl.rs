//! NCCL for tensor parallelism, loaded at run time: the build needs no NCCL, and a host
//! without `libnccl.so.2` gets [`TensorParallelError::Nccl`] instead of cudarc's panic.
use std::sync::{Arc, Mutex};

use shadowkv::cudarc::driver::{CudaSlice, CudaStream};
use shadowkv::cudarc::nccl::safe::{Comm, Id, ReduceOp};

use super::plan::TensorParallelError;
use crate::error::Result;
use crate::gpu::PartialSums;

/// The variable that turns NCCL's NVLink SHARP (multicast) algorithms on or off.
pub const NVLS_VARIABLE: &str = "NCCL_NVLS_ENABLE";

/// Turns NVLink multicast off (`NCCL_NVLS_ENABLE=0`) unless the user set the variable.
/// NVLS needs multicast objects from the fabric manager / IMEX service, which the multi-GPU
/// machines these runs use do not provide: with it on, NCCL's communicator setup fails or
/// hangs there. Call before the first NCCL call of the process and before its threads start
/// (NCCL reads the variable once, and the environment is not safe to change under readers).
pub fn disable_nvls() {
    if std::env::var_os(NVLS_VARIABLE).is_none() {
        std::env::set_var(NVLS_VARIABLE, "0");
    }
}

/// Checks that NCCL's library can be loaded, before cudarc would load it (and panic).
pub fn check_nccl() -> Result<(), TensorParallelError> {
    // SAFETY: this only dlopens the library by its candidate names; nothing is called.
    if unsafe { shadowkv::cudarc::nccl::sys::is_culib_present() } {
        Ok(())
    } else {
        Err(TensorParallelError::Nccl {
            what: "loading libnccl",
            reason: "libnccl.so.2 was not found; install NCCL 2.18 or later (the \
                     nvidia-nccl-cu12 wheel carries it) and put its folder on LD_LIBRARY_PATH"
                .into(),
        })
    }
}

/// An NCCL failure, as a typed error.
pub(crate) fn nccl_error(
    what: &'static str,
) -> impl Fn(shadowkv::cudarc::nccl::result::NcclError) -> TensorParallelError {
    move |error| TensorParallelError::Nccl {
        what,
        reason: format!("NCCL result {:?}", error.0),
    }
}

/// A new communicator id (rank 0 makes it, every rank joins with it).
pub fn new_id() -> Result<Id, TensorParallelError> {
    check_nccl()?;
    Id::new().map_err(nccl_error("creating the communicator id"))
}

/// One rank's NCCL communicator over its GPU's compute stream.
struct RankComm(Comm);

// SAFETY: an NCCL communicator may be used from any thread as long as no two calls on it run
// at once; it is only reached through the mutex of `NcclPartialSums`.
unsafe impl Send for RankComm {}

/// The all-reduce of one rank's partial block outputs over NCCL.
pub struct NcclPartialSums {
    comm: Mutex<RankComm>,
}

impl NcclPartialSums {
    /// Joins communicator `id` as rank `rank` of `ranks` on `stream` (the rank's compute
    /// stream): blocks until every rank has joined.
    pub fn join(
        stream: Arc<CudaStream>,
        rank: usize,
        ranks: usize,
        id: &Id,
    ) -> Result<NcclPartialSums, TensorParallelError> {
        check_nccl()?;
        let comm = Comm::from_rank(stream, rank, ranks, Id::uninit(*id.internal()))
            .map_err(nccl_error("joining the communicator"))?;
        Ok(NcclPartialSums {
            comm: Mutex::new(RankComm(comm)),
        })
    }
}

impl PartialSums for NcclPartialSums {
    fn all_reduce(&self, stream: &Arc<CudaStream>, partial: &mut CudaSlice<f32>) -> Result<()> {
        let comm = self
            .comm
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if !Arc::ptr_eq(&comm.0.stream(), stream) {
            return Err(TensorParallelError::Nccl {
                what: "all-reduce",
                reason: "the communicator runs on another stream than the model's".into(),
            }
            .into());
        }
        comm.0
            .all_reduce_in_place(partial, &ReduceOp::Sum)
            .map_err(nccl_error("all-reduce of a block's partial sums"))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Without libnccl (as on the CPU CI hosts) the check and the id are typed errors that
    /// say what is missing, never cudarc's panic; with it, an id is made.
    #[test]
    fn a_missing_libnccl_is_a_typed_error() {
        match check_nccl() {
            Ok(()) => assert!(new_id().is_ok() || shadowkv::probe().is_err()),
            Err(error) => {
                assert!(error.to_string().contains("libnccl.so.2"), "{error}");
                assert_eq!(new_id().err(), Some(error));
            }
        }
    }

    #[test]
    fn nvlink_multicast_is_turned_off_unless_set() {
        disable_nvls();
        assert!(std::env::var_os(NVLS_VARIABLE).is_some());
    }
}
