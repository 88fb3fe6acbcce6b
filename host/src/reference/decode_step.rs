//! Reference for [`crate::decode_step`]: the whole step on the CPU, built from the
//! references of its kernels.
use half::bf16;
use shadowkv_kernels::rope::RotaryLayout;

use crate::kernels::attention::{DecodeAttentionShape, SequenceLayout};
use crate::kernels::shadow::{Miss, ShadowConfig, ShadowSequence};
use crate::reference::{attention, fetch, plan, rebuild, scoring, topk};

/// Host copies of a layer's buffers, laid out as on the GPU.
#[derive(Clone, Debug)]
pub struct HostLayer {
    /// Each sequence's layout in the buffers below.
    pub sequences: Vec<ShadowSequence>,
    /// bf16 landmarks: `d` per landmark row.
    pub landmarks: Vec<bf16>,
    /// The chunk id of each landmark row.
    pub chunk_ids: Vec<u32>,
    /// bf16 `A` (`[prompt_len, r]` per sequence).
    pub a: Vec<bf16>,
    /// bf16 `Bm` (`[r, Hkv*d]` per sequence).
    pub bm: Vec<bf16>,
    /// bf16 prompt values (`[Hkv, prompt_len, d]` per sequence), what the fetch copies misses
    /// from.
    pub values: Vec<bf16>,
    /// bf16 K blocks: local window, outliers, sparse slots, generated tokens.
    pub k: Vec<bf16>,
    /// bf16 V blocks, laid out as [`k`](Self::k).
    pub v: Vec<bf16>,
    /// `[rows, Hkv, budget_chunks]` chunk id held by each slot, each sequence's at its
    /// `resident_row` (as on the GPU).
    pub resident: Vec<u32>,
}

/// What the reference step computed, per (sequence, KV head) where it applies.
#[derive(Clone, Debug)]
pub struct StepOutput {
    /// `[batch, q_heads, head_dim]`.
    pub out: Vec<f64>,
    /// Per (sequence, KV head): the f64 score of each of its landmarks.
    pub scores: Vec<Vec<f64>>,
    /// Per (sequence, KV head): the `budget_chunks` chunk ids selected, in landmark order.
    pub selection: Vec<Vec<u32>>,
    /// Per (sequence, KV head): the misses of the plan, each a chunk and the slot it went to.
    pub misses: Vec<Vec<Miss>>,
}

/// One step: scoring, top-k, plan, fetch, rebuild (keys rounded to bf16, as stored) and
/// attention; `layer`'s K/V blocks and resident ids are updated as on the GPU.
///
/// `device_scores`, if given (per (sequence, head), as the GPU wrote them), are what the
/// top-k selects from, so that near-ties between f32 and f64 scores break as on the GPU; the
/// f64 scores are still returned for comparison.
pub fn decode_step(
    config: &ShadowConfig,
    inverse_frequencies: &[f64],
    layer: &mut HostLayer,
    q: &[bf16],
    device_scores: Option<&[Vec<f32>]>,
) -> StepOutput {
    let rotary = RotaryLayout::full(config.head_dim as u32);
    decode_step_rotary(
        config,
        (inverse_frequencies, &rotary),
        layer,
        q,
        device_scores,
    )
}

/// [`decode_step`] with the keys rebuilt by the RoPE variant `rotary` (its frequency table
/// and layout).
pub fn decode_step_rotary(
    config: &ShadowConfig,
    (inverse_frequencies, rotary): (&[f64], &RotaryLayout),
    layer: &mut HostLayer,
    q: &[bf16],
    device_scores: Option<&[Vec<f32>]>,
) -> StepOutput {
    let scale = 1.0 / (config.head_dim as f64).sqrt();
    let (kv_heads, k, c, d) = (
        config.kv_heads,
        config.budget_chunks,
        config.chunk_size,
        config.head_dim,
    );
    let mut output = StepOutput {
        out: Vec::new(),
        scores: Vec::new(),
        selection: Vec::new(),
        misses: Vec::new(),
    };
    for (b, sequence) in layer.sequences.clone().iter().enumerate() {
        for h in 0..kv_heads {
            let logits = scoring::logits(config, sequence, b, h, q, &layer.landmarks, scale);
            let scores = scoring::scores(&logits);
            let base = sequence.landmark_base(h as u32) as usize;
            let chunk_ids = &layer.chunk_ids[base..base + sequence.landmarks as usize];
            let selection = match device_scores {
                Some(device) => topk::select(&device[b * kv_heads + h], chunk_ids, k),
                None => {
                    let rounded: Vec<f32> = scores.iter().map(|&s| s as f32).collect();
                    topk::select(&rounded, chunk_ids, k)
                }
            };
            let slots = sequence.resident_base(h as u32, kv_heads as u32, k as u32);
            let misses = plan::plan(&selection, &mut layer.resident[slots..slots + k]);
            fetch::fetch(config, sequence, h, &misses, &layer.values, &mut layer.v);
            for miss in &misses {
                let factors = rebuild::Factors {
                    a: &layer.a,
                    bm: &layer.bm,
                };
                let keys = rebuild::chunk_keys_rotary(
                    config,
                    sequence,
                    (h, miss.chunk),
                    factors,
                    inverse_frequencies,
                    rotary,
                );
                let target = sequence.kv_row(
                    h as u32,
                    sequence.sparse_start + miss.slot * c as u32,
                    d as u32,
                ) as usize;
                for (out, key) in layer.k[target..target + c * d].iter_mut().zip(&keys) {
                    *out = bf16::from_f64(*key);
                }
            }
            output.scores.push(scores);
            output.selection.push(selection);
            output.misses.push(misses);
        }
    }
    let shape = DecodeAttentionShape {
        batch: layer.sequences.len(),
        q_heads: config.q_heads,
        kv_heads,
        head_dim: d,
    };
    let layouts: Vec<SequenceLayout> = layer.sequences.iter().map(|s| s.kv).collect();
    output.out = attention::decode_attention(&shape, &layouts, q, &layer.k, &layer.v, scale);
    output
}
