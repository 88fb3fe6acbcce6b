//! The full KV cache of a batch of sequences on the GPU: what full attention reads, and what a
//! ShadowKV prefill attends over before each layer's shadow is built from it.
use half::bf16;
use shadowkv::cudarc::driver::CudaSlice;
use shadowkv::{Gpu, SequenceLayout};

use super::model::GpuModel;
use crate::error::{invalid_input, Error, OnGpu, Result};

/// The full KV cache of a batch of sequences: per layer one K and one V buffer, each sequence
/// a `[kv_heads, capacity, head_dim]` block in both.
pub struct GpuKvCache {
    /// This cache's number (see `next_cache_id`).
    pub(super) id: u64,
    pub(super) layouts: Vec<SequenceLayout>,
    /// Tokens cached per sequence.
    pub(super) lens: Vec<u32>,
    pub(super) k: Vec<CudaSlice<bf16>>,
    pub(super) v: Vec<CudaSlice<bf16>>,
}

impl GpuKvCache {
    /// Tokens cached per sequence.
    pub fn lens(&self) -> &[u32] {
        &self.lens
    }

    /// Fills every sequence's block with random keys and values and marks `lens[b]` tokens of
    /// sequence `b` cached: a synthetic context for decode-throughput runs, in place of a
    /// prompt (labelled as such wherever it is used).
    pub fn fill_synthetic(&mut self, gpu: &Gpu, lens: &[u32], seed: u64) -> Result<()> {
        if lens.len() != self.layouts.len() {
            return Err(invalid_input(
                "lens",
                format!("has {} lengths", lens.len()),
                format!("one per sequence ({})", self.layouts.len()),
            ));
        }
        if let Some((b, (len, layout))) = lens
            .iter()
            .zip(&self.layouts)
            .enumerate()
            .find(|(_, (len, l))| **len > l.capacity)
        {
            return Err(invalid_input(
                "lens",
                format!("gives sequence {b} {len} tokens"),
                format!("at most its capacity {}", layout.capacity),
            ));
        }
        for (index, buffer) in self.k.iter_mut().chain(self.v.iter_mut()).enumerate() {
            shadowkv::kernels::random::fill(
                gpu,
                gpu.stream(),
                buffer,
                seed.wrapping_add(index as u64),
                1.0,
                0.0,
            )
            .on_gpu("filling the KV cache with random keys and values")?;
        }
        self.lens.copy_from_slice(lens);
        Ok(())
    }

    /// Forgets sequence `index`'s tokens, so that a new sequence can take its block (the
    /// other sequences keep theirs). Nothing runs on the GPU: a later pass overwrites the
    /// block from its start.
    pub fn clear_sequence(&mut self, index: usize) -> Result<()> {
        let Some(len) = self.lens.get_mut(index) else {
            return Err(invalid_input(
                "index",
                format!("is {index}"),
                format!("a sequence of the cache (it holds {})", self.layouts.len()),
            ));
        };
        *len = 0;
        Ok(())
    }

    /// Tokens each sequence's block holds.
    pub fn capacities(&self) -> Vec<u32> {
        self.layouts.iter().map(|layout| layout.capacity).collect()
    }

    /// Bytes of the cache on the GPU.
    pub fn bytes(&self) -> usize {
        self.k.iter().chain(&self.v).map(|b| b.len() * 2).sum()
    }
}

impl GpuModel {
    /// An empty cache for sequences of at most `capacities[b]` tokens each.
    pub fn new_cache(&self, capacities: &[u32]) -> Result<GpuKvCache> {
        self.new_cache_of_layers(capacities, self.config.layers)
    }

    /// [`new_cache`](Self::new_cache) with buffers for `layers` layers.
    pub(super) fn new_cache_of_layers(
        &self,
        capacities: &[u32],
        layers: usize,
    ) -> Result<GpuKvCache> {
        const WHAT: &str = "allocating the full KV cache";
        let (kv_heads, head_dim) = (self.config.kv_heads as u64, self.config.head_dim as u64);
        let mut layouts = Vec::with_capacity(capacities.len());
        let mut offset = 0u64;
        for &capacity in capacities {
            if capacity == 0 {
                return Err(invalid_input(
                    "capacities",
                    "give a sequence 0 tokens",
                    "at least 1 token per sequence",
                ));
            }
            layouts.push(SequenceLayout {
                offset,
                capacity,
                len: 1,
            });
            // Offsets stay multiples of 8 elements (16-byte rows for the attention kernel).
            offset += (kv_heads * capacity as u64 * head_dim).next_multiple_of(8);
        }
        let needed = offset as usize * 2 * 2 * layers;
        let (free, _) = self.gpu.context().mem_get_info().on_gpu(WHAT)?;
        if needed > free {
            return Err(Error::OutOfMemory {
                what: format!(
                    "the full KV cache of {} sequences ({capacities:?} tokens)",
                    capacities.len()
                ),
                needed,
                free,
            });
        }
        let stream = self.stream();
        let buffers = || -> Result<Vec<CudaSlice<bf16>>> {
            (0..layers)
                .map(|_| stream.alloc_zeros::<bf16>(offset as usize).on_gpu(WHAT))
                .collect()
        };
        Ok(GpuKvCache {
            id: super::next_cache_id(),
            lens: vec![0; capacities.len()],
            k: buffers()?,
            v: buffers()?,
            layouts,
        })
    }
}
