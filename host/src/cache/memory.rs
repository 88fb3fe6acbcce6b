//! What a cache takes: each sequence's geometry and per-buffer footprint from its prompt
//! length, the buffers' sizes for a [`CacheCapacity`], the bytes by part, and the planner that
//! finds how many sequences fit in given GPU and host memory.
use shadowkv_kernels::shadow_prefill::exact_rows;

use super::params::{
    CacheCapacity, CacheShape, ShadowKvParams, ValueFormat, ValueHome, ValueStorage,
};
use crate::error::{exhausted_with, invalid, Result};
use crate::kernels::shadow::ShadowConfig;
use crate::kernels::tier;

/// Bytes by part, on the GPU and in host memory.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MemoryReport {
    /// GPU bytes by part, each with its label ("landmarks", "A", "K/V blocks", ...).
    pub gpu: Vec<(&'static str, u64)>,
    /// Host bytes by part: the pinned values when they live in host memory.
    pub host: Vec<(&'static str, u64)>,
}

impl MemoryReport {
    /// All GPU bytes: the sum of [`gpu`](Self::gpu).
    pub fn gpu_bytes(&self) -> u64 {
        self.gpu.iter().map(|(_, b)| b).sum()
    }
    /// All host bytes: the sum of [`host`](Self::host).
    pub fn host_bytes(&self) -> u64 {
        self.host.iter().map(|(_, b)| b).sum()
    }
}

/// How many sequences of one length fit (see
/// [`ShadowKvCache::plan`](super::ShadowKvCache::plan)).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CachePlan {
    /// The cache for one such sequence.
    pub per_sequence: MemoryReport,
    /// Sequences that fit in the GPU and host bytes given (0 if not even one).
    pub sequences: usize,
    /// The whole K/V cache of one such sequence on the GPU (full attention), for comparison.
    pub full_cache_bytes: u64,
    /// Sequences that fit with full attention in the same GPU bytes.
    pub full_cache_sequences: usize,
}

/// One sequence's sizes, from its prompt length and the parameters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Geometry {
    pub(super) prompt_len: u32,
    pub(super) chunks: u32,
    pub(super) landmarks: u32,
    /// Local window and outlier rows at the front of each K/V head.
    pub(super) exact_rows: u32,
    /// Rows of each K/V head: exact rows, sparse slots, generated tokens.
    pub(super) kv_capacity: u32,
}

/// Element counts of one sequence in each per-layer buffer (the values: bf16 elements, or
/// bytes of a compressed format).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(super) struct Footprint {
    pub(super) landmark_rows: usize,
    pub(super) a: usize,
    pub(super) bm: usize,
    pub(super) kv: usize,
    pub(super) values: usize,
}

impl Footprint {
    /// The five counts in buffer order: landmarks, A, Bm, K/V, values.
    pub(super) fn parts(&self) -> [usize; 5] {
        [self.landmark_rows, self.a, self.bm, self.kv, self.values]
    }

    /// The inverse of [`parts`](Self::parts).
    pub(super) fn from_parts([landmark_rows, a, bm, kv, values]: [usize; 5]) -> Footprint {
        Footprint {
            landmark_rows,
            a,
            bm,
            kv,
            values,
        }
    }
}

/// Bytes of host memory the system says are available (`MemAvailable`), if it says.
pub fn host_available_bytes() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// The validated decode config for `shape` and `params`.
pub(super) fn shadow_config(shape: &CacheShape, params: &ShadowKvParams) -> Result<ShadowConfig> {
    params.validate(shape.kv_heads, shape.head_dim)?;
    if shape.layers == 0 {
        return Err(invalid("shape.layers", "is 0", "at least one layer"));
    }
    let config = ShadowConfig {
        q_heads: shape.q_heads,
        kv_heads: shape.kv_heads,
        head_dim: shape.head_dim,
        chunk_size: params.chunk_size,
        rank: params.rank,
        budget_chunks: params.budget_chunks(),
    };
    config.validate()?;
    Ok(config)
}

pub(super) fn geometry(
    params: &ShadowKvParams,
    prompt_len: usize,
    max_generated: usize,
) -> Result<Geometry> {
    params.check_prompt(prompt_len)?;
    let too_long = || {
        invalid(
            "prompt_len",
            format!("{prompt_len} tokens plus {max_generated} generated"),
            "fewer than 2^31 tokens",
        )
    };
    let prompt = u32::try_from(prompt_len).map_err(|_| too_long())?;
    let chunks = params.prompt_chunks(prompt_len) as u32;
    let outliers = params.prompt_outliers(prompt_len) as u32;
    let exact = exact_rows(prompt, chunks, params.chunk_size as u32, outliers);
    let kv_capacity = (exact as usize + params.sparse_budget + max_generated)
        .try_into()
        .ok()
        .filter(|&c: &u32| c < i32::MAX as u32)
        .ok_or_else(too_long)?;
    Ok(Geometry {
        prompt_len: prompt,
        chunks,
        landmarks: chunks - outliers,
        exact_rows: exact,
        kv_capacity,
    })
}

pub(super) fn footprint(
    shape: &CacheShape,
    params: &ShadowKvParams,
    geometry: &Geometry,
    format: ValueFormat,
) -> Footprint {
    let (heads, d) = (shape.kv_heads, shape.head_dim);
    let values = match format {
        ValueFormat::Bf16 => heads * geometry.prompt_len as usize * d,
        // Only the chunks a miss may name; a multiple of 16 bytes.
        _ => format.packed_bytes(heads, geometry.chunks as usize, params.chunk_size, d),
    };
    Footprint {
        landmark_rows: heads * geometry.landmarks as usize,
        a: geometry.prompt_len as usize * params.rank,
        bm: params.rank * shape.kv_width(),
        kv: heads * geometry.kv_capacity as usize * d,
        values,
    }
}

/// Bytes of one element of the value buffer in `format` (compressed buffers count bytes).
pub(super) fn value_unit_bytes(format: ValueFormat) -> u64 {
    match format {
        ValueFormat::Bf16 => 2,
        _ => 1,
    }
}

/// Per-layer buffer sizes (elements) for `capacity`: the sum of the footprints of
/// `max_sequences` sequences sharing `max_prompt_tokens`, the worst split (each buffer's
/// own worst case: some grow with the prompt, the K/V blocks with the count).
pub(super) fn buffer_sizes(
    shape: &CacheShape,
    params: &ShadowKvParams,
    capacity: &CacheCapacity,
    format: ValueFormat,
) -> Result<Footprint> {
    if capacity.max_sequences == 0 || capacity.max_prompt_len == 0 {
        return Err(invalid(
            "capacity",
            format!("{capacity:?}"),
            "at least one sequence with a prompt",
        ));
    }
    let longest = geometry(params, capacity.max_prompt_len, capacity.max_generated)?;
    let tokens = capacity.max_prompt_tokens.max(capacity.max_prompt_len);

    let longest_footprint = footprint(shape, params, &longest, format);
    // A K/V block holds the local window (below `n_local + 8` chunks plus the remainder
    // of the last chunk, whatever the prompt's length), the outliers, the slots and the
    // generated tokens.
    let c = params.chunk_size;
    let exact_bound =
        ((params.local_chunks + 9) * c).min(capacity.max_prompt_len) + params.outlier_chunks * c;
    let per_sequence_kv =
        shape.kv_width() * (exact_bound + params.sparse_budget + capacity.max_generated);
    let sequences = capacity.max_sequences;
    Ok(Footprint {
        // Landmarks per head are at most a sequence's tokens over c, so in all at most
        // Hkv * tokens / c rows.
        landmark_rows: shape.kv_heads * (tokens / params.chunk_size),
        a: tokens * params.rank,
        bm: sequences * longest_footprint.bm,
        kv: sequences * per_sequence_kv,
        values: match format {
            ValueFormat::Bf16 => tokens * shape.kv_width(),
            // Chunks of all sequences together are at most tokens / c; each sequence's range
            // is rounded up to 16 bytes.
            _ => {
                shape.kv_heads
                    * (tokens / params.chunk_size)
                    * format.chunk_bytes(params.chunk_size, shape.head_dim)
                    + sequences * 16
            }
        },
    })
}

/// What a cache of `capacity` takes, by part (GPU and host).
pub fn memory_for(
    shape: &CacheShape,
    params: &ShadowKvParams,
    values: ValueStorage,
    capacity: &CacheCapacity,
) -> Result<MemoryReport> {
    let config = shadow_config(shape, params)?;
    crate::kernels::fetch::check_packed_shape(values.format, shape.head_dim)?;
    let sizes = buffer_sizes(shape, params, capacity, values.format)?;
    let layers = shape.layers as u64;
    let d = shape.head_dim as u64;
    let slots = (capacity.max_sequences * shape.kv_heads * config.budget_chunks) as u64;
    let longest_chunks = params.prompt_chunks(capacity.max_prompt_len) as u64;
    let heads = shape.kv_heads as u64;
    let landmark_rows = sizes.landmark_rows as u64;
    let value_bytes = layers * sizes.values as u64 * value_unit_bytes(values.format);
    let mut report = MemoryReport {
        gpu: vec![
            ("landmarks", layers * landmark_rows * d * 2),
            ("chunk ids", layers * landmark_rows * 4),
            ("A", layers * sizes.a as u64 * 2),
            ("Bm", layers * sizes.bm as u64 * 2),
            ("K/V blocks", layers * sizes.kv as u64 * 2 * 2),
            ("resident ids", layers * slots * 4),
            (
                "prefill scratch",
                heads * longest_chunks * (d * 2 + 4)
                    + crate::kernels::factorise::scratch_bytes(shape.kv_width()),
            ),
            (
                "decode scratch",
                landmark_rows * (config.group() as u64 + 1) * 4 + slots * 16,
            ),
        ],
        host: Vec::new(),
    };
    let label = match (values.home.on_host(), values.format) {
        (true, ValueFormat::Bf16) => "values (pinned)",
        (true, ValueFormat::Fp8) => "values (pinned, fp8)",
        (true, ValueFormat::Int4) => "values (pinned, int4)",
        (false, ValueFormat::Bf16) => "values",
        (false, ValueFormat::Fp8) => "values (fp8)",
        (false, ValueFormat::Int4) => "values (int4)",
    };
    if values.home.on_host() {
        report.host.push((label, value_bytes));
    } else {
        report.gpu.push((label, value_bytes));
    }
    if let ValueHome::Tiered { chunks_per_head } = values.home {
        tier::check_chunks_per_head(chunks_per_head, longest_chunks as usize)?;
        let per_layer = tier::layer_bytes(
            values.format,
            capacity.max_sequences,
            shape.kv_heads,
            chunks_per_head,
            params.chunk_size,
            shape.head_dim,
        );
        report.gpu.push(("value tier", layers * per_layer));
    }
    Ok(report)
}

/// How many sequences of `prompt_len` tokens (each generating up to `max_generated`) fit
/// in `gpu_bytes` of GPU memory and `host_bytes` of pinned host memory, and how many would
/// with the whole K/V cache on the GPU.
pub fn plan(
    shape: &CacheShape,
    params: &ShadowKvParams,
    values: ValueStorage,
    prompt_len: usize,
    max_generated: usize,
    gpu_bytes: u64,
    host_bytes: u64,
) -> Result<CachePlan> {
    let report = |n: usize| {
        memory_for(
            shape,
            params,
            values,
            &CacheCapacity::uniform(n, prompt_len, max_generated),
        )
    };
    let one = report(1)?;
    let fits = |r: &MemoryReport| r.gpu_bytes() <= gpu_bytes && r.host_bytes() <= host_bytes;
    // The footprint grows with the count (the scratch barely), so search upwards.
    let mut sequences = 0;
    let (mut low, mut high) = (0usize, 1usize);
    while fits(&report(high)?) {
        low = high;
        high *= 2;
        if high > 1 << 20 {
            break;
        }
    }
    while low + 1 < high {
        let middle = (low + high) / 2;
        if fits(&report(middle)?) {
            low = middle;
        } else {
            high = middle;
        }
    }
    if low > 0 {
        sequences = low;
    }
    let full_cache_bytes =
        shape.layers as u64 * 2 * shape.kv_width() as u64 * (prompt_len + max_generated) as u64 * 2;
    Ok(CachePlan {
        per_sequence: one,
        sequences,
        full_cache_bytes,
        full_cache_sequences: (gpu_bytes / full_cache_bytes.max(1)) as usize,
    })
}

/// What a cache of `capacity` takes, checked against `free_gpu` bytes of GPU memory and (when
/// known) `available_host` bytes of host memory; the error of a cache that does not fit says
/// how many sequences of its longest prompt each value format fits there.
pub(super) fn check_fits(
    shape: &CacheShape,
    params: &ShadowKvParams,
    values: ValueStorage,
    capacity: &CacheCapacity,
    free_gpu: u64,
    available_host: Option<u64>,
) -> Result<MemoryReport> {
    let report = memory_for(shape, params, values, capacity)?;
    let host = available_host.unwrap_or(u64::MAX);
    let fits = || what_fits(shape, params, values, capacity, free_gpu, host);
    if report.gpu_bytes() > free_gpu {
        return Err(exhausted_with(
            "free GPU memory for the cache",
            report.gpu_bytes(),
            free_gpu,
            "bytes",
            fits(),
        ));
    }
    if report.host_bytes() > host {
        return Err(exhausted_with(
            "available host memory for the pinned values (or use ValueHome::Device)",
            report.host_bytes(),
            host,
            "bytes",
            fits(),
        ));
    }
    Ok(report)
}

/// A sentence on what fits in `gpu_bytes` and `host_bytes` at `capacity`'s longest prompt:
/// how many such sequences each value format allows in `values`' home (for the error of a
/// cache that does not fit).
pub(super) fn what_fits(
    shape: &CacheShape,
    params: &ShadowKvParams,
    values: ValueStorage,
    capacity: &CacheCapacity,
    gpu_bytes: u64,
    host_bytes: u64,
) -> String {
    let counts: Vec<String> = ValueFormat::ALL
        .iter()
        .filter_map(|&format| {
            let storage = values.home.with_format(format);
            let fit = plan(
                shape,
                params,
                storage,
                capacity.max_prompt_len,
                capacity.max_generated,
                gpu_bytes,
                host_bytes,
            )
            .ok()?;
            Some(format!("{} with {} values", fit.sequences, format.name()))
        })
        .collect();
    let mut sentence = format!(
        "{} sequences of {} tokens (generating {}) were asked for; in this memory {} fit \
         (ShadowKvCache::plan)",
        capacity.max_sequences,
        capacity.max_prompt_len,
        capacity.max_generated,
        counts.join(", ")
    );
    if values.home.tier_chunks() > 0 {
        let tier = tier_chunks_in_free(shape, params, values, capacity, gpu_bytes);
        sentence += &match tier {
            Ok(chunks) => format!(
                "; beside {} such sequences a value tier of at most {chunks} chunks per KV head \
                 fits (ValueHome::Tiered)",
                capacity.max_sequences
            ),
            Err(_) => format!(
                "; beside {} such sequences no value tier fits",
                capacity.max_sequences
            ),
        };
    }
    sentence
}

/// The GPU value tier's `chunks_per_head` (see [`ValueHome::Tiered`]) that `tier_bytes` of
/// GPU memory hold for a cache of `capacity` with the values in `values.format`: the most
/// whose tiers (every layer's) fit, at most the longest prompt's chunks (that many hold every
/// value). An error if not one chunk per head fits, saying what one takes.
pub fn tier_chunks_for(
    shape: &CacheShape,
    params: &ShadowKvParams,
    values: ValueStorage,
    capacity: &CacheCapacity,
    tier_bytes: u64,
) -> Result<usize> {
    let longest = params.prompt_chunks(capacity.max_prompt_len).max(1);
    let one = |chunks| {
        shape.layers as u64
            * tier::layer_bytes(
                values.format,
                capacity.max_sequences,
                shape.kv_heads,
                chunks,
                params.chunk_size,
                shape.head_dim,
            )
    };
    let chunks = tier::chunks_per_head_for(
        tier_bytes,
        values.format,
        shape.layers,
        capacity.max_sequences,
        shape.kv_heads,
        params.chunk_size,
        shape.head_dim,
    );
    if chunks == 0 {
        return Err(invalid(
            "value tier",
            format!("of {tier_bytes} bytes holds no chunk"),
            format!(
                "at least {} bytes (one chunk per KV head and layer for {} sequences); {} bytes \
                 hold every value of {}-token prompts",
                one(1),
                capacity.max_sequences,
                one(longest),
                capacity.max_prompt_len
            ),
        ));
    }
    Ok(chunks.min(longest))
}

/// The GPU value tier that fits in `free_gpu` bytes beside a cache of `capacity` with the
/// values in host memory in `values.format` (see [`tier_chunks_for`]); an error if the cache
/// alone does not leave room for one chunk per head.
pub fn tier_chunks_in_free(
    shape: &CacheShape,
    params: &ShadowKvParams,
    values: ValueStorage,
    capacity: &CacheCapacity,
    free_gpu: u64,
) -> Result<usize> {
    let storage = ValueHome::Host.with_format(values.format);
    let cache = memory_for(shape, params, storage, capacity)?.gpu_bytes();
    tier_chunks_for(
        shape,
        params,
        storage,
        capacity,
        free_gpu.saturating_sub(cache),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// The planner's count is the largest that fits: that many fit and one more does not.
        #[test]
        fn planner_finds_the_largest_batch(
            prompt_len in 4096usize..200_000,
            gpu_gib in 1u64..80,
            host_gib in 1u64..200,
            on_host in any::<bool>(),
        ) {
            let shape = CacheShape::LLAMA_3_8B;
            let params = ShadowKvParams::default();
            let home = if on_host { ValueHome::Host } else { ValueHome::Device };
            let (gpu_bytes, host_bytes) = (gpu_gib << 30, host_gib << 30);
            let plan = plan(&shape, &params, home.into(), prompt_len, 256, gpu_bytes, host_bytes)
                .unwrap();
            let fits = |n: usize| {
                let report = memory_for(
                    &shape,
                    &params,
                    home.into(),
                    &CacheCapacity::uniform(n, prompt_len, 256),
                )
                .unwrap();
                report.gpu_bytes() <= gpu_bytes && report.host_bytes() <= host_bytes
            };
            if plan.sequences > 0 {
                prop_assert!(fits(plan.sequences));
            }
            prop_assert!(!fits(plan.sequences + 1));
            prop_assert_eq!(plan.full_cache_sequences as u64, gpu_bytes / plan.full_cache_bytes);
            // ShadowKV keeps less on the GPU per sequence than the whole cache.
            let per_sequence = plan.per_sequence.gpu_bytes();
            if on_host {
                prop_assert!(per_sequence < plan.full_cache_bytes);
            }
        }
    }

    /// At Llama-3-8B and 122,880 tokens with host memory the limit, int4 values fit at least
    /// 3x the bf16 batch and fp8 about 2x.
    #[test]
    fn compressed_formats_fit_larger_batches_on_the_host() {
        let shape = CacheShape::LLAMA_3_8B;
        let params = ShadowKvParams::default();
        for host_gib in [32u64, 64, 128, 256, 512] {
            let batch = |format| {
                plan(
                    &shape,
                    &params,
                    ValueHome::Host.with_format(format),
                    122_880,
                    256,
                    1 << 42,
                    host_gib << 30,
                )
                .unwrap()
                .sequences
            };
            let (bf16, fp8, int4) = (
                batch(ValueFormat::Bf16),
                batch(ValueFormat::Fp8),
                batch(ValueFormat::Int4),
            );
            println!("{host_gib} GiB of host memory: bf16 {bf16}, fp8 {fp8}, int4 {int4}");
            assert!(bf16 >= 1);
            assert!(int4 >= 3 * bf16, "{host_gib} GiB: int4 {int4}, bf16 {bf16}");
            assert!(
                fp8 * 10 >= 19 * bf16,
                "{host_gib} GiB: fp8 {fp8}, bf16 {bf16}"
            );
        }
    }

    /// The report counts the compressed bytes: per layer, each KV head's chunks (tokens / c)
    /// at the format's chunk bytes, plus 16 bytes of alignment per sequence; the GPU side is
    /// the same in every format.
    #[test]
    fn reports_count_the_compressed_bytes() {
        let shape = CacheShape::LLAMA_3_8B;
        let params = ShadowKvParams::default();
        let capacity = CacheCapacity::uniform(3, 122_880, 256);
        let bf16 = memory_for(&shape, &params, ValueHome::Host.into(), &capacity).unwrap();
        assert_eq!(bf16.host_bytes(), 32 * 3 * 122_880 * 8 * 128 * 2);
        for (format, label) in [
            (ValueFormat::Fp8, "values (pinned, fp8)"),
            (ValueFormat::Int4, "values (pinned, int4)"),
        ] {
            let report = memory_for(
                &shape,
                &params,
                ValueHome::Host.with_format(format),
                &capacity,
            )
            .unwrap();
            let chunks = 3 * 122_880 / 8;
            let per_layer = 8 * chunks * format.chunk_bytes(8, 128) as u64 + 3 * 16;
            assert_eq!(report.host, vec![(label, 32 * per_layer)]);
            assert_eq!(report.gpu, bf16.gpu);
            let on_gpu = memory_for(
                &shape,
                &params,
                ValueHome::Device.with_format(format),
                &capacity,
            )
            .unwrap();
            assert_eq!(on_gpu.gpu_bytes(), bf16.gpu_bytes() + 32 * per_layer);
            assert!(on_gpu.host.is_empty());
        }
        // A compressed format needs a head_dim the kernels' 16-channel units divide (every
        // head_dim the decode kernels take does).
        let error = crate::kernels::fetch::check_packed_shape(ValueFormat::Int4, 72).unwrap_err();
        assert!(error.to_string().contains("multiple of 16"), "{error}");
        assert!(crate::kernels::fetch::check_packed_shape(ValueFormat::Bf16, 72).is_ok());
    }

    /// A cache that does not fit says how many sequences each format fits instead.
    #[test]
    fn a_cache_that_does_not_fit_says_what_fits() {
        let shape = CacheShape::LLAMA_3_8B;
        let params = ShadowKvParams::default();
        let capacity = CacheCapacity::uniform(20, 122_880, 256);
        let host = Some(128u64 << 30);
        let error = check_fits(
            &shape,
            &params,
            ValueHome::Host.into(),
            &capacity,
            1 << 42,
            host,
        )
        .unwrap_err();
        let message = error.to_string();
        println!("{message}");
        let count = |format| {
            plan(
                &shape,
                &params,
                ValueHome::Host.with_format(format),
                122_880,
                256,
                1 << 42,
                128 << 30,
            )
            .unwrap()
            .sequences
        };
        assert!(message.contains("host memory"), "{message}");
        assert!(
            message.contains("20 sequences of 122880 tokens"),
            "{message}"
        );
        for format in ValueFormat::ALL {
            let fits = format!("{} with {} values", count(format), format.name());
            assert!(message.contains(&fits), "{message}");
        }
        // int4 fits 20 in the same memory.
        assert!(check_fits(
            &shape,
            &params,
            ValueHome::Host.with_format(ValueFormat::Int4),
            &capacity,
            1 << 42,
            host
        )
        .is_ok());
        // Too little GPU memory: the same sentence, for the GPU.
        let error = check_fits(
            &shape,
            &params,
            ValueHome::Host.into(),
            &capacity,
            1 << 30,
            host,
        )
        .unwrap_err()
        .to_string();
        assert!(
            error.contains("GPU memory") && error.contains("0 with int4 values"),
            "{error}"
        );
    }

    #[test]
    fn planner_rejects_a_short_prompt() {
        let error = plan(
            &CacheShape::LLAMA_3_8B,
            &ShadowKvParams::default(),
            ValueHome::Host.into(),
            100,
            16,
            1 << 36,
            1 << 36,
        )
        .unwrap_err();
        assert!(error.to_string().contains("prompt"), "{error}");
    }
}

#[cfg(test)]
#[path = "memory_tier_tests.rs"]
mod tier_tests;
