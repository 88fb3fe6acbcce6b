//! Sparse GQA decode attention: planning (CPU, validated) separated from execution (GPU).
//!
//! ```text
//! let plan = DecodeAttentionPlan::for_gpu(&gpu, shape, &layouts)?;
//! let mut attention = DecodeAttention::new(&gpu, plan)?;   // uploads layouts, workspace
//! attention.run(&gpu, gpu.stream(), &q, &k, &v, &mut out)?;
//! ```
use std::sync::Arc;

use cudarc::driver::{CudaSlice, CudaStream, DevicePtr, DevicePtrMut, LaunchConfig};
use half::bf16;
/// The layout math the kernels use (tokens per iteration, shared memory, split counts).
pub use shadowkv_kernels::attention as kernel_layout;
pub use shadowkv_kernels::attention::SequenceLayout;
use shadowkv_kernels::attention::{self as layout, DecodeAttentionParams, SlotFilter};

use crate::error::{check_len, check_range, invalid, Result};
use crate::gpu::{Gpu, LaunchBuffers};
use crate::ptx::{self, KernelName};

/// Heads and dimensions of one decode-attention call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DecodeAttentionShape {
    /// Sequences in the batch (1 to 65,535).
    pub batch: usize,
    /// Query heads (`Hq`), a multiple of `kv_heads`.
    pub q_heads: usize,
    /// KV heads (`Hkv`); the group `Hq / Hkv` is at most [`kernel_layout::MAX_GROUP`].
    pub kv_heads: usize,
    /// Dimension of one head (`d`), one of [`kernel_layout::HEAD_DIMS`].
    pub head_dim: usize,
}

impl DecodeAttentionShape {
    /// Query heads per KV head (`G`).
    pub fn group(&self) -> usize {
        self.q_heads / self.kv_heads.max(1)
    }

    /// The compiled group that runs this shape and the virtual KV heads per KV head (2 for
    /// a group past [`kernel_layout::MAX_KERNEL_GROUP`], see [`kernel_layout::kernel_group`]).
    pub fn kernel_group(&self) -> (u32, u32) {
        layout::kernel_group(self.group() as u32)
    }

    /// Elements of `q` and of the output: `[batch, q_heads, head_dim]`.
    pub fn q_elements(&self) -> usize {
        self.batch * self.q_heads * self.head_dim
    }

    /// Checks the shape: `batch` and `kv_heads` in 1..=65,535, `q_heads` a positive multiple
    /// of `kv_heads` with a group of at most [`kernel_layout::MAX_GROUP`] (one of
    /// [`kernel_layout::D256_GROUPS`] at head_dim 256), and `head_dim` one of
    /// [`kernel_layout::HEAD_DIMS`]. Errors with
    /// [`Error::InvalidArgument`](crate::Error::InvalidArgument) naming the first that fails.
    pub fn validate(&self) -> Result<()> {
        check_range("batch", self.batch, 1..=65_535)?;
        validate_heads(
            (self.q_heads, self.kv_heads, self.head_dim),
            layout::MAX_GROUP,
            &layout::HEAD_DIMS,
        )?;
        let group = self.group() as u32;
        if !layout::has_kernel(group, self.head_dim as u32) {
            let expected = if self.head_dim == 256 {
                format!(
                    "one of {:?} at head_dim 256 (the groups of the models with such heads)",
                    layout::D256_GROUPS
                )
            } else {
                format!(
                    "at most {} or {}",
                    layout::MAX_KERNEL_GROUP,
                    layout::MAX_GROUP
                )
            };
            return Err(invalid(
                "group (q_heads / kv_heads)",
                format!("is {group} at head_dim {}", self.head_dim),
                expected,
            ));
        }
        Ok(())
    }
}

/// A validated launch: split size, kernels and the layouts it was checked against.
#[derive(Clone, Debug)]
pub struct DecodeAttentionPlan {
    shape: DecodeAttentionShape,
    layouts: Vec<SequenceLayout>,
    split_len: u32,
    max_splits: u32,
    kv_elements: usize,
    scale: f32,
    /// Sliding window of [`DecodeAttention::run`] (0: none) and the splits of the longest
    /// window (`max_splits` without one).
    window: u32,
    window_splits: u32,
    /// The plain kernel, then the two parts of a ShadowKV step (resident, fresh).
    kernel: KernelName,
    part_kernels: [KernelName; 2],
}

/// Shortest split: below this the partial-output traffic outweighs the extra parallelism
/// (64 took the H100's sparse attention at batch 1 x 2.5K tokens from 13.0 to 14.5-15.1 µs:
/// 320 blocks against 160).
const MIN_SPLIT_LEN: u32 = 128;

impl DecodeAttentionPlan {
    /// [`new`](Self::new) with the blocks that `gpu` runs of this shape's kernel at once.
    pub fn for_gpu(
        gpu: &Gpu,
        shape: DecodeAttentionShape,
        layouts: &[SequenceLayout],
    ) -> Result<Self> {
        shape.validate()?;
        let ((group, _), head_dim) = (shape.kernel_group(), shape.head_dim as u32);
        let resident_blocks = gpu.resident_blocks(
            ptx::decode_attention(group, head_dim)?,
            layout::THREADS,
            layout::shared_bytes(group, head_dim),
        )?;
        Self::new(shape, layouts, resident_blocks)
    }

    /// Validates the shape and layouts and splits the work into about `resident_blocks`
    /// equal blocks: the blocks of the kernel the GPU runs at once ([`Gpu::resident_blocks`]),
    /// so that one wave covers the batch with no tail (flash-decoding: one long sequence
    /// fills the GPU). On the H100 at batch 16 x 2,560 tokens, 3 splits (one wave of 384
    /// blocks at 3 per SM) reach 81.7% of copy bandwidth where 2 reach 76.3%
    /// (`docs/logs/attention-bench-h100.log`, split-length sweep).
    pub fn new(
        shape: DecodeAttentionShape,
        layouts: &[SequenceLayout],
        resident_blocks: u32,
    ) -> Result<Self> {
        // The shape first: the split step below depends on a valid group and head_dim.
        shape.validate()?;
        let ((group, kv_head_split), head_dim) = (shape.kernel_group(), shape.head_dim as u32);
        let token_heads: usize = layouts
            .iter()
            .map(|l| l.len as usize * shape.kv_heads * kv_head_split as usize)
            .sum();
        let target_blocks = resident_blocks.max(1) as usize;
        let step = layout::tokens_per_iteration(group, head_dim);
        let even_share = (token_heads.div_ceil(target_blocks) as u32).max(MIN_SPLIT_LEN);
        // The longest sequence sets the critical path: keep its number of splits but make
        // them equal (2528 tokens in splits of 1216 would leave a 96-token third split while
        // two blocks do 1216 each; three of 864 finish sooner).
        let longest = layouts.iter().map(|l| l.len).max().unwrap_or(1).max(1);
        // Nearest, not next, count: a few more tokens per block cost less than a block more
        // per row (b4 x 8K: 8 splits of 1024 beat 9 of 928).
        let splits = ((longest + even_share / 2) / even_share).clamp(1, layout::MAX_SPLITS);
        let split_len = longest
            .div_ceil(splits)
            .max(MIN_SPLIT_LEN)
            .next_multiple_of(step);
        Self::with_split_len(shape, layouts, split_len)
    }

    /// As [`new`](Self::new) with a chosen split length (a positive multiple of the kernel's
    /// tokens per iteration); tests use it to force many splits.
    pub fn with_split_len(
        shape: DecodeAttentionShape,
        layouts: &[SequenceLayout],
        split_len: u32,
    ) -> Result<Self> {
        shape.validate()?;
        let ((group, _), head_dim) = (shape.kernel_group(), shape.head_dim as u32);
        let kv_elements = validate_layouts(&shape, layouts)?;
        let step = layout::tokens_per_iteration(group, head_dim);
        let Some(split) =
            std::num::NonZeroU32::new(split_len).filter(|_| split_len.is_multiple_of(step))
        else {
            return Err(invalid(
                "split_len",
                format!("is {split_len}"),
                format!("a positive multiple of {step}"),
            ));
        };
        let max_splits = layouts
            .iter()
            .map(|l| layout::num_splits(l.len, split))
            .max()
            .unwrap_or(1);
        if max_splits > layout::MAX_SPLITS {
            let longest = layouts.iter().map(|l| l.len).max().unwrap_or(1);
            return Err(invalid(
                "split_len",
                format!("is {split_len}: {max_splits} splits of a {longest}-token sequence"),
                format!(
                    "at most {} splits per sequence (a split_len of at least {})",
                    layout::MAX_SPLITS,
                    layout::shortest_split_len(longest, group, head_dim)
                ),
            ));
        }
        Ok(DecodeAttentionPlan {
            shape,
            layouts: layouts.to_vec(),
            split_len,
            max_splits,
            kv_elements,
            scale: 1.0 / (shape.head_dim as f32).sqrt(),
            window: 0,
            window_splits: max_splits,
            kernel: ptx::decode_attention(group, head_dim)?,
            part_kernels: [
                ptx::decode_attention_resident(group, head_dim)?,
                ptx::decode_attention_fresh(group, head_dim)?,
            ],
        })
    }

    /// Replaces the softmax scale (default `1/sqrt(head_dim)`).
    pub fn with_scale(mut self, scale: f32) -> Result<Self> {
        if !scale.is_finite() || scale <= 0.0 {
            return Err(invalid(
                "scale",
                format!("is {scale}"),
                "a finite positive number",
            ));
        }
        self.scale = scale;
        Ok(self)
    }

    /// Sets a sliding window (Gemma's local layers; 0 for none): in [`DecodeAttention::run`]
    /// each sequence's query, the token at position `len - 1`, attends only to the keys at
    /// positions `> len - 1 - window` (its last `window` rows, the row being the position).
    /// The grid then covers only the window's splits. A ShadowKV step's parts ignore it.
    pub fn with_window(mut self, window: u32) -> Self {
        self.window = window;
        if let Some(split) = std::num::NonZeroU32::new(self.split_len) {
            self.window_splits = self
                .layouts
                .iter()
                .map(|l| layout::num_splits(self.windowed_len(l), split))
                .max()
                .unwrap_or(1);
        }
        self
    }

    /// The sliding window (0: none).
    pub fn window(&self) -> u32 {
        self.window
    }

    /// Tokens the plain kernel reads of a sequence: its length, or the window if shorter.
    fn windowed_len(&self, l: &SequenceLayout) -> u32 {
        match self.window {
            0 => l.len,
            window => l.len.min(window),
        }
    }

    /// The shape the plan was validated for.
    pub fn shape(&self) -> DecodeAttentionShape {
        self.shape
    }
    /// Each sequence's K/V layout, as validated.
    pub fn layouts(&self) -> &[SequenceLayout] {
        &self.layouts
    }
    /// Tokens per split: one block covers this many of one sequence's tokens for one KV head
    /// (a multiple of the kernel's tokens per iteration).
    pub fn split_len(&self) -> u32 {
        self.split_len
    }
    /// Most splits of one sequence (those of the longest): the grid's `x` dimension.
    pub fn max_splits(&self) -> u32 {
        self.max_splits
    }
    /// The softmax scale: `1/sqrt(head_dim)` unless [`with_scale`](Self::with_scale) replaced
    /// it.
    pub fn scale(&self) -> f32 {
        self.scale
    }
    /// Elements the K and V buffers must hold at least.
    pub fn kv_elements(&self) -> usize {
        self.kv_elements
    }
    /// Bytes of K and V the kernel reads (the memory-bound floor of the step).
    pub fn kv_bytes_read(&self) -> usize {
        let tokens: usize = self
            .layouts
            .iter()
            .map(|l| self.windowed_len(l) as usize)
            .sum();
        2 * tokens * self.shape.kv_heads * self.shape.head_dim * std::mem::size_of::<bf16>()
    }
}

/// Checks the heads of an attention launch: `q_heads` a positive multiple of `kv_heads`, the
/// group at most `max_group`, and a compiled `head_dim`.
pub(crate) fn validate_heads(
    (q_heads, kv_heads, head_dim): (usize, usize, usize),
    max_group: u32,
    head_dims: &[u32],
) -> Result<()> {
    check_range("kv_heads", kv_heads, 1..=65_535)?;
    if q_heads == 0 || !q_heads.is_multiple_of(kv_heads) {
        return Err(invalid(
            "q_heads",
            format!("is {q_heads} with {kv_heads} KV heads"),
            "a positive multiple of kv_heads",
        ));
    }
    check_range(
        "group (q_heads / kv_heads)",
        q_heads / kv_heads,
        1..=max_group as usize,
    )?;
    if !head_dims.contains(&(head_dim as u32)) {
        return Err(invalid(
            "head_dim",
            format!("is {head_dim}"),
            format!("one of {head_dims:?}"),
        ));
    }
    Ok(())
}

/// The end (in elements) of sequence `sequence`'s K/V block `[kv_heads, capacity, head_dim]`,
/// after checking that it starts on a 16-byte row and fits in the address space.
pub(crate) fn block_end(
    sequence: usize,
    l: &SequenceLayout,
    kv_heads: usize,
    head_dim: usize,
) -> Result<usize> {
    if !l.offset.is_multiple_of(u64::from(layout::VECTOR)) {
        return Err(invalid(
            "layouts",
            format!("sequence {sequence} starts at element {}", l.offset),
            format!(
                "an offset that is a multiple of {} (16-byte rows)",
                layout::VECTOR
            ),
        ));
    }
    let end = (l.offset as u128) + (kv_heads as u128) * (l.capacity as u128) * (head_dim as u128);
    usize::try_from(end).map_err(|_| {
        invalid(
            "layouts",
            format!("sequence {sequence} ends past the address space"),
            "a block that fits in memory",
        )
    })
}

/// Checks every layout against the shape; returns the elements the K/V buffers must hold.
fn validate_layouts(shape: &DecodeAttentionShape, layouts: &[SequenceLayout]) -> Result<usize> {
    if layouts.len() != shape.batch {
        return Err(invalid(
            "layouts",
            format!("has {} entries", layouts.len()),
            format!("one per sequence ({})", shape.batch),
        ));
    }
    let mut kv_elements = 0usize;
    for (sequence, l) in layouts.iter().enumerate() {
        if l.len == 0 || l.len > l.capacity {
            return Err(invalid(
                "layouts",
                format!(
                    "sequence {sequence} has len {} and capacity {}",
                    l.len, l.capacity
                ),
                "1 <= len <= capacity",
            ));
        }
        kv_elements = kv_elements.max(block_end(sequence, l, shape.kv_heads, shape.head_dim)?);
    }
    Ok(kv_elements)
}

/// The two attention launches of a ShadowKV step (see `kernel_layout::SlotFilter`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StepPart {
    /// Every token but the slots filled this step, into the carry (while the fetch runs).
    Resident,
    /// Only this step's misses' tokens (through the miss list), merged with the carry into
    /// `out`.
    Fresh,
}

/// Where a ShadowKV batch's slots are, for [`DecodeAttention::launch`]: device addresses,
/// taken through a [`LaunchBuffers`] that the caller keeps until the launch is queued.
#[derive(Clone, Copy, Debug)]
pub(crate) struct SlotMarks {
    /// The batch's `[batch]` `ShadowSequence`.
    pub sequences: u64,
    /// The plan's `[batch, Hkv, budget_chunks]` fresh marks, miss list and `[batch, Hkv]`
    /// miss counts.
    pub fresh: u64,
    pub misses: u64,
    pub miss_counts: u64,
    pub chunk_size: u32,
    pub budget_chunks: u32,
}

/// Kernel iterations per split of the fresh part: its tokens are few (this step's misses), so
/// short splits spread them over many blocks.
const FRESH_SPLIT_ITERATIONS: u32 = 4;

/// A plan bound to a GPU: the device copy of its layouts and the split workspace.
pub struct DecodeAttention {
    plan: DecodeAttentionPlan,
    /// Splits per sequence the workspace holds (the first plan's `max_splits`, or more for
    /// the fresh part).
    workspace_splits: u32,
    layouts: CudaSlice<u64>,
    partial_out: CudaSlice<f32>,
    partial_lse: CudaSlice<f32>,
    counters: CudaSlice<u32>,
    /// The resident part's output and log-sum-exp, for [`StepPart::Fresh`] to merge.
    carry_out: CudaSlice<f32>,
    carry_lse: CudaSlice<f32>,
    /// Where launches read the layouts instead of `layouts`, while set (see
    /// [`read_layouts_from`](Self::read_layouts_from)).
    external: Option<u64>,
    /// `layouts` missed an update while `external` was set.
    stale: bool,
}

/// Partial outputs and log-sum-exps for `splits` splits per sequence (none for one split).
fn partials(
    stream: &Arc<CudaStream>,
    shape: &DecodeAttentionShape,
    splits: u32,
) -> Result<(CudaSlice<f32>, CudaSlice<f32>)> {
    let splits = if splits > 1 { splits as usize } else { 0 };
    let partials = shape.batch * splits * shape.q_heads;
    // SAFETY (both): the split kernel writes every partial before the merging block reads it.
    unsafe {
        Ok((
            stream.alloc::<f32>((partials * shape.head_dim).max(1))?,
            stream.alloc::<f32>(partials.max(1))?,
        ))
    }
}

impl DecodeAttention {
    /// Binds `plan` to `gpu`: uploads its layouts and allocates, on the GPU's stream, the split
    /// workspace (partial outputs and log-sum-exps), the merge counters and the carry of a
    /// split ShadowKV step. Errors if an upload or allocation fails.
    pub fn new(gpu: &Gpu, plan: DecodeAttentionPlan) -> Result<Self> {
        let stream = gpu.stream();
        let layouts =
            stream.clone_htod(bytemuck::cast_slice::<SequenceLayout, u64>(&plan.layouts))?;
        let (partial_out, partial_lse) = partials(stream, &plan.shape, plan.max_splits)?;
        // Zeroed once; the merging block of each (sequence, kv_head) resets its counter.
        let virtual_heads = plan.shape.kv_heads * plan.shape.kernel_group().1 as usize;
        let counters = stream.alloc_zeros::<u32>(plan.shape.batch * virtual_heads)?;
        let heads = plan.shape.batch * plan.shape.q_heads;
        // SAFETY: the carry is written by the resident part before the fresh part reads it.
        let carry_out = unsafe { stream.alloc::<f32>(heads * plan.shape.head_dim)? };
        // SAFETY: as above.
        let carry_lse = unsafe { stream.alloc::<f32>(heads)? };
        Ok(DecodeAttention {
            workspace_splits: plan.max_splits,
            plan,
            layouts,
            partial_out,
            partial_lse,
            counters,
            carry_out,
            carry_lse,
            external: None,
            stale: false,
        })
    }

    /// The plan the launches follow (the latest, after [`update_layouts`](Self::update_layouts)).
    pub fn plan(&self) -> &DecodeAttentionPlan {
        &self.plan
    }

    /// Replaces the layouts (same batch size; lengths grow as tokens are generated), keeping
    /// the split length and scale. Uploads them on `stream` only if they changed. Plan the
    /// first call with the largest lengths (each layout's capacity, say) so the split
    /// workspace holds every later split count.
    pub fn update_layouts(
        &mut self,
        stream: &Arc<CudaStream>,
        layouts: &[SequenceLayout],
    ) -> Result<()> {
        let upload = self.external.is_none();
        if layouts == self.plan.layouts.as_slice() && !(upload && self.stale) {
            return Ok(());
        }
        let plan =
            DecodeAttentionPlan::with_split_len(self.plan.shape, layouts, self.plan.split_len)?
                .with_scale(self.plan.scale)?
                .with_window(self.plan.window);
        if plan.max_splits > 1 && plan.max_splits > self.workspace_splits {
            return Err(invalid(
                "layouts",
                format!(
                    "need {} splits of {} tokens",
                    plan.max_splits, plan.split_len
                ),
                format!(
                    "at most {} (the workspace of the first plan; make a new DecodeAttention)",
                    self.workspace_splits.max(1)
                ),
            ));
        }
        if upload {
            stream.memcpy_htod(
                bytemuck::cast_slice::<SequenceLayout, u64>(layouts),
                &mut self.layouts,
            )?;
        }
        self.stale = !upload;
        self.plan = plan;
        Ok(())
    }

    /// With `Some(address)`, launches read the layouts from `address` (the caller's device
    /// copy, rewritten on the device between steps), [`update_layouts`](Self::update_layouts)
    /// validates without uploading, and every launch covers the splits of the workspace (the
    /// first plan's, at the capacities) whatever the current lengths: a launch replayed from
    /// a CUDA graph keeps the grid and addresses it was captured with, and the kernel's blocks
    /// past a sequence's splits return at once. `None` goes back to the plan's own copy
    /// (re-uploaded at the next `update_layouts`).
    ///
    /// # Safety
    /// Until the next call, `address` must hold the plan's `batch` layouts, each with the
    /// offset and capacity of the latest plan's and a `len` in `1..=capacity` that needs at
    /// most the workspace's splits, whenever a launch that reads them runs.
    pub unsafe fn read_layouts_from(&mut self, address: Option<u64>) {
        if address.is_none() && self.external.is_some() {
            self.stale = true;
        }
        self.external = address;
    }

    /// Splits per sequence the workspace holds: the grid of a launch reading layouts from the
    /// caller's copy (see [`read_layouts_from`](Self::read_layouts_from)).
    pub fn workspace_splits(&self) -> u32 {
        self.workspace_splits.max(1)
    }

    /// The grid's splits of a launch over every token: the plan's, or the workspace's while
    /// the layouts come from the caller's copy (their lengths are not known here).
    fn whole_splits(&self) -> u32 {
        match self.external {
            Some(_) => self.workspace_splits().max(self.plan.max_splits),
            None => self.plan.max_splits,
        }
    }

    /// `out[b, h] = softmax(q[b, h] · Kᵀ · scale) · V` over each sequence's valid tokens, with
    /// `q` and `out` `[batch, q_heads, head_dim]` and K/V laid out as the plan's layouts say.
    pub fn run(
        &mut self,
        gpu: &Gpu,
        stream: &CudaStream,
        q: &impl DevicePtr<bf16>,
        k: &impl DevicePtr<bf16>,
        v: &impl DevicePtr<bf16>,
        out: &mut impl DevicePtrMut<bf16>,
    ) -> Result<()> {
        self.launch(gpu, stream, q, k, v, out, None)
    }

    /// [`run`](Self::run), or with `filter` one of the two launches of a ShadowKV step:
    /// [`StepPart::Resident`] first, then [`StepPart::Fresh`] on the same stream, with the same
    /// `q`, K/V and `out`. The [`SlotMarks`] must describe the batch these layouts came from:
    /// every sequence's slots lie within its valid tokens, and the marks and miss list hold
    /// `[batch, kv_heads, budget_chunks]` entries (`DecodeStep` checks both through its
    /// `ShadowBatch` and workspace).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn launch(
        &mut self,
        gpu: &Gpu,
        stream: &CudaStream,
        q: &impl DevicePtr<bf16>,
        k: &impl DevicePtr<bf16>,
        v: &impl DevicePtr<bf16>,
        out: &mut impl DevicePtrMut<bf16>,
        filter: Option<(StepPart, SlotMarks)>,
    ) -> Result<()> {
        let plan = &self.plan;
        let shape = plan.shape;
        let dims = format!("[{}, {}, {}]", shape.batch, shape.q_heads, shape.head_dim);
        check_len("q", q.len(), shape.q_elements(), &dims)?;
        check_len("out", out.len(), shape.q_elements(), &dims)?;
        for (argument, buffer) in [("k", k.len()), ("v", v.len())] {
            if buffer < plan.kv_elements {
                return Err(invalid(
                    argument,
                    format!("has {buffer} elements"),
                    format!("at least {} for the plan's layouts", plan.kv_elements),
                ));
            }
        }
        let ((group, kv_head_split), head_dim) = (shape.kernel_group(), shape.head_dim as u32);
        let virtual_heads = shape.kv_heads as u32 * kv_head_split;
        // This launch's kernel, split length and grid of splits.
        let (kernel, split_len, splits) = match filter {
            None if self.external.is_none() => (plan.kernel, plan.split_len, plan.window_splits),
            None => (plan.kernel, plan.split_len, self.whole_splits()),
            Some((StepPart::Resident, _)) => {
                (plan.part_kernels[0], plan.split_len, self.whole_splits())
            }
            Some((StepPart::Fresh, slots)) => {
                let step = layout::tokens_per_iteration(group, head_dim);
                let slot_tokens = slots.budget_chunks * slots.chunk_size;
                // Short splits, but no more than the merge holds.
                let split_len = (FRESH_SPLIT_ITERATIONS * step).max(layout::shortest_split_len(
                    slot_tokens,
                    group,
                    head_dim,
                ));
                // Iterations hold at least one token, so the fallback is never taken.
                let split =
                    std::num::NonZeroU32::new(split_len).unwrap_or(std::num::NonZeroU32::MIN);
                (
                    plan.part_kernels[1],
                    split_len,
                    layout::num_splits(slot_tokens, split).max(1),
                )
            }
        };
        if splits > 1 && splits > self.workspace_splits {
            (self.partial_out, self.partial_lse) = partials(gpu.stream(), &shape, splits)?;
            self.workspace_splits = splits;
        }
        let mut used = LaunchBuffers::new(stream);
        let filter = match filter {
            None => SlotFilter::default(),
            Some((_, slots)) => SlotFilter {
                sequences: slots.sequences,
                fresh: slots.fresh,
                misses: slots.misses,
                miss_counts: slots.miss_counts,
                carry_out: used.write(&mut self.carry_out),
                carry_lse: used.write(&mut self.carry_lse),
                chunk_size: slots.chunk_size,
                budget_chunks: slots.budget_chunks,
            },
        };
        let params = DecodeAttentionParams {
            q: used.read(q),
            k: used.read(k),
            v: used.read(v),
            layouts: match self.external {
                Some(address) => address,
                None => used.read(&self.layouts),
            },
            out: used.write(out),
            partial_out: used.write(&mut self.partial_out),
            partial_lse: used.write(&mut self.partial_lse),
            counters: used.write(&mut self.counters),
            batch: shape.batch as u32,
            kv_heads: virtual_heads,
            split_len,
            max_splits: splits,
            scale_log2: plan.scale * std::f32::consts::LOG2_E,
            q_heads: shape.q_heads as u32,
            window: plan.window,
            kv_head_split,
            filter,
        };
        let config = LaunchConfig {
            grid_dim: (splits, virtual_heads, shape.batch as u32),
            block_dim: (layout::THREADS, 1, 1),
            shared_mem_bytes: layout::shared_bytes(group, head_dim),
        };
        // SAFETY: q/out lengths equal the shape, K/V hold every layout's block (checked
        // above and in the plan), the workspace holds batch * splits * q_heads partials (grown
        // above) and batch * kv_heads zeroed counters, and the kernel is the one compiled for
        // this group and head_dim; a filtered launch's slots lie within the layouts, its marks
        // and miss list cover the batch with at most `budget_chunks` misses per head (the
        // caller's contract, see `launch`), so the fresh part's splits fit its grid.
        unsafe { gpu.launch(stream, kernel, config, params) }
    }
}
