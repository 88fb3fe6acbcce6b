//! Pinned, device-mapped host memory: where ShadowKV keeps the values.
use cudarc::driver::{sys, DeviceRepr, PinnedHostSlice, ValidAsZeroBits};

use crate::error::Result;
use crate::gpu::Gpu;

/// Page-locked host memory that kernels read directly over PCIe. Pinning is slow (about
/// 0.75 s per GiB on our host): allocate once and reuse.
pub struct PinnedBuffer<T> {
    slice: PinnedHostSlice<T>,
    device_address: u64,
}

impl<T: DeviceRepr + ValidAsZeroBits + Copy> PinnedBuffer<T> {
    /// `len` zeroed elements, mapped into the device's address space.
    pub fn new(gpu: &Gpu, len: usize) -> Result<Self> {
        let flags = sys::CU_MEMHOSTALLOC_DEVICEMAP | sys::CU_MEMHOSTALLOC_PORTABLE;
        // SAFETY: the memory is zeroed below before anything reads it.
        let mut slice = unsafe { gpu.context().alloc_pinned_with_flags::<T>(len, flags)? };
        let host = slice.as_mut_ptr()?;
        // SAFETY: `host` points to `len` elements we own; zero bits are a valid T.
        unsafe { std::ptr::write_bytes(host, 0, len) };
        let mut device_address: sys::CUdeviceptr = 0;
        // SAFETY: FFI; `host` is a live mapped allocation of this context.
        unsafe { sys::cuMemHostGetDevicePointer_v2(&mut device_address, host.cast(), 0) }
            .result()?;
        Ok(PinnedBuffer {
            slice,
            device_address,
        })
    }

    /// Elements in the buffer.
    pub fn len(&self) -> usize {
        self.slice.len()
    }

    /// Whether the buffer holds no elements.
    pub fn is_empty(&self) -> bool {
        self.slice.is_empty()
    }

    /// The address kernels use to read this memory.
    pub fn device_address(&self) -> u64 {
        self.device_address
    }

    /// The elements on the host. Waits for the transfers cudarc scheduled on the buffer, not
    /// for kernels that use it through [`device_address`](Self::device_address) (synchronise
    /// their stream first). Errors if the wait fails.
    pub fn as_slice(&self) -> Result<&[T]> {
        Ok(self.slice.as_slice()?)
    }

    /// As [`as_slice`](Self::as_slice), writable.
    pub fn as_mut_slice(&mut self) -> Result<&mut [T]> {
        Ok(self.slice.as_mut_slice()?)
    }

    /// The cudarc slice, for `memcpy_htod` and friends.
    pub fn host_slice(&self) -> &PinnedHostSlice<T> {
        &self.slice
    }
}
