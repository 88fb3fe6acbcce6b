//! The equivalent bandwidth and where a step's bytes go (CPU only).
//!
//! Equivalent bandwidth = the bytes of K and V that full attention would read for the same
//! batch and context, divided by the ShadowKV step's time: the HBM bandwidth a dense
//! attention would need to run as fast. It can exceed the GPU's real bandwidth because the
//! step reads a small part of the cache.
use shadowkv::cache::ValueFormat;
use shadowkv::kernels::attention::{DecodeAttentionShape, SequenceLayout};

/// bf16 bytes of one element.
const BF16: u64 = 2;

/// The attention shape of the sweep's unit: one layer of Llama-3-8B (32 query heads over 8
/// KV heads, d 128), ShadowKV's paper parameters.
pub const UNIT_Q_HEADS: usize = 32;
/// KV heads of the unit.
pub const UNIT_KV_HEADS: usize = 8;
/// Head dimension of the unit.
pub const UNIT_HEAD_DIM: usize = 128;

/// The decode attention shape of `batch` sequences of the unit.
pub fn unit_shape(batch: usize) -> DecodeAttentionShape {
    DecodeAttentionShape {
        batch,
        q_heads: UNIT_Q_HEADS,
        kv_heads: UNIT_KV_HEADS,
        head_dim: UNIT_HEAD_DIM,
    }
}

/// Full attention's K/V layouts: `batch` sequences of `context` tokens, back to back.
pub fn full_layouts(shape: &DecodeAttentionShape, context: usize) -> Vec<SequenceLayout> {
    let per_sequence = (shape.kv_heads * context * shape.head_dim) as u64;
    (0..shape.batch as u64)
        .map(|b| SequenceLayout {
            offset: b * per_sequence,
            capacity: context as u32,
            len: context as u32,
        })
        .collect()
}

/// Bytes of K and V full attention reads for `batch` sequences of `context` tokens:
/// `2 * batch * context * Hkv * d * 2`.
pub fn full_attention_kv_bytes(shape: &DecodeAttentionShape, context: usize) -> u64 {
    2 * shape.batch as u64 * context as u64 * (shape.kv_heads * shape.head_dim) as u64 * BF16
}

/// `bytes` per `step_ms` milliseconds, in bytes per second (NaN for a time that is not
/// positive).
pub fn equivalent_bandwidth(full_kv_bytes: u64, step_ms: f64) -> f64 {
    if step_ms > 0.0 && step_ms.is_finite() {
        full_kv_bytes as f64 / (step_ms * 1e-3)
    } else {
        f64::NAN
    }
}

/// What a step moves, for the table's "where the time went".
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StepTraffic {
    /// Bytes read or written in GPU memory: the landmarks the scoring reads, the K/V blocks
    /// the attention reads, the `A` rows the rebuild reads, the K and V slots the rebuild and
    /// the fetch write, and the stored values the fetch reads when they live on the GPU.
    pub hbm_bytes: u64,
    /// Bytes of stored values the fetch reads over PCIe (values on the host).
    pub pcie_bytes: u64,
}

/// The sizes a step's traffic follows from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StepSizes {
    /// Landmark rows of the batch (every sequence and KV head).
    pub landmark_rows: u64,
    /// Tokens of every sequence's K/V block together (local, outliers, slots, generated).
    pub kv_tokens: u64,
    /// Chunks fetched and rebuilt in the step (every sequence and KV head).
    pub misses: u64,
    /// Of those, the chunks whose stored values came over PCIe (the step's statistics); the
    /// others were copied over HBM (values on the GPU, or found in the value tier).
    pub pcie_misses: u64,
    pub chunk_size: usize,
    pub rank: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
}

impl StepTraffic {
    /// The traffic of a step of `sizes` with the values stored in `format`.
    pub fn of(sizes: &StepSizes, format: ValueFormat) -> StepTraffic {
        let d = sizes.head_dim as u64;
        let c = sizes.chunk_size as u64;
        let landmarks = sizes.landmark_rows * d * BF16 + sizes.landmark_rows * 4;
        let attention = 2 * sizes.kv_tokens * sizes.kv_heads as u64 * d * BF16;
        let rebuild = sizes.misses * c * (sizes.rank as u64 + d) * BF16;
        let fetch_write = sizes.misses * c * d * BF16;
        let chunk = format.chunk_bytes(sizes.chunk_size, sizes.head_dim) as u64;
        let pcie_misses = sizes.pcie_misses.min(sizes.misses);
        let (hbm_reads, pcie_bytes) = ((sizes.misses - pcie_misses) * chunk, pcie_misses * chunk);
        StepTraffic {
            hbm_bytes: landmarks + attention + rebuild + fetch_write + hbm_reads,
            pcie_bytes,
        }
    }
}

/// When each stage of a step ran: its name, start and end (µs after the step began).
#[derive(Clone, Debug, PartialEq)]
pub struct StageSpan {
    pub name: String,
    pub start_us: f64,
    pub end_us: f64,
}

/// The spans of a step's stages from when each ended (`DecodeStep::timeline`, launch order),
/// for a step with the overlap on, as the sweep runs it: a `fetch` runs on the copy stream
/// once its part's selection (the compute stage before it) and the previous fetch are done;
/// the step's last attention waits for every fetch; every other stage follows the compute
/// stage before it.
pub fn stage_spans(ends: &[(String, f64)]) -> Vec<StageSpan> {
    let mut compute_end = 0f64;
    let mut fetch_end: Option<f64> = None;
    let last_attention = ends
        .iter()
        .rposition(|(name, _)| name == "attention" || name == "attention (fresh)");
    ends.iter()
        .enumerate()
        .map(|(index, (name, end))| {
            let start = if name == "fetch" {
                let start = compute_end.max(fetch_end.unwrap_or(0.0));
                fetch_end = Some(*end);
                start
            } else {
                let start = if Some(index) == last_attention {
                    compute_end.max(fetch_end.unwrap_or(0.0))
                } else {
                    compute_end
                };
                compute_end = *end;
                start
            };
            StageSpan {
                name: name.clone(),
                start_us: start,
                end_us: *end,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use shadowkv::DecodeAttentionPlan;

    #[test]
    fn full_attention_bytes_match_the_attention_plan() {
        for (batch, context) in [(1, 32_768), (16, 122_880), (3, 1 << 20)] {
            let shape = unit_shape(batch);
            let layouts = full_layouts(&shape, context);
            let plan = DecodeAttentionPlan::new(shape, &layouts, 1).unwrap();
            assert_eq!(
                full_attention_kv_bytes(&shape, context),
                plan.kv_bytes_read() as u64
            );
        }
        // 16 x 122,880 tokens: 4 KiB of K and V per token, 8.05 GB.
        assert_eq!(
            full_attention_kv_bytes(&unit_shape(16), 122_880),
            16 * 122_880 * 4096
        );
    }

    #[test]
    fn equivalent_bandwidth_is_full_bytes_over_step_time() {
        let bytes = full_attention_kv_bytes(&unit_shape(16), 122_880);
        // The H100's 758 us per layer at 60% hits read as 10.6 TB/s.
        let rate = equivalent_bandwidth(bytes, 0.758);
        assert!((rate / 1e12 - 10.62).abs() < 0.01, "{rate}");
        assert!(equivalent_bandwidth(bytes, 0.0).is_nan());
        assert!(equivalent_bandwidth(bytes, f64::NAN).is_nan());
    }

    #[test]
    fn stages_start_when_what_they_wait_for_ends() {
        let ends: Vec<(String, f64)> = [
            ("scoring", 10.0),
            ("topk + plan", 25.0),
            ("fetch", 80.0),
            ("scoring", 35.0),
            ("topk + plan", 50.0),
            ("fetch", 140.0),
            ("attention (resident)", 90.0),
            ("rebuild", 110.0),
            ("attention (fresh)", 150.0),
        ]
        .iter()
        .map(|&(name, end)| (name.to_owned(), end))
        .collect();
        let spans = stage_spans(&ends);
        let starts: Vec<f64> = spans.iter().map(|s| s.start_us).collect();
        // The second fetch waits for the first; the resident attention follows the second
        // selection; the fresh attention waits for the last fetch.
        assert_eq!(
            starts,
            [0.0, 10.0, 25.0, 25.0, 35.0, 80.0, 50.0, 90.0, 140.0]
        );
        assert_eq!(spans[8].end_us, 150.0);
        // One part, one attention after the fetch.
        let one: Vec<(String, f64)> = [
            ("scoring", 5.0),
            ("fetch", 40.0),
            ("rebuild", 20.0),
            ("attention", 60.0),
        ]
        .iter()
        .map(|&(name, end)| (name.to_owned(), end))
        .collect();
        let starts: Vec<f64> = stage_spans(&one).iter().map(|s| s.start_us).collect();
        assert_eq!(starts, [0.0, 5.0, 5.0, 40.0]);
    }

    #[test]
    fn misses_cross_pcie_from_the_host_and_hbm_from_the_gpu_or_the_tier() {
        let sizes = |pcie_misses| StepSizes {
            landmark_rows: 1000,
            kv_tokens: 2500,
            misses: 100,
            pcie_misses,
            chunk_size: 8,
            rank: 160,
            kv_heads: 8,
            head_dim: 128,
        };
        let host = StepTraffic::of(&sizes(100), ValueFormat::Bf16);
        assert_eq!(host.pcie_bytes, 100 * 2048);
        let gpu = StepTraffic::of(&sizes(0), ValueFormat::Bf16);
        assert_eq!(gpu.pcie_bytes, 0);
        assert_eq!(gpu.hbm_bytes, host.hbm_bytes + 100 * 2048);
        // Landmarks (bf16 rows and u32 ids), attention, rebuild (A rows read, K written),
        // fetch (V written).
        let expected =
            1000 * 256 + 1000 * 4 + 2 * 2500 * 8 * 128 * 2 + 100 * 8 * 288 * 2 + 100 * 8 * 128 * 2;
        assert_eq!(host.hbm_bytes, expected);
        // A tier that served 30 of the misses: 70 over PCIe, 30 over HBM.
        let tiered = StepTraffic::of(&sizes(70), ValueFormat::Bf16);
        assert_eq!(tiered.pcie_bytes, 70 * 2048);
        assert_eq!(tiered.hbm_bytes, expected + 30 * 2048);
        // int4 moves 576 bytes a chunk.
        let int4 = StepTraffic::of(&sizes(100), ValueFormat::Int4);
        assert_eq!(int4.pcie_bytes, 100 * 576);
    }
}
