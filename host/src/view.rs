//! Typed views of device memory that the crate did not allocate: an engine's own buffers
//! (from another allocator or another cudarc version) passed by address and length. They
//! implement cudarc's [`DevicePtr`] and [`DevicePtrMut`], so every launcher takes them where
//! it takes a [`CudaSlice`](cudarc::driver::CudaSlice).
//!
//! Ordering contract: a view carries no events. The crate enqueues everything that reads or
//! writes a view on the [`Gpu`]'s stream, in call order, so work the engine enqueues later
//! on the same stream sees the results; work on another stream must wait for an event the
//! engine records on the `Gpu`'s stream after the call.
use std::marker::PhantomData;
use std::sync::Arc;

use cudarc::driver::{sys, CudaStream, DevicePtr, DevicePtrMut, DeviceSlice, SyncOnDrop};

use crate::error::{invalid, Result};
use crate::gpu::Gpu;

/// `len` elements of `T` at a device address, read-only, alive for `'a`.
#[derive(Clone, Copy, Debug)]
pub struct DeviceView<'a, T> {
    address: sys::CUdeviceptr,
    len: usize,
    stream: &'a Arc<CudaStream>,
    elements: PhantomData<&'a [T]>,
}

/// `len` elements of `T` at a device address, writable, alive for `'a`.
#[derive(Debug)]
pub struct DeviceViewMut<'a, T> {
    view: DeviceView<'a, T>,
    elements: PhantomData<&'a mut [T]>,
}

/// Checks that a raw view's address is non-null and aligned for `T`.
fn check_address<T>(address: sys::CUdeviceptr) -> Result<()> {
    let align = std::mem::align_of::<T>() as u64;
    if address == 0 || !address.is_multiple_of(align) {
        return Err(invalid(
            "address",
            format!("is {address:#x}"),
            format!("a non-null device address aligned to {align} bytes"),
        ));
    }
    Ok(())
}

impl<'a, T> DeviceView<'a, T> {
    /// A view of `len` elements at `address`, ordered on `gpu`'s stream.
    ///
    /// # Safety
    /// `address` is device memory of `gpu`'s context (or mapped pinned host memory), holds
    /// `len` initialised elements of `T`, and stays allocated and unwritten by others while
    /// the view is used and until the work the crate enqueued with it has run.
    pub unsafe fn from_raw(gpu: &'a Gpu, address: sys::CUdeviceptr, len: usize) -> Result<Self> {
        check_address::<T>(address)?;
        Ok(DeviceView {
            address,
            len,
            stream: gpu.stream(),
            elements: PhantomData,
        })
    }

    /// The device address of the first element.
    pub fn address(&self) -> sys::CUdeviceptr {
        self.address
    }
}

impl<'a, T> DeviceViewMut<'a, T> {
    /// A writable view of `len` elements at `address`, ordered on `gpu`'s stream.
    ///
    /// # Safety
    /// As for [`DeviceView::from_raw`], and nothing else reads or writes the memory while
    /// the view is used and until the work the crate enqueued with it has run.
    pub unsafe fn from_raw(gpu: &'a Gpu, address: sys::CUdeviceptr, len: usize) -> Result<Self> {
        Ok(DeviceViewMut {
            // SAFETY: the caller's contract, which is stronger than the read-only view's.
            view: unsafe { DeviceView::from_raw(gpu, address, len)? },
            elements: PhantomData,
        })
    }

    /// The device address of the first element.
    pub fn address(&self) -> sys::CUdeviceptr {
        self.view.address
    }
}

impl<T> DeviceSlice<T> for DeviceView<'_, T> {
    fn len(&self) -> usize {
        self.len
    }
    fn stream(&self) -> &Arc<CudaStream> {
        self.stream
    }
}

impl<T> DeviceSlice<T> for DeviceViewMut<'_, T> {
    fn len(&self) -> usize {
        self.view.len
    }
    fn stream(&self) -> &Arc<CudaStream> {
        self.view.stream
    }
}

impl<T> DevicePtr<T> for DeviceView<'_, T> {
    fn device_ptr<'b>(&'b self, _stream: &'b CudaStream) -> (sys::CUdeviceptr, SyncOnDrop<'b>) {
        (self.address, SyncOnDrop::Sync(None))
    }
}

impl<T> DevicePtr<T> for DeviceViewMut<'_, T> {
    fn device_ptr<'b>(&'b self, _stream: &'b CudaStream) -> (sys::CUdeviceptr, SyncOnDrop<'b>) {
        (self.view.address, SyncOnDrop::Sync(None))
    }
}

impl<T> DevicePtrMut<T> for DeviceViewMut<'_, T> {
    fn device_ptr_mut<'b>(
        &'b mut self,
        _stream: &'b CudaStream,
    ) -> (sys::CUdeviceptr, SyncOnDrop<'b>) {
        (self.view.address, SyncOnDrop::Sync(None))
    }
}
