//! The device handle: context, the kernel module, streams, events and the one launch edge.
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use cudarc::driver::{
    sys, CudaContext, CudaEvent, CudaFunction, CudaModule, CudaStream, DevicePtr, DevicePtrMut,
    DeviceRepr, LaunchConfig, PushKernelArg, SyncOnDrop,
};
use cudarc::nvrtc::Ptx;

use crate::error::{Error, Result};
use crate::ptx::{KernelName, PtxTarget};

/// The environment variable that forces a PTX module (`sm_80`, `sm_89` or `sm_90`), to run
/// the non-Hopper code paths on a Hopper GPU.
pub const PTX_TARGET_VARIABLE: &str = "SHADOWKV_PTX_TARGET";

/// The PTX module for a device of `compute_capability` named `device`, or the one `forced`
/// names (the value of [`PTX_TARGET_VARIABLE`], if set).
///
/// 8.0-8.8 get sm_80, 8.9 sm_89, 9.x sm_90; newer GPUs (Blackwell, 10.0+) get the newest
/// module, sm_90, which the driver JIT-compiles for them. Below 8.0 is
/// [`Error::UnsupportedDevice`] (the kernels use `cp.async`, bf16 `mma` and `redux`-era
/// instructions of sm_80), even when forced. A forced name that is not a target, or a target
/// newer than the device, is [`Error::InvalidArgument`].
pub fn choose_ptx_target(
    device: &str,
    compute_capability: (i32, i32),
    forced: Option<&str>,
) -> Result<PtxTarget> {
    let (major, minor) = compute_capability;
    if major < 8 {
        return Err(Error::UnsupportedDevice {
            device: device.to_owned(),
            compute_capability,
            needed: "compute capability 8.0 or later (sm_80: A100, L40S, RTX 30xx/40xx, H100)"
                .into(),
        });
    }
    let native = match (major, minor) {
        (8, 9..) => PtxTarget::Sm89,
        (8, _) => PtxTarget::Sm80,
        _ => PtxTarget::Sm90,
    };
    let Some(name) = forced else {
        return Ok(native);
    };
    let names = || PtxTarget::ALL.map(PtxTarget::name).join(", ");
    let Some(target) = PtxTarget::from_name(name.trim()) else {
        return Err(crate::error::invalid(
            PTX_TARGET_VARIABLE,
            format!("is {name:?}"),
            format!("one of {}", names()),
        ));
    };
    // Only sm_80 code runs on sm_86/87 (sm_89 code does not), and only sm_90 code needs 9.0.
    let runs =
        target == PtxTarget::Sm80 || target.compute_capability() <= native.compute_capability();
    if !runs {
        return Err(crate::error::invalid(
            PTX_TARGET_VARIABLE,
            format!("is {name} on {device} (compute capability {major}.{minor})"),
            format!("a target this device runs, up to {native}"),
        ));
    }
    Ok(target)
}

/// Whether loading a module failed because the driver is too old for its PTX ISA version.
fn is_unsupported_ptx_version(error: &cudarc::driver::DriverError) -> bool {
    error.0 == sys::CUresult::CUDA_ERROR_UNSUPPORTED_PTX_VERSION
}

/// Why no GPU can be used here, or `Ok(device count)`. Never panics: the driver library is
/// looked for before cudarc would load it.
pub fn probe() -> Result<usize> {
    // SAFETY: dlopen of the driver library by name; nothing is called yet.
    if !unsafe { sys::is_culib_present() } {
        return Err(Error::NoGpu(
            "the CUDA driver library (libcuda.so) was not found".into(),
        ));
    }
    cudarc::driver::result::init()?;
    let count = CudaContext::device_count()?;
    if count < 1 {
        return Err(Error::NoGpu("the CUDA driver reports no device".into()));
    }
    Ok(count as usize)
}

/// Whether a CUDA device can be used on this machine.
pub fn gpu_available() -> bool {
    probe().is_ok()
}

/// The device addresses of the buffers one launch (or copy) uses, with cudarc's guards held
/// until it is dropped: build the parameters through it, queue the work, then let it go.
///
/// cudarc's [`DevicePtr::device_ptr`] makes `stream` wait for the buffer's last write (and
/// [`DevicePtrMut::device_ptr_mut`] for its last read and write too) and returns a guard whose
/// drop records this use on `stream`. Where the context tracks events (an engine's, through
/// [`Gpu::from_stream`]), a guard dropped before the launch records the event before the
/// kernel, and another stream waiting on it would not wait for the kernel. Guards with
/// nothing to record (buffers of the contexts the crate creates, which do not track, see
/// [`Gpu::new`]) are dropped at once. Each buffer stays borrowed as long as the collector, so
/// none can be changed or freed before the work is queued.
pub(crate) struct LaunchBuffers<'a> {
    stream: &'a CudaStream,
    guards: Vec<SyncOnDrop<'a>>,
}

impl<'a> LaunchBuffers<'a> {
    /// An empty collector for work queued on `stream`.
    pub(crate) fn new(stream: &'a CudaStream) -> Self {
        LaunchBuffers {
            stream,
            guards: Vec::new(),
        }
    }

    /// The stream the work is queued on.
    pub(crate) fn stream(&self) -> &'a CudaStream {
        self.stream
    }

    /// The address of `buffer`, which the work reads; its guard is kept.
    pub(crate) fn read<T>(&mut self, buffer: &'a impl DevicePtr<T>) -> u64 {
        let (address, guard) = buffer.device_ptr(self.stream);
        self.keep(guard);
        address
    }

    /// The address of `buffer`, which the work writes (and may read); its guard is kept.
    pub(crate) fn write<T>(&mut self, buffer: &'a mut impl DevicePtrMut<T>) -> u64 {
        let (address, guard) = buffer.device_ptr_mut(self.stream);
        self.keep(guard);
        address
    }

    fn keep(&mut self, guard: SyncOnDrop<'a>) {
        // A guard with no event and no stream does nothing on drop: no need to keep it.
        if !matches!(guard, SyncOnDrop::Record(None) | SyncOnDrop::Sync(None)) {
            self.guards.push(guard);
        }
    }
}

/// A 1-D grid of `threads`-thread blocks, one thread per work item up to `max_blocks` blocks
/// (kernels that stride over the grid take any count), no shared memory.
pub(crate) fn grid_for(items: usize, threads: u32, max_blocks: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (
            items
                .div_ceil(threads as usize)
                .clamp(1, max_blocks as usize) as u32,
            1,
            1,
        ),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// What the launchers need to know of the device.
#[derive(Clone, Debug)]
pub struct DeviceInfo {
    /// The device's name.
    pub name: String,
    /// Compute capability (major, minor).
    pub compute_capability: (i32, i32),
    /// Streaming multiprocessors.
    pub multiprocessors: u32,
    /// Device memory in bytes.
    pub total_memory: usize,
    /// Largest dynamic shared memory one block may opt into.
    pub max_shared_per_block: u32,
}

/// One CUDA device with the ShadowKV kernels loaded.
pub struct Gpu {
    context: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    module: Arc<CudaModule>,
    functions: Mutex<HashMap<KernelName, CudaFunction>>,
    /// The dynamic shared memory each kernel was opted in to (the largest asked for so far):
    /// a launch that needs no more skips the driver call.
    shared_opt_ins: Mutex<HashMap<KernelName, u32>>,
    /// [`Gpu::clusters_fit`]'s answers by kernel, block size, dynamic shared memory and
    /// cluster size: one occupancy query each, not one per launch.
    cluster_fits: Mutex<HashMap<ClusterFitKey, bool>>,
    info: DeviceInfo,
    ptx_target: PtxTarget,
}

/// What decides whether a cluster fits: kernel, threads per block, dynamic shared memory and
/// blocks per cluster.
type ClusterFitKey = (KernelName, (u32, u32, u32), u32, u32);

/// A map behind a mutex, usable after a panic elsewhere poisoned it (its entries are plain
/// values, each written whole).
fn locked<K, V>(map: &Mutex<HashMap<K, V>>) -> std::sync::MutexGuard<'_, HashMap<K, V>> {
    map.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A kernel's parameter struct, passed by value as the kernel's single `.param` aggregate.
#[repr(transparent)]
struct ByValue<P>(P);

// SAFETY: P is a `#[repr(C)]` plain-old-data struct (Pod) shared with the kernel crate, so
// its bytes are exactly the kernel's `.param` aggregate.
unsafe impl<P: bytemuck::Pod> DeviceRepr for ByValue<P> {}

impl Gpu {
    /// Opens device `ordinal` and loads the kernel module for its architecture (see
    /// [`Gpu::ptx_target`]; the driver JIT-compiles the PTX once, about 0.1 s).
    pub fn new(ordinal: usize) -> Result<Self> {
        let count = probe()?;
        if ordinal >= count {
            return Err(crate::error::invalid(
                "ordinal",
                format!("is {ordinal}"),
                format!("below the device count {count}"),
            ));
        }
        let context = CudaContext::new(ordinal)?;
        // SAFETY: called before this context allocates anything. Streams are ordered
        // explicitly instead: every launcher runs on the stream it is given, and the decode
        // step orders its compute and copy streams with its own events (cudarc's tracking
        // would record and wait on an event per buffer per launch, host time on every step).
        unsafe { context.disable_event_tracking() };
        // A stream of our own, not the legacy NULL stream that would serialise with every other.
        let stream = context.new_stream()?;
        Self::load(context, stream)
    }

    /// A `Gpu` on an engine's own stream and its context: every launcher that is not given
    /// another stream enqueues on `stream`, so the crate's work is ordered with the engine's
    /// without synchronisation. The context is used as the engine configured it; with
    /// cudarc's event tracking on, buffers allocated through cudarc on other streams are
    /// ordered by cudarc's events as usual: every launch and copy records its buffers' events
    /// after it is queued.
    pub fn from_stream(stream: Arc<CudaStream>) -> Result<Self> {
        probe()?;
        let context = stream.context().clone();
        context.bind_to_thread()?;
        Self::load(context, stream)
    }

    /// A `Gpu` on raw driver handles, for an engine built on another cudarc version (or on
    /// none): `context` must be its device's primary context, which the `Gpu` retains
    /// (cudarc, candle and PyTorch all use the primary context), and `stream` a stream of it
    /// (null for the legacy default stream). The crate runs its own buffers on this context
    /// without cudarc's event tracking; the engine's buffers come in as
    /// [`DeviceView`](crate::DeviceView)s.
    ///
    /// # Safety
    /// `context` and `stream` are live driver handles, and the stream stays alive as long as
    /// the returned `Gpu` and anything built on it.
    pub unsafe fn from_raw(context: sys::CUcontext, stream: sys::CUstream) -> Result<Self> {
        let count = probe()?;
        let mut device: sys::CUdevice = 0;
        // SAFETY: the caller's contract makes `context` live; it is pushed only to ask for its
        // device and popped at once.
        unsafe { sys::cuCtxPushCurrent_v2(context) }.result()?;
        // SAFETY: `device` receives one int.
        let asked = unsafe { sys::cuCtxGetDevice(&mut device) }.result();
        let mut popped: sys::CUcontext = std::ptr::null_mut();
        // SAFETY: pops the context pushed above.
        unsafe { sys::cuCtxPopCurrent_v2(&mut popped) }.result()?;
        asked?;
        let mut ordinal = None;
        for candidate in 0..count {
            if cudarc::driver::result::device::get(candidate as i32)? == device {
                ordinal = Some(candidate);
            }
        }
        let ordinal = ordinal.ok_or_else(|| {
            crate::error::invalid(
                "context",
                "belongs to no device the driver lists",
                "a context of a visible device",
            )
        })?;
        let primary = CudaContext::new(ordinal)?;
        if primary.cu_ctx() != context {
            return Err(crate::error::invalid(
                "context",
                format!("is not the primary context of device {ordinal}"),
                "the device's primary context (cuDevicePrimaryCtxRetain)",
            ));
        }
        // SAFETY: this wrapper of the primary context has allocated nothing yet; the crate
        // orders its own streams with its own events (see `Gpu::new`).
        unsafe { primary.disable_event_tracking() };
        // SAFETY: the caller's contract: `stream` is a live stream of this context that
        // outlives the `Gpu`; its owner keeps it.
        let stream = unsafe { primary.wrap_borrowed_stream(stream) };
        Self::load(primary, stream)
    }

    /// Reads the device's properties, picks its PTX module ([`choose_ptx_target`], with
    /// [`PTX_TARGET_VARIABLE`]) and loads it: everything a `Gpu` needs beyond a context and
    /// a stream. An sm_90 module that the driver cannot JIT (ISA 8.6 needs CUDA 12.8) falls
    /// back to sm_80 unless sm_90 was forced.
    fn load(context: Arc<CudaContext>, stream: Arc<CudaStream>) -> Result<Gpu> {
        let attribute = |a| context.attribute(a).map(|v| v as u32);
        let info = DeviceInfo {
            name: context.name()?,
            compute_capability: context.compute_capability()?,
            multiprocessors: attribute(
                sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT,
            )?,
            total_memory: context.total_mem()?,
            max_shared_per_block: attribute(
                sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN,
            )?,
        };
        let forced = std::env::var(PTX_TARGET_VARIABLE)
            .ok()
            .filter(|value| !value.is_empty());
        let mut ptx_target =
            choose_ptx_target(&info.name, info.compute_capability, forced.as_deref())?;
        let module = match context.load_module(Ptx::from_src(ptx_target.ptx())) {
            Err(error)
                if ptx_target == PtxTarget::Sm90
                    && forced.is_none()
                    && is_unsupported_ptx_version(&error) =>
            {
                ptx_target = PtxTarget::Sm80;
                context.load_module(Ptx::from_src(ptx_target.ptx()))?
            }
            loaded => loaded?,
        };
        Ok(Gpu {
            context,
            stream,
            module,
            functions: Mutex::new(HashMap::new()),
            shared_opt_ins: Mutex::new(HashMap::new()),
            cluster_fits: Mutex::new(HashMap::new()),
            info,
            ptx_target,
        })
    }

    /// The architecture of the loaded kernel module: the device's own (sm_80 for 8.0-8.8,
    /// sm_89, sm_90 for 9.0 and later), sm_80 on a Hopper whose driver cannot JIT the sm_90
    /// module, or the one [`PTX_TARGET_VARIABLE`] forced.
    pub fn ptx_target(&self) -> PtxTarget {
        self.ptx_target
    }

    /// The CUDA context the kernels are loaded in.
    pub fn context(&self) -> &Arc<CudaContext> {
        &self.context
    }

    /// The compute stream that launchers use unless given another.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// A new non-default stream (the copy stream of a decode step, say).
    pub fn new_stream(&self) -> Result<Arc<CudaStream>> {
        Ok(self.context.new_stream()?)
    }

    /// A new stream at the highest priority the device offers: the block scheduler starts
    /// its kernels' blocks before those of normal streams (the value fetch, which is the
    /// step's critical path, beside the attention over the resident tokens).
    pub fn new_priority_stream(&self) -> Result<Arc<CudaStream>> {
        let (_least, greatest) = cudarc::driver::result::stream::get_priority_range()?;
        Ok(self.context.new_stream_with_priority(greatest)?)
    }

    /// An event that records time (for benchmarks) or only ordering.
    pub fn new_event(&self, timing: bool) -> Result<CudaEvent> {
        let flags = if timing {
            sys::CUevent_flags::CU_EVENT_DEFAULT
        } else {
            sys::CUevent_flags::CU_EVENT_DISABLE_TIMING
        };
        Ok(self.context.new_event(Some(flags))?)
    }

    /// The device's properties.
    pub fn info(&self) -> &DeviceInfo {
        &self.info
    }

    /// The loaded function of a kernel, cached.
    pub fn function(&self, kernel: KernelName) -> Result<CudaFunction> {
        let mut functions = locked(&self.functions);
        if let Some(function) = functions.get(&kernel) {
            return Ok(function.clone());
        }
        // The driver's module and function queries need the context current on the calling
        // thread, which an engine's (or a test harness's) worker thread may not have yet.
        self.context.bind_to_thread()?;
        let function = self.module.load_function(kernel.as_str())?;
        functions.insert(kernel, function.clone());
        Ok(function)
    }

    /// The loaded function of a kernel, opted in to `shared_bytes` of dynamic shared memory
    /// (past the default 48 KiB a kernel must ask for it).
    fn function_with_shared(&self, kernel: KernelName, shared_bytes: u32) -> Result<CudaFunction> {
        let function = self.function(kernel)?;
        if shared_bytes > 48 * 1024 {
            let mut opt_ins = locked(&self.shared_opt_ins);
            if opt_ins
                .get(&kernel)
                .is_none_or(|&granted| granted < shared_bytes)
            {
                self.context.bind_to_thread()?;
                function.set_attribute(
                    sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                    shared_bytes as i32,
                )?;
                opt_ins.insert(kernel, shared_bytes);
            }
        }
        Ok(function)
    }

    /// Blocks of `kernel` the whole GPU runs at once (the occupancy calculator's blocks per
    /// multiprocessor, times the multiprocessors; at least one per multiprocessor): one wave.
    pub fn resident_blocks(
        &self,
        kernel: KernelName,
        threads: u32,
        shared_bytes: u32,
    ) -> Result<u32> {
        let function = self.function_with_shared(kernel, shared_bytes)?;
        self.context.bind_to_thread()?;
        let per_multiprocessor = function.occupancy_max_active_blocks_per_multiprocessor(
            threads,
            shared_bytes as usize,
            None,
        )?;
        Ok(per_multiprocessor.max(1) * self.info.multiprocessors)
    }

    /// Times `work` on `stream` with CUDA events: milliseconds per call over `iterations`.
    pub fn time_ms(
        &self,
        stream: &CudaStream,
        iterations: u32,
        mut work: impl FnMut() -> Result<()>,
    ) -> Result<f32> {
        let start = self.new_event(true)?;
        let end = self.new_event(true)?;
        start.record(stream)?;
        for _ in 0..iterations {
            work()?;
        }
        end.record(stream)?;
        end.synchronize()?;
        Ok(start.elapsed_ms(&end)? / iterations.max(1) as f32)
    }

    /// The one launch edge: every kernel takes one `#[repr(C)]` parameter struct by value.
    ///
    /// # Safety
    /// `params` must hold device addresses and sizes that the kernel `kernel` may use for
    /// the grid in `config`: each family's launcher validates them against its buffers.
    pub(crate) unsafe fn launch<P: bytemuck::Pod>(
        &self,
        stream: &CudaStream,
        kernel: KernelName,
        config: LaunchConfig,
        params: P,
    ) -> Result<()> {
        let function = self.function_with_shared(kernel, config.shared_mem_bytes)?;
        let params = ByValue(params);
        let mut builder = stream.launch_builder(&function);
        builder.arg(&params);
        builder.launch(config)?;
        Ok(())
    }

    /// Whether kernels may be launched in thread-block clusters: the device has them
    /// (compute capability 9.0+) and the loaded module was built with them (sm_90; the older
    /// targets compile every cluster primitive to a block of its own).
    pub fn has_clusters(&self) -> bool {
        self.ptx_target.has_clusters() && self.info.compute_capability.0 >= 9
    }

    /// [`launch`](Self::launch) in clusters of `cluster_blocks` consecutive blocks along x
    /// (`cuLaunchKernelEx` with a cluster dimension); a plain launch for 1.
    ///
    /// # Safety
    /// As for [`launch`](Self::launch); the grid's x is a multiple of `cluster_blocks`, at
    /// most 8 (the portable cluster size), and the kernel expects clusters of that size.
    pub(crate) unsafe fn launch_in_clusters<P: bytemuck::Pod>(
        &self,
        stream: &CudaStream,
        kernel: KernelName,
        config: LaunchConfig,
        cluster_blocks: u32,
        params: P,
    ) -> Result<()> {
        if cluster_blocks <= 1 {
            // SAFETY: the caller's contract.
            return unsafe { self.launch(stream, kernel, config, params) };
        }
        let function = self.function_with_shared(kernel, config.shared_mem_bytes)?;
        self.context.bind_to_thread()?;
        let mut params = ByValue(params);
        let mut arguments = [&mut params as *mut ByValue<P> as *mut std::ffi::c_void];
        let mut attribute = cluster_attribute(cluster_blocks);
        let launch = cluster_launch_config(&config, stream.cu_stream(), &mut attribute);
        // SAFETY: `arguments` holds the one parameter struct the kernel takes, alive for the
        // call (the driver copies it); the config and attribute outlive the call; the
        // caller's contract covers the grid and what the kernel does with the parameters.
        unsafe {
            sys::cuLaunchKernelEx(
                &launch,
                function.cu_function(),
                arguments.as_mut_ptr(),
                std::ptr::null_mut(),
            )
        }
        .result()?;
        Ok(())
    }

    /// Whether clusters of `cluster_blocks` blocks of `kernel`, launched as `config` says,
    /// can run at all on this GPU (`cuOccupancyMaxActiveClusters` above 0): every block of a
    /// cluster must be resident at once on one GPU processing cluster, which a partitioned
    /// GPU (MIG) or a smaller one may not offer. Always true for 1 block. The answer is kept
    /// per kernel, block size, shared memory and cluster size (the top-k asks at every
    /// clustered launch).
    pub fn clusters_fit(
        &self,
        kernel: KernelName,
        config: LaunchConfig,
        cluster_blocks: u32,
    ) -> Result<bool> {
        if cluster_blocks <= 1 {
            return Ok(true);
        }
        let key = (
            kernel,
            config.block_dim,
            config.shared_mem_bytes,
            cluster_blocks,
        );
        if let Some(&fits) = locked(&self.cluster_fits).get(&key) {
            return Ok(fits);
        }
        let function = self.function_with_shared(kernel, config.shared_mem_bytes)?;
        self.context.bind_to_thread()?;
        let mut attribute = cluster_attribute(cluster_blocks);
        let query = cluster_launch_config(&config, std::ptr::null_mut(), &mut attribute);
        let mut clusters = 0;
        // SAFETY: the config and attribute outlive the call; `clusters` receives one int.
        unsafe { sys::cuOccupancyMaxActiveClusters(&mut clusters, function.cu_function(), &query) }
            .result()?;
        locked(&self.cluster_fits).insert(key, clusters > 0);
        Ok(clusters > 0)
    }
}

/// The launch attribute for clusters of `cluster_blocks` blocks along x.
fn cluster_attribute(cluster_blocks: u32) -> sys::CUlaunchAttribute {
    // SAFETY: a plain C struct and union of integers, valid when zeroed.
    let mut attribute: sys::CUlaunchAttribute = unsafe { std::mem::zeroed() };
    attribute.id = sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_CLUSTER_DIMENSION;
    attribute.value.clusterDim.x = cluster_blocks;
    attribute.value.clusterDim.y = 1;
    attribute.value.clusterDim.z = 1;
    attribute
}

/// `config` as the driver's extended launch config, with one attribute.
fn cluster_launch_config(
    config: &LaunchConfig,
    stream: sys::CUstream,
    attribute: &mut sys::CUlaunchAttribute,
) -> sys::CUlaunchConfig {
    sys::CUlaunchConfig {
        gridDimX: config.grid_dim.0,
        gridDimY: config.grid_dim.1,
        gridDimZ: config.grid_dim.2,
        blockDimX: config.block_dim.0,
        blockDimY: config.block_dim.1,
        blockDimZ: config.block_dim.2,
        sharedMemBytes: config.shared_mem_bytes,
        hStream: stream,
        attrs: attribute,
        numAttrs: 1,
    }
}

/// `cuMemcpyAsync` of `bytes` from `source` to `target` on `stream` (unified addressing: either
/// may be device memory or mapped pinned host memory).
///
/// # Safety
/// Both ranges lie inside live allocations that stay alive until the copy has run.
pub(crate) unsafe fn copy_async(
    stream: &CudaStream,
    target: u64,
    source: u64,
    bytes: usize,
) -> Result<()> {
    stream.context().bind_to_thread()?;
    // SAFETY: the caller's contract.
    unsafe { sys::cuMemcpyAsync(target, source, bytes, stream.cu_stream()) }.result()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn choose(capability: (i32, i32), forced: Option<&str>) -> Result<PtxTarget> {
        choose_ptx_target("Test GPU", capability, forced)
    }

    #[test]
    fn each_architecture_gets_its_module() {
        for (capability, target) in [
            ((8, 0), PtxTarget::Sm80),
            ((8, 6), PtxTarget::Sm80),
            ((8, 7), PtxTarget::Sm80),
            ((8, 9), PtxTarget::Sm89),
            ((9, 0), PtxTarget::Sm90),
            ((10, 0), PtxTarget::Sm90),
            ((12, 0), PtxTarget::Sm90),
        ] {
            assert_eq!(choose(capability, None).unwrap(), target, "{capability:?}");
        }
    }

    #[test]
    fn devices_before_ampere_are_unsupported_even_when_forced() {
        for forced in [None, Some("sm_80")] {
            match choose((7, 5), forced) {
                Err(Error::UnsupportedDevice {
                    device,
                    compute_capability,
                    needed,
                }) => {
                    assert_eq!(device, "Test GPU");
                    assert_eq!(compute_capability, (7, 5));
                    assert!(needed.contains("8.0"), "{needed}");
                }
                other => panic!("expected UnsupportedDevice, got {other:?}"),
            }
        }
    }

    #[test]
    fn the_variable_forces_any_target_the_device_runs() {
        assert_eq!(choose((9, 0), Some("sm_80")).unwrap(), PtxTarget::Sm80);
        assert_eq!(choose((9, 0), Some("sm_89")).unwrap(), PtxTarget::Sm89);
        assert_eq!(choose((8, 9), Some("sm_90")).ok(), None);
        assert_eq!(choose((8, 6), Some("sm_89")).ok(), None);
        assert_eq!(choose((8, 6), Some("sm_80")).unwrap(), PtxTarget::Sm80);
        assert_eq!(choose((10, 0), Some(" sm_90 ")).unwrap(), PtxTarget::Sm90);
    }

    #[test]
    fn a_bad_value_is_an_invalid_argument_naming_the_variable() {
        for bad in ["sm_70", "90", "SM_90", "hopper"] {
            match choose((9, 0), Some(bad)) {
                Err(Error::InvalidArgument {
                    argument, expected, ..
                }) => {
                    assert_eq!(argument, PTX_TARGET_VARIABLE);
                    assert!(expected.contains("sm_80, sm_89, sm_90"), "{expected}");
                }
                other => panic!("expected InvalidArgument for {bad:?}, got {other:?}"),
            }
        }
        assert!(matches!(
            choose((8, 9), Some("sm_90")),
            Err(Error::InvalidArgument {
                argument: PTX_TARGET_VARIABLE,
                ..
            })
        ));
    }
}
