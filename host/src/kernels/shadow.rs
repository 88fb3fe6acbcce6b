//! The validated layout of a ShadowKV decode batch, shared by every decode launcher
//! (`scoring`, `topk`, `plan`, `fetch`, `rebuild`, `decode_step`).
use std::num::NonZeroU32;
use std::ops::Range;

use cudarc::driver::{CudaSlice, CudaStream};
use shadowkv_kernels::scoring as scoring_layout;
use shadowkv_kernels::shadow::{self as layout, ShadowShape};
pub use shadowkv_kernels::shadow::{Miss, ShadowSequence, EMPTY_SLOT};

use crate::error::{check_range, check_reach, invalid, Result};
use crate::gpu::LaunchBuffers;

/// A model's attention shape and ShadowKV's parameters: what every sequence of a batch shares.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ShadowConfig {
    /// Query heads (`Hq`), a multiple of `kv_heads`.
    pub q_heads: usize,
    /// KV heads (`Hkv`).
    pub kv_heads: usize,
    /// Dimension of one head (`d`).
    pub head_dim: usize,
    /// Tokens per chunk (`c`).
    pub chunk_size: usize,
    /// Rank of the key factorisation (`r`).
    pub rank: usize,
    /// Chunks selected per (sequence, KV head): the sparse budget `S` over `c`.
    pub budget_chunks: usize,
}

impl ShadowConfig {
    /// Llama-3-8B heads with ShadowKV's defaults (c 8, r 160, S 2048).
    pub const LLAMA_3_8B: ShadowConfig = ShadowConfig {
        q_heads: 32,
        kv_heads: 8,
        head_dim: 128,
        chunk_size: 8,
        rank: 160,
        budget_chunks: 256,
    };

    /// Query heads per KV head (`G`).
    pub fn group(&self) -> usize {
        self.q_heads / self.kv_heads.max(1)
    }

    /// The sparse budget in tokens (`S`).
    pub fn sparse_budget(&self) -> usize {
        self.budget_chunks * self.chunk_size
    }

    /// Checks the config: the heads as
    /// [`DecodeAttentionShape::validate`](super::attention::DecodeAttentionShape::validate)
    /// does, `chunk_size` in 1..=64, `rank` a multiple of 16 up to `min(256, Hkv*d)` and
    /// `budget_chunks` in 1..=2^20. Errors with
    /// [`Error::InvalidArgument`](crate::Error::InvalidArgument) naming the first that fails.
    pub fn validate(&self) -> Result<()> {
        // The heads: exactly what the attention kernel accepts.
        crate::kernels::attention::DecodeAttentionShape {
            batch: 1,
            q_heads: self.q_heads,
            kv_heads: self.kv_heads,
            head_dim: self.head_dim,
        }
        .validate()?;
        check_range(
            "chunk_size",
            self.chunk_size,
            1..=layout::MAX_CHUNK_SIZE as usize,
        )?;
        let step = layout::RANK_STEP as usize;
        let max_rank = (layout::MAX_RANK as usize).min(self.kv_heads * self.head_dim);
        if self.rank == 0 || !self.rank.is_multiple_of(step) || self.rank > max_rank {
            return Err(invalid(
                "rank",
                format!("is {}", self.rank),
                format!(
                    "a multiple of {step} in {step}..={max_rank} (at most {} and at most kv_heads * head_dim)",
                    layout::MAX_RANK
                ),
            ));
        }
        check_range("budget_chunks", self.budget_chunks, 1..=1 << 20)?;
        Ok(())
    }
}

/// How far each buffer must reach for a batch's layouts (elements).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Extents {
    /// Landmark rows: chunk ids and scores hold this many, landmarks this times `d`.
    pub landmark_rows: usize,
    /// Elements of `A` (bf16 `[prompt_len, r]` per sequence, from `a_offset`).
    pub a: usize,
    /// Elements of `Bm` (bf16 `[r, Hkv*d]` per sequence, from `bm_offset`).
    pub bm: usize,
    /// Elements of the values (bf16 `[Hkv, prompt_len, d]` per sequence, from
    /// `host_value_offset`).
    pub values: usize,
    /// Elements of each of the K and V buffers (`[Hkv, capacity, d]` per sequence, from
    /// `kv.offset`).
    pub kv: usize,
    /// Most landmarks of one sequence (per head).
    pub max_landmarks: u32,
    /// Most chunks of one sequence.
    pub max_chunks: u32,
    /// Rows of the resident ids the layouts reach: the largest `resident_row` plus one.
    pub resident_rows: usize,
}

/// A validated batch: the config, each sequence's layout and their device copy.
pub struct ShadowBatch {
    config: ShadowConfig,
    sequences: Vec<ShadowSequence>,
    extents: Extents,
    /// The first sequence whose `resident_row` an earlier one has too, if any: such a batch
    /// may not run a plan (both would update the same row).
    repeated_row: Option<usize>,
    /// The layouts on the device: the first `batch()` entries (it keeps the largest size
    /// [`set_sequences`](Self::set_sequences) asked for).
    device: CudaSlice<ShadowSequence>,
    /// Where the kernels read the layouts instead of `device`, while set (see
    /// [`read_layouts_from`](Self::read_layouts_from)).
    external: Option<u64>,
    /// `device` missed an update while `external` was set: the next
    /// [`set_sequences`](Self::set_sequences) uploads even unchanged layouts.
    stale: bool,
}

impl ShadowBatch {
    /// Validates `sequences` against `config` and uploads them on `stream`.
    pub fn new(
        stream: &std::sync::Arc<CudaStream>,
        config: ShadowConfig,
        sequences: &[ShadowSequence],
    ) -> Result<Self> {
        let extents = validate(&config, sequences)?;
        let device = stream.clone_htod(sequences)?;
        Ok(ShadowBatch {
            config,
            sequences: sequences.to_vec(),
            extents,
            repeated_row: repeated_row(sequences),
            device,
            external: None,
            stale: false,
        })
    }

    /// Replaces the layouts with `sequences`, of any batch size, re-validated and uploaded
    /// on `stream` if they changed. The device copy is reused while it is large enough (it
    /// grows to the largest batch asked for and never shrinks), so a caller that runs subsets
    /// of a fixed set of sequences allocates at most once per new largest size. On an error
    /// the batch is unchanged.
    pub fn set_sequences(
        &mut self,
        stream: &std::sync::Arc<CudaStream>,
        sequences: &[ShadowSequence],
    ) -> Result<()> {
        let upload = self.external.is_none();
        if sequences == self.sequences && !(upload && self.stale) {
            // Validated and uploaded when they were set (a step's three calls on a layer).
            return Ok(());
        }
        let extents = validate(&self.config, sequences)?;
        if !upload {
            // The kernels read the caller's device copy: validate and keep the host copy only.
            self.stale = true;
        } else if sequences.len() > self.device.len() {
            self.device = stream.clone_htod(sequences)?;
            self.stale = false;
        } else {
            stream.memcpy_htod(sequences, &mut self.device)?;
            self.stale = false;
        }
        self.sequences.clear();
        self.sequences.extend_from_slice(sequences);
        self.repeated_row = repeated_row(sequences);
        self.extents = extents;
        Ok(())
    }

    /// Replaces the layouts (same batch size), re-validated and re-uploaded on `stream`.
    pub fn update(
        &mut self,
        stream: &std::sync::Arc<CudaStream>,
        sequences: &[ShadowSequence],
    ) -> Result<()> {
        if sequences.len() != self.sequences.len() {
            return Err(invalid(
                "sequences",
                format!("has {} entries", sequences.len()),
                format!(
                    "{} (the batch's size; make a new ShadowBatch to change it)",
                    self.sequences.len()
                ),
            ));
        }
        self.set_sequences(stream, sequences)
    }

    /// The config every sequence was validated against.
    pub fn config(&self) -> &ShadowConfig {
        &self.config
    }
    /// Each sequence's layout, as validated (the host copy).
    pub fn sequences(&self) -> &[ShadowSequence] {
        &self.sequences
    }
    /// Sequences in the batch.
    pub fn batch(&self) -> usize {
        self.sequences.len()
    }
    /// How far each buffer must reach for these layouts.
    pub fn extents(&self) -> &Extents {
        &self.extents
    }

    /// `[batch, Hkv, budget_chunks]` entries: selection and miss list.
    pub fn slot_entries(&self) -> usize {
        self.batch() * self.config.kv_heads * self.config.budget_chunks
    }

    /// (sequence, KV head) pairs: entries of the miss counts.
    pub fn heads(&self) -> usize {
        self.batch() * self.config.kv_heads
    }

    /// Checks a layer's resident ids (`[rows, Hkv, budget_chunks]`, `resident_len` entries)
    /// against the layouts: every sequence's `resident_row` is one of its rows, and no two
    /// sequences share one (a plan updates each sequence's row). The error names the first
    /// sequence that fails.
    pub fn check_resident(&self, resident_len: usize) -> Result<()> {
        let per_row = self.config.kv_heads * self.config.budget_chunks;
        let rows = resident_len / per_row.max(1);
        let past = (self.extents.resident_rows > rows)
            .then(|| {
                self.sequences
                    .iter()
                    .enumerate()
                    .find(|(_, s)| s.resident_row as usize >= rows)
            })
            .flatten();
        if let Some((b, s)) = past {
            return Err(invalid(
                "sequences",
                format!(
                    "sequence {b}: resident_row {} is past the {rows} rows of the resident ids ({resident_len} entries of {per_row} per row)",
                    s.resident_row
                ),
                "a resident_row below the rows of the layer's resident ids",
            ));
        }
        if let Some(b) = self.repeated_row {
            return Err(invalid(
                "sequences",
                format!(
                    "sequence {b}: resident_row {} is an earlier sequence's too",
                    self.sequences[b].resident_row
                ),
                "a distinct resident_row for each sequence of the batch",
            ));
        }
        Ok(())
    }

    /// Checks the miss list and counts that `plan` writes and `fetch` and `rebuild` read.
    pub(crate) fn check_misses(&self, misses: usize, miss_counts: usize) -> Result<()> {
        check_reach("misses", misses, self.slot_entries())?;
        check_reach("miss_counts", miss_counts, self.heads())
    }

    /// Landmarks per scoring block: shorter tiles for a small batch (see
    /// `scoring::MIN_BLOCKS`).
    pub fn scoring_tile_len(&self) -> NonZeroU32 {
        NonZeroU32::new(scoring_layout::tile_len(self.extents.landmark_rows))
            .unwrap_or(NonZeroU32::MIN)
    }

    /// Tiles of the scoring grid (`x`) for the sequence with the most landmarks.
    pub fn scoring_tiles(&self) -> u32 {
        scoring_layout::tiles(self.extents.max_landmarks, self.scoring_tile_len())
    }

    /// Every sequence of the batch.
    pub fn whole(&self) -> BatchPart {
        BatchPart {
            first: 0,
            count: self.batch(),
        }
    }

    /// Sequences `sequences` of the batch, for a launch that covers only them.
    pub fn part(&self, sequences: Range<usize>) -> Result<BatchPart> {
        if sequences.is_empty() || sequences.end > self.batch() {
            return Err(invalid(
                "sequences",
                format!("is {sequences:?}"),
                format!("a non-empty range within 0..{}", self.batch()),
            ));
        }
        Ok(BatchPart {
            first: sequences.start,
            count: sequences.len(),
        })
    }

    /// The kernels' view of the batch for a launch over `part` (which may come from another
    /// batch, so it is checked against this one), the batch's device copy held in `used`.
    pub(crate) fn shape_of<'a>(
        &'a self,
        used: &mut LaunchBuffers<'a>,
        part: BatchPart,
    ) -> Result<ShadowShape> {
        self.part(part.first..part.first + part.count)?;
        Ok(self.shape_at(used, part.first))
    }

    /// Device address of the batch's `[batch]` [`ShadowSequence`] copy, held in `used` (or
    /// the caller's copy, see [`read_layouts_from`](Self::read_layouts_from)).
    pub(crate) fn sequences_address<'a>(&'a self, used: &mut LaunchBuffers<'a>) -> u64 {
        match self.external {
            Some(address) => address,
            None => used.read(&self.device),
        }
    }

    /// With `Some(address)`, launches read the layouts from `address` (the caller's device
    /// copy, which it rewrites on the device between steps) and
    /// [`set_sequences`](Self::set_sequences) validates without uploading: a decode step
    /// replayed from a CUDA graph keeps the addresses it was captured with, so the per-step
    /// lengths must come from device memory. `None` goes back to the batch's own copy
    /// (re-uploaded at the next `set_sequences`).
    ///
    /// # Safety
    /// Until the next call, `address` must hold [`batch`](Self::batch) layouts, each as
    /// `validate` accepts for this config with the extents of the host copy (same offsets and
    /// capacities, `len` within the capacity), whenever a launch that reads them runs.
    pub unsafe fn read_layouts_from(&mut self, address: Option<u64>) {
        if address.is_none() && self.external.is_some() {
            self.stale = true;
        }
        self.external = address;
    }

    fn shape_at<'a>(&'a self, used: &mut LaunchBuffers<'a>, first_sequence: usize) -> ShadowShape {
        let c = &self.config;
        ShadowShape {
            sequences: self.sequences_address(used),
            batch: self.batch() as u32,
            kv_heads: c.kv_heads as u32,
            group: c.group() as u32,
            head_dim: c.head_dim as u32,
            chunk_size: c.chunk_size as u32,
            rank: c.rank as u32,
            budget_chunks: c.budget_chunks as u32,
            first_sequence: first_sequence as u32,
        }
    }
}

/// Sequences `first .. first + count` of a [`ShadowBatch`]: what one launch of `scoring`,
/// `topk`, `plan` or `fetch` covers (a step runs the batch in parts to overlap one part's
/// fetch with the next part's scoring). Made by [`ShadowBatch::whole`] and
/// [`ShadowBatch::part`], so it always lies within its batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BatchPart {
    first: usize,
    count: usize,
}

impl BatchPart {
    /// Index of the part's first sequence in its batch.
    pub fn first(&self) -> usize {
        self.first
    }
    /// Sequences in the part (at least 1).
    pub fn count(&self) -> usize {
        self.count
    }
}

/// The first sequence whose `resident_row` an earlier one has too, if any.
fn repeated_row(sequences: &[ShadowSequence]) -> Option<usize> {
    if sequences.len() < 2 {
        return None;
    }
    let mut rows: Vec<(u32, usize)> = sequences
        .iter()
        .enumerate()
        .map(|(b, s)| (s.resident_row, b))
        .collect();
    rows.sort_unstable();
    rows.windows(2)
        .filter(|pair| pair[0].0 == pair[1].0)
        .map(|pair| pair[1].1)
        .min()
}

/// Checks each layout against the config; returns how far every buffer must reach.
pub fn validate(config: &ShadowConfig, sequences: &[ShadowSequence]) -> Result<Extents> {
    config.validate()?;
    check_range("batch", sequences.len(), 1..=65_535)?;
    let (kv_heads, d) = (config.kv_heads as u128, config.head_dim as u128);
    let (c, k) = (config.chunk_size as u128, config.budget_chunks as u128);
    let mut extents = Extents::default();
    let fits = |sequence: usize, what: &str, end: u128| -> Result<usize> {
        usize::try_from(end).map_err(|_| {
            invalid(
                "sequences",
                format!("sequence {sequence}: its {what} end past the address space"),
                "layouts that fit in memory",
            )
        })
    };
    for (b, s) in sequences.iter().enumerate() {
        let bad = |problem: String, expected: &str| {
            Err(invalid(
                "sequences",
                format!("sequence {b}: {problem}"),
                expected,
            ))
        };
        if (s.landmarks as u128) < k {
            return bad(
                format!(
                    "has {} landmarks per head, fewer than the budget of {k} chunks",
                    s.landmarks
                ),
                "a sequence long enough for the sparse budget",
            );
        }
        if s.landmarks > s.chunks {
            return bad(
                format!("has {} landmarks but {} chunks", s.landmarks, s.chunks),
                "landmarks <= chunks",
            );
        }
        if s.chunks as u128 * c > s.prompt_len as u128 {
            return bad(
                format!(
                    "has {} chunks of {c} tokens but a prompt of {}",
                    s.chunks, s.prompt_len
                ),
                "chunks * chunk_size <= prompt_len",
            );
        }
        let kv = &s.kv;
        if kv.len == 0 || kv.len > kv.capacity {
            return bad(
                format!("K/V len {} with capacity {}", kv.len, kv.capacity),
                "1 <= len <= capacity",
            );
        }
        if s.sparse_start as u128 + k * c > kv.len as u128 {
            return bad(
                format!(
                    "sparse slots {}..{} past the K/V length {}",
                    s.sparse_start,
                    s.sparse_start as u128 + k * c,
                    kv.len
                ),
                "sparse_start + budget_chunks * chunk_size <= len",
            );
        }
        for (what, offset) in [
            ("kv.offset", kv.offset),
            ("a_offset", s.a_offset),
            ("bm_offset", s.bm_offset),
            ("host_value_offset", s.host_value_offset),
        ] {
            if offset % 8 != 0 {
                return bad(
                    format!("{what} is {offset}"),
                    "a multiple of 8 elements (16-byte rows)",
                );
            }
        }
        let landmark_end = s.landmark_row as u128 + kv_heads * s.landmarks as u128;
        // The rows' elements (rows times d) must be addressable too.
        fits(b, "landmarks", landmark_end * d)?;
        extents.landmark_rows = extents.landmark_rows.max(landmark_end as usize);
        let a_end = s.a_offset as u128 + s.prompt_len as u128 * config.rank as u128;
        extents.a = extents.a.max(fits(b, "A", a_end)?);
        let bm_end = s.bm_offset as u128 + config.rank as u128 * kv_heads * d;
        extents.bm = extents.bm.max(fits(b, "Bm", bm_end)?);
        let values_end = s.host_value_offset as u128 + kv_heads * s.prompt_len as u128 * d;
        extents.values = extents.values.max(fits(b, "values", values_end)?);
        let kv_end = kv.offset as u128 + kv_heads * kv.capacity as u128 * d;
        extents.kv = extents.kv.max(fits(b, "K/V block", kv_end)?);
        extents.max_landmarks = extents.max_landmarks.max(s.landmarks);
        extents.max_chunks = extents.max_chunks.max(s.chunks);
        extents.resident_rows = extents.resident_rows.max(s.resident_row as usize + 1);
    }
    Ok(extents)
}
