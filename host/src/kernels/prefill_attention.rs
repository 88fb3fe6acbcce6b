//! Causal GQA prefill attention over a ragged batch (see `shadowkv_kernels::prefill_attention`):
//! planning (CPU, validated) separated from execution (GPU).
//!
//! A model driver writes a chunk of prompt keys/values into each sequence's KV cache, then:
//!
//! ```text
//! let queries = [QueryPlacement { query_offset: 0, query_len: 512, start: 1024 }];
//! let layouts = [SequenceLayout { offset: 0, capacity: 8192, len: 1536 }];
//! let plan = PrefillAttentionPlan::new(shape, &layouts, &queries)?;   // CPU, validated
//! let mut attention = PrefillAttention::new(&gpu, plan)?;             // uploads the tables
//! attention.run(&gpu, gpu.stream(), &q, &k, &v, &mut out)?;
//! attention.update(gpu.stream(), next_plan)?;                         // the next chunk
//! ```
use std::sync::Arc;

use cudarc::driver::{CudaSlice, CudaStream, DevicePtr, DevicePtrMut, LaunchConfig};
use half::bf16;
/// The layout math the kernel uses (rows per block, key tiles, shared memory).
pub use shadowkv_kernels::prefill_attention as kernel_layout;
pub use shadowkv_kernels::prefill_attention::QueryPlacement;
use shadowkv_kernels::prefill_attention::{self as layout, PrefillAttentionParams, PrefillTile};

use crate::error::{check_len, check_range, invalid, Error, Result};
use crate::gpu::Gpu;
pub use crate::kernels::attention::SequenceLayout;
use crate::kernels::attention::{block_end, validate_heads};
use crate::ptx::{self, KernelName};

/// Heads and dimensions of one prefill-attention call; `tokens` rows of `q` and `out`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PrefillAttentionShape {
    /// Query rows of `q` and `out` (`[tokens, q_heads, head_dim]`) over the whole batch; at
    /// least 1.
    pub tokens: usize,
    /// Query heads (`Hq`), a multiple of `kv_heads`.
    pub q_heads: usize,
    /// KV heads (`Hkv`); the group `Hq / Hkv` is at most [`kernel_layout::MAX_GROUP`].
    pub kv_heads: usize,
    /// Dimension of one head (`d`), one of [`kernel_layout::HEAD_DIMS`].
    pub head_dim: usize,
}

impl PrefillAttentionShape {
    /// Query heads per KV head (`G`).
    pub fn group(&self) -> usize {
        self.q_heads / self.kv_heads.max(1)
    }

    /// Elements of `q` and of the output: `[tokens, q_heads, head_dim]`.
    pub fn q_elements(&self) -> usize {
        self.tokens * self.q_heads * self.head_dim
    }

    /// Checks the shape: `tokens` in 1..=`u32::MAX`, `kv_heads` in 1..=65,535, `q_heads` a
    /// positive multiple of `kv_heads` with a group of at most [`kernel_layout::MAX_GROUP`], and
    /// `head_dim` one of [`kernel_layout::HEAD_DIMS`]. Errors with
    /// [`Error::InvalidArgument`] naming the first that fails.
    pub fn validate(&self) -> Result<()> {
        check_range("tokens", self.tokens, 1..=u32::MAX as usize)?;
        validate_heads(
            (self.q_heads, self.kv_heads, self.head_dim),
            layout::MAX_GROUP,
            &layout::HEAD_DIMS,
        )
    }
}

/// A validated launch: the layouts and query placements it was checked against, and the
/// block table (heaviest tiles first).
#[derive(Clone, Debug)]
pub struct PrefillAttentionPlan {
    shape: PrefillAttentionShape,
    layouts: Vec<SequenceLayout>,
    queries: Vec<QueryPlacement>,
    tiles: Vec<PrefillTile>,
    kv_elements: usize,
    scale: f32,
    /// Sliding window (0: none), see [`with_window`](Self::with_window).
    window: u32,
    warps: u32,
    split_p: bool,
    kernel: KernelName,
}

impl PrefillAttentionPlan {
    /// Validates the shape, one [`SequenceLayout`] and one [`QueryPlacement`] per sequence,
    /// and builds the block table. Every sequence's queries must lie in `q`'s rows, not
    /// overlap another sequence's, and find their keys in the cache
    /// (`start + query_len <= len`). A sequence with `query_len == 0` is skipped.
    pub fn new(
        shape: PrefillAttentionShape,
        layouts: &[SequenceLayout],
        queries: &[QueryPlacement],
    ) -> Result<Self> {
        shape.validate()?;
        let kv_elements = validate_layouts(&shape, layouts)?;
        validate_queries(&shape, layouts, queries)?;
        let warps = layout::warps(shape.head_dim as u32);
        let split_p = layout::DEFAULT_SPLIT_P;
        let (tiles, kernel) = block_table(&shape, queries, warps, split_p)?;
        Ok(PrefillAttentionPlan {
            shape,
            layouts: layouts.to_vec(),
            queries: queries.to_vec(),
            tiles,
            kv_elements,
            scale: 1.0 / (shape.head_dim as f32).sqrt(),
            window: 0,
            warps,
            split_p,
            kernel,
        })
    }

    /// Runs the kernel compiled with `warps` warps per block (16 query rows each), one of
    /// [`kernel_layout::WARP_COUNTS`], instead of the default for the head dimension
    /// ([`kernel_layout::warps`], the faster one on the H100); benches use it to compare.
    pub fn with_warps(mut self, warps: u32) -> Result<Self> {
        if !layout::WARP_COUNTS.contains(&warps) {
            return Err(invalid(
                "warps",
                format!("is {warps}"),
                format!("one of {:?}", layout::WARP_COUNTS),
            ));
        }
        let default_warps = layout::warps(self.shape.head_dim as u32);
        if self.shape.head_dim > 128 && warps != default_warps {
            return Err(invalid(
                "warps",
                format!("is {warps} at head_dim {}", self.shape.head_dim),
                format!("{default_warps} (the only count compiled for heads past 128)"),
            ));
        }
        (self.tiles, self.kernel) = block_table(&self.shape, &self.queries, warps, self.split_p)?;
        self.warps = warps;
        Ok(self)
    }

    /// Chooses how `O += P·V` takes the softmax weights P: `true` (the default,
    /// [`kernel_layout::DEFAULT_SPLIT_P`]) as two bf16 halves `P_hi + P_lo` with an mma each,
    /// P exact to about 2^-17 relative; `false` as P rounded once to bf16 (2^-9 relative, one
    /// mma: about 20% faster, but its worst rows carry 1.5-1.8x the error of the bf16 output's
    /// own rounding on attention-sink inputs, and a model's logits drift about twice as far).
    pub fn with_split_p(mut self, split_p: bool) -> Result<Self> {
        self.kernel = prefill_kernel(self.shape.head_dim as u32, self.warps, split_p)?;
        self.split_p = split_p;
        Ok(self)
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

    /// Sets a sliding window (Gemma's local layers; 0 for none): the query at position `pos`
    /// attends only to the keys at positions `pos - window < key <= pos`.
    pub fn with_window(mut self, window: u32) -> Self {
        self.window = window;
        self
    }

    /// The sliding window (0: none).
    pub fn window(&self) -> u32 {
        self.window
    }

    /// The shape the plan was validated for.
    pub fn shape(&self) -> PrefillAttentionShape {
        self.shape
    }
    /// Each sequence's K/V layout, as validated.
    pub fn layouts(&self) -> &[SequenceLayout] {
        &self.layouts
    }
    /// Each sequence's query placement, as validated.
    pub fn queries(&self) -> &[QueryPlacement] {
        &self.queries
    }
    /// The softmax scale: `1/sqrt(head_dim)` unless [`with_scale`](Self::with_scale) replaced
    /// it.
    pub fn scale(&self) -> f32 {
        self.scale
    }
    /// Warps per block (16 query rows each).
    pub fn warps(&self) -> u32 {
        self.warps
    }
    /// Whether `P·V` takes P as two bf16 halves ([`with_split_p`](Self::with_split_p)).
    pub fn split_p(&self) -> bool {
        self.split_p
    }
    /// Blocks of [`kernel_layout::block_rows`] rows per KV head.
    pub fn tiles(&self) -> usize {
        self.tiles.len()
    }
    /// Elements the K and V buffers must hold at least.
    pub fn kv_elements(&self) -> usize {
        self.kv_elements
    }
    /// Multiply-adds counted as two FLOPs over the (query, key) pairs the causal mask keeps:
    /// `4 * head_dim * q_heads` per pair (`Q·Kᵀ` and `P·V`).
    pub fn causal_flops(&self) -> f64 {
        let pairs: f64 = self
            .queries
            .iter()
            .map(|p| {
                let (start, len) = (p.start as f64, p.query_len as f64);
                len * start + len * (len + 1.0) / 2.0
            })
            .sum();
        4.0 * (self.shape.head_dim * self.shape.q_heads) as f64 * pairs
    }
}

/// The compiled kernel for a head dimension, a warp count and a P precision: the entries
/// `layout::kernel_name_for` names (`prefill_attention[_bf16p][_w<warps>]_d<head_dim>`,
/// `_w` only off the default warp count), as generated constants.
fn prefill_kernel(head_dim: u32, warps: u32, split_p: bool) -> Result<KernelName> {
    let default_warps = warps == layout::warps(head_dim);
    match (split_p, default_warps, warps) {
        (true, true, _) => ptx::prefill_attention(head_dim),
        (false, true, _) => ptx::prefill_attention_bf16p(head_dim),
        (true, false, 4) => ptx::prefill_attention_w4(head_dim),
        (true, false, 8) => ptx::prefill_attention_w8(head_dim),
        (false, false, 4) => ptx::prefill_attention_bf16p_w4(head_dim),
        (false, false, 8) => ptx::prefill_attention_bf16p_w8(head_dim),
        _ => Err(Error::MissingKernel {
            name: layout::kernel_name_for(head_dim, warps, split_p),
            reason: format!("no kernel has {warps} warps"),
        }),
    }
}

/// The block table of validated placements for blocks of `warps` warps, heaviest tiles
/// first, and the kernel compiled for them (with P split or not).
fn block_table(
    shape: &PrefillAttentionShape,
    queries: &[QueryPlacement],
    warps: u32,
    split_p: bool,
) -> Result<(Vec<PrefillTile>, KernelName)> {
    let (group, head_dim) = (shape.group() as u32, shape.head_dim as u32);
    let block_rows = layout::block_rows(warps);
    let mut tiles = Vec::new();
    for (sequence, placement) in queries.iter().enumerate() {
        let rows = layout::rows(placement.query_len, group);
        let mut row_start = 0u64;
        while row_start < rows {
            tiles.push(PrefillTile {
                sequence: sequence as u32,
                row_start: row_start as u32,
            });
            row_start += u64::from(block_rows);
        }
    }
    // Longest causal rows first: the short tiles fill the tail of the grid.
    let work = |tile: &PrefillTile| {
        layout::key_tiles(
            &queries[tile.sequence as usize],
            group,
            tile.row_start,
            block_rows,
        )
    };
    tiles.sort_by_key(|tile| std::cmp::Reverse(work(tile)));
    let blocks = tiles.len() as u64 * shape.kv_heads as u64;
    if blocks > i32::MAX as u64 {
        return Err(invalid(
            "queries",
            format!("need {blocks} blocks"),
            format!("at most {} (fewer tokens per call)", i32::MAX),
        ));
    }
    let kernel = prefill_kernel(head_dim, warps, split_p)?;
    Ok((tiles, kernel))
}

/// Largest K/V capacity per sequence (the kernel's key indices stay in 32 bits).
const MAX_CAPACITY: u32 = 1 << 31;

/// Checks every layout against the shape; returns the elements the K/V buffers must hold.
fn validate_layouts(shape: &PrefillAttentionShape, layouts: &[SequenceLayout]) -> Result<usize> {
    if layouts.is_empty() || layouts.len() > u32::MAX as usize {
        return Err(invalid(
            "layouts",
            format!("has {} entries", layouts.len()),
            "one per sequence, at least one",
        ));
    }
    let mut kv_elements = 0usize;
    for (sequence, l) in layouts.iter().enumerate() {
        if l.len > l.capacity || l.capacity > MAX_CAPACITY {
            return Err(invalid(
                "layouts",
                format!(
                    "sequence {sequence} has len {} and capacity {}",
                    l.len, l.capacity
                ),
                format!("len <= capacity <= {MAX_CAPACITY}"),
            ));
        }
        kv_elements = kv_elements.max(block_end(sequence, l, shape.kv_heads, shape.head_dim)?);
    }
    Ok(kv_elements)
}

/// Checks every query placement: inside `q`, disjoint, its keys in the cache.
fn validate_queries(
    shape: &PrefillAttentionShape,
    layouts: &[SequenceLayout],
    queries: &[QueryPlacement],
) -> Result<()> {
    if queries.len() != layouts.len() {
        return Err(invalid(
            "queries",
            format!("has {} entries", queries.len()),
            format!("one per sequence ({}, as layouts)", layouts.len()),
        ));
    }
    let max_rows = u64::from(i32::MAX as u32);
    for (sequence, (p, l)) in queries.iter().zip(layouts).enumerate() {
        let end = u64::from(p.query_offset) + u64::from(p.query_len);
        if end > shape.tokens as u64 {
            return Err(invalid(
                "queries",
                format!("sequence {sequence} has rows {}..{end}", p.query_offset),
                format!("rows inside q's {} tokens", shape.tokens),
            ));
        }
        if u64::from(p.start) + u64::from(p.query_len) > u64::from(l.len) {
            return Err(invalid(
                "queries",
                format!(
                    "sequence {sequence} has start {} + query_len {} past its len {}",
                    p.start, p.query_len, l.len
                ),
                "start + query_len <= len (write the chunk's keys and values first)",
            ));
        }
        if layout::rows(p.query_len, shape.group() as u32) > max_rows {
            return Err(invalid(
                "queries",
                format!(
                    "sequence {sequence} has {} tokens of {} heads per KV head",
                    p.query_len,
                    shape.group()
                ),
                format!("query_len * group <= {max_rows}"),
            ));
        }
    }
    let mut ranges: Vec<(u32, u32, usize)> = queries
        .iter()
        .enumerate()
        .filter(|(_, p)| p.query_len > 0)
        .map(|(sequence, p)| (p.query_offset, p.query_offset + p.query_len, sequence))
        .collect();
    ranges.sort_unstable();
    for pair in ranges.windows(2) {
        let ((_, end, first), (start, _, second)) = (pair[0], pair[1]);
        if start < end {
            return Err(invalid(
                "queries",
                format!("sequences {first} and {second} share rows of q"),
                "disjoint query rows",
            ));
        }
    }
    Ok(())
}

/// Checks that a device buffer starts on a 16-byte boundary (the kernel copies 16-byte rows).
fn check_aligned(argument: &'static str, address: u64) -> Result<()> {
    if address.is_multiple_of(16) {
        Ok(())
    } else {
        Err(invalid(
            argument,
            format!("starts at device address {address:#x}"),
            "a 16-byte aligned start (a view starting at a multiple of 8 elements)",
        ))
    }
}

/// A plan bound to a GPU: device copies of its layouts, query placements and block table.
pub struct PrefillAttention {
    plan: PrefillAttentionPlan,
    layouts: CudaSlice<u64>,
    queries: CudaSlice<u32>,
    tiles: CudaSlice<u32>,
}

impl PrefillAttention {
    /// Binds `plan` to `gpu`: uploads its layouts, query placements and block table on the
    /// GPU's stream. Errors if an upload or allocation fails.
    pub fn new(gpu: &Gpu, plan: PrefillAttentionPlan) -> Result<Self> {
        let stream = gpu.stream();
        let tiles = bytemuck::cast_slice::<PrefillTile, u32>(&plan.tiles);
        Ok(PrefillAttention {
            layouts: stream
                .clone_htod(bytemuck::cast_slice::<SequenceLayout, u64>(&plan.layouts))?,
            queries: stream
                .clone_htod(bytemuck::cast_slice::<QueryPlacement, u32>(&plan.queries))?,
            // A plan without queries launches nothing; the table still gets a buffer.
            tiles: if tiles.is_empty() {
                stream.alloc_zeros::<u32>(2)?
            } else {
                stream.clone_htod(tiles)?
            },
            plan,
        })
    }

    /// The plan the launches follow (the latest, after [`update`](Self::update)).
    pub fn plan(&self) -> &PrefillAttentionPlan {
        &self.plan
    }

    /// Replaces the plan (the next chunk of a chunked prefill, another batch), uploading its
    /// tables on `stream`; the device tables grow when the new plan needs more room.
    pub fn update(&mut self, stream: &Arc<CudaStream>, plan: PrefillAttentionPlan) -> Result<()> {
        let layouts = bytemuck::cast_slice::<SequenceLayout, u64>(&plan.layouts);
        let queries = bytemuck::cast_slice::<QueryPlacement, u32>(&plan.queries);
        let tiles = bytemuck::cast_slice::<PrefillTile, u32>(&plan.tiles);
        if self.layouts.len() < layouts.len() {
            self.layouts = stream.clone_htod(layouts)?;
        } else {
            stream.memcpy_htod(layouts, &mut self.layouts.slice_mut(..layouts.len()))?;
        }
        if self.queries.len() < queries.len() {
            self.queries = stream.clone_htod(queries)?;
        } else {
            stream.memcpy_htod(queries, &mut self.queries.slice_mut(..queries.len()))?;
        }
        if self.tiles.len() < tiles.len() {
            self.tiles = stream.clone_htod(tiles)?;
        } else if !tiles.is_empty() {
            stream.memcpy_htod(tiles, &mut self.tiles.slice_mut(..tiles.len()))?;
        }
        self.plan = plan;
        Ok(())
    }

    /// `out[t, h] = softmax(q[t, h] · K[..=pos]ᵀ · scale) · V[..=pos]` for every query token
    /// `t` of every sequence (at position `pos = start + t - query_offset`, KV head
    /// `h / group`), with `q` and `out` `[tokens, q_heads, head_dim]` bf16 and K/V laid out as
    /// the plan's layouts say. Rows of `out` that no sequence's queries cover are untouched.
    pub fn run(
        &mut self,
        gpu: &Gpu,
        stream: &CudaStream,
        q: &impl DevicePtr<bf16>,
        k: &impl DevicePtr<bf16>,
        v: &impl DevicePtr<bf16>,
        out: &mut impl DevicePtrMut<bf16>,
    ) -> Result<()> {
        let plan = &self.plan;
        let shape = plan.shape;
        let dims = format!("[{}, {}, {}]", shape.tokens, shape.q_heads, shape.head_dim);
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
        let (q_address, _q_guard) = q.device_ptr(stream);
        let (k_address, _k_guard) = k.device_ptr(stream);
        let (v_address, _v_guard) = v.device_ptr(stream);
        let (out_address, _out_guard) = out.device_ptr_mut(stream);
        for (argument, address) in [
            ("q", q_address),
            ("k", k_address),
            ("v", v_address),
            ("out", out_address),
        ] {
            check_aligned(argument, address)?;
        }
        if plan.tiles.is_empty() {
            return Ok(());
        }
        let (layouts_address, _layouts_guard) = self.layouts.device_ptr(stream);
        let (queries_address, _queries_guard) = self.queries.device_ptr(stream);
        let (tiles_address, _tiles_guard) = self.tiles.device_ptr(stream);
        let params = PrefillAttentionParams {
            q: q_address,
            k: k_address,
            v: v_address,
            out: out_address,
            layouts: layouts_address,
            queries: queries_address,
            tiles: tiles_address,
            tile_count: plan.tiles.len() as u32,
            kv_heads: shape.kv_heads as u32,
            q_heads: shape.q_heads as u32,
            group: shape.group() as u32,
            scale_log2: plan.scale * std::f32::consts::LOG2_E,
            window: plan.window,
        };
        let config = LaunchConfig {
            grid_dim: (plan.tiles.len() as u32 * shape.kv_heads as u32, 1, 1),
            block_dim: (layout::threads(plan.warps), 1, 1),
            shared_mem_bytes: layout::shared_bytes(shape.head_dim as u32, plan.warps),
        };
        // SAFETY: q/out hold exactly [tokens, q_heads, head_dim] and K/V every layout's block
        // (checked above and in the plan), all four 16-byte aligned; the uploaded tables are
        // the plan's: every placement's rows lie in q with start + query_len <= len <=
        // capacity, every tile's rows in its sequence's query rows, and the kernel is the one
        // compiled for this head_dim with group in 1..=MAX_GROUP; the grid is tiles x kv_heads.
        unsafe { gpu.launch(stream, plan.kernel, config, params) }
    }
}
