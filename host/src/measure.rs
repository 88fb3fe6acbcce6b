//! Measuring on the device: the ceilings a step is compared with (the device-to-device copy
//! and the pinned host-to-device copy, measured in the same run as the kernels) and the
//! steady-state device time of a call. Shared by the benches and `shadowkv bandwidth`, so a
//! figure from either means the same thing.
use cudarc::driver::{CudaSlice, CudaStream};
use half::bf16;

use crate::error::Result;
use crate::gpu::Gpu;
use crate::kernels::random;
use crate::pinned::PinnedBuffer;

/// Samples [`steady_ms`] takes, and calls per sample.
pub const STEADY_SAMPLES: usize = 15;
/// Back-to-back calls per sample of [`steady_ms`] and [`best_ms`].
pub const STEADY_CALLS: u32 = 20;

/// A device buffer of `elements` bf16 values, uniform in `[-1, 1)`, from the random fill
/// kernel with `seed` (no host RNG over GiBs, no zeros for a kernel to shortcut on).
pub fn random_device_buffer(gpu: &Gpu, elements: usize, seed: u64) -> Result<CudaSlice<bf16>> {
    // SAFETY: every element is written by the fill before anything reads it.
    let mut buffer = unsafe { gpu.stream().alloc::<bf16>(elements.max(1))? };
    random::fill(gpu, gpu.stream(), &mut buffer, seed, 1.0, 0.0)?;
    Ok(buffer)
}

/// The median of `times` (sorts them).
pub fn median(times: &mut [f32]) -> f32 {
    times.sort_by(f32::total_cmp);
    times.get(times.len() / 2).copied().unwrap_or(f32::NAN)
}

/// Device-to-device copy bandwidth (bytes read + written) of 1 GiB copies, median of 20.
pub fn copy_bandwidth(gpu: &Gpu) -> Result<f64> {
    let bytes = 1usize << 30;
    let source = random_device_buffer(gpu, bytes / 2, 1)?;
    // SAFETY: written by the copy before anything reads it.
    let mut target = unsafe { gpu.stream().alloc::<bf16>(bytes / 2)? };
    let mut times = Vec::new();
    for _ in 0..20 {
        times.push(gpu.time_ms(gpu.stream(), 1, || {
            Ok(gpu.stream().memcpy_dtod(&source, &mut target)?)
        })?);
    }
    Ok(2.0 * bytes as f64 / (median(&mut times) as f64 * 1e-3))
}

/// The copy ceiling at a kernel's own size: the device-to-device copy that moves `bytes`
/// in all (half read, half written), timed as the kernels are (back to back, [`best_ms`]).
/// Small copies pay the launch and ramp that small kernels pay, so this is the fair
/// ceiling for a kernel that reads a few MB. The sources rotate over 256 MiB, so L2 does
/// not hold them between calls.
pub fn copy_bandwidth_at(gpu: &Gpu, bytes: usize) -> Result<f64> {
    let half = (bytes / 4).max(1);
    let sources = ((256usize << 20) / (2 * half)).clamp(2, 64);
    let source = random_device_buffer(gpu, half * sources, 3)?;
    // SAFETY: written by the copies before anything reads it.
    let mut target = unsafe { gpu.stream().alloc::<bf16>(half)? };
    let mut next = 0;
    let ms = best_ms(gpu, gpu.stream(), || {
        next = (next + 1) % sources;
        let from = source.slice(next * half..(next + 1) * half);
        Ok(gpu.stream().memcpy_dtod(&from, &mut target)?)
    })?;
    Ok((4 * half) as f64 / (ms * 1e-3))
}

/// Pinned host-to-device copy rate (bytes/s): the fastest of 10 copies of 512 MiB after a
/// warm-up copy (the median of the same copies read 35-54 GB/s across fresh machines of one
/// day, and put the fetch at 138% of it).
pub fn pinned_copy_bandwidth(gpu: &Gpu) -> Result<f64> {
    let elements = 256 << 20;
    let source = PinnedBuffer::<bf16>::new(gpu, elements)?;
    // SAFETY: written by the copies before anything reads it.
    let mut target = unsafe { gpu.stream().alloc::<bf16>(elements)? };
    let mut copy = || Ok(gpu.stream().memcpy_htod(source.host_slice(), &mut target)?);
    gpu.time_ms(gpu.stream(), 1, &mut copy)?;
    let mut best = f32::INFINITY;
    for _ in 0..10 {
        best = best.min(gpu.time_ms(gpu.stream(), 1, &mut copy)?);
    }
    Ok(2.0 * elements as f64 / (best as f64 * 1e-3))
}

/// The pinned host-to-device rate of a copy of `bytes`, back to back as the kernels are
/// timed ([`best_ms`]): the fetch's ceiling at its own size.
pub fn pinned_copy_bandwidth_at(gpu: &Gpu, bytes: usize) -> Result<f64> {
    let elements = (bytes / 2).max(1);
    let source = PinnedBuffer::<bf16>::new(gpu, elements)?;
    // SAFETY: written by the copies before anything reads it.
    let mut target = unsafe { gpu.stream().alloc::<bf16>(elements)? };
    let ms = best_ms(gpu, gpu.stream(), || {
        Ok(gpu.stream().memcpy_htod(source.host_slice(), &mut target)?)
    })?;
    Ok(2.0 * elements as f64 / (ms * 1e-3))
}

/// Device time of one call in steady state: the median over [`STEADY_SAMPLES`] samples of
/// [`STEADY_CALLS`] back-to-back calls each, so the host's enqueue of the next call overlaps
/// the GPU's work on this one (as in a decode loop) instead of being counted.
pub fn steady_ms(gpu: &Gpu, stream: &CudaStream, work: impl FnMut() -> Result<()>) -> Result<f64> {
    steady_ms_over(gpu, stream, STEADY_SAMPLES, STEADY_CALLS, work)
}

/// [`steady_ms`] with `samples` samples of `calls` calls each, for runs that must stay short
/// (a sweep over many configurations): the median sample.
pub fn steady_ms_over(
    gpu: &Gpu,
    stream: &CudaStream,
    samples: usize,
    calls: u32,
    work: impl FnMut() -> Result<()>,
) -> Result<f64> {
    Ok(median(&mut sample_ms(gpu, stream, samples, calls, work)?) as f64)
}

/// A ceiling's device time of one call: as [`steady_ms`] after one warm-up sample, but
/// the fastest sample instead of the median. A ceiling is the best the hardware does; a
/// median let one slow stretch (a fresh machine's first copies) pass for the ceiling and
/// put kernels above 100% of it.
pub fn best_ms(
    gpu: &Gpu,
    stream: &CudaStream,
    mut work: impl FnMut() -> Result<()>,
) -> Result<f64> {
    gpu.time_ms(stream, STEADY_CALLS, &mut work)?;
    let fastest = sample_ms(gpu, stream, STEADY_SAMPLES, STEADY_CALLS, work)?
        .into_iter()
        .fold(f32::INFINITY, f32::min);
    Ok(fastest as f64)
}

/// `samples` samples of the device time of one call, each over `calls` back-to-back calls.
fn sample_ms(
    gpu: &Gpu,
    stream: &CudaStream,
    samples: usize,
    calls: u32,
    mut work: impl FnMut() -> Result<()>,
) -> Result<Vec<f32>> {
    (0..samples.max(1))
        .map(|_| gpu.time_ms(stream, calls.max(1), &mut work))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_takes_the_middle_and_is_nan_when_empty() {
        assert_eq!(median(&mut [3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&mut [4.0, 1.0]), 4.0);
        assert!(median(&mut []).is_nan());
    }
}
