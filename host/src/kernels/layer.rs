//! Launchers of the per-token decoder-layer kernels (see `shadowkv_kernels::layer`):
//! embedding gather (optionally scaled), RMSNorm with the residual add (optionally of a normed
//! delta), RoPE on the fused Q/K/V projection (optionally after the QK norm) with the KV-cache
//! append, and the gated activation (SiLU or tanh-GELU of the gate, times up). Each checks its buffers against the sizes it is
//! given before launching; [`TokenPlan`] checks and uploads a launch's token placements once
//! for every layer.
use std::sync::Arc;

use cudarc::driver::{CudaSlice, CudaStream, CudaViewMut, DevicePtr, DevicePtrMut, LaunchConfig};
use half::bf16;
pub use shadowkv_kernels::layer as kernel_layout;
pub use shadowkv_kernels::layer::GatedActivation;
use shadowkv_kernels::layer::{
    self as layout, EmbeddingParams, GatedActivationParams, RmsNormParams, RopeQkvParams,
    TokenPlacement,
};
use shadowkv_kernels::rope::{RopePairing, RotaryLayout};

use crate::error::{check_len, check_reach, invalid, Result};
use crate::gpu::{grid_for, Gpu, LaunchBuffers};
use crate::kernels::attention::SequenceLayout;
use crate::ptx;

/// Checks `rotary` against heads of `head_dim` and the frequency table's length
/// (`rotary_dim / 2`).
pub(crate) fn check_rotary(
    rotary: &RotaryLayout,
    head_dim: usize,
    inverse_frequencies: usize,
) -> Result<()> {
    let rotary_dim = rotary.rotary_dim as usize;
    if rotary_dim == 0 || !rotary_dim.is_multiple_of(2) || rotary_dim > head_dim {
        return Err(invalid(
            "rotary.rotary_dim",
            format!("is {rotary_dim}"),
            format!("an even count of dimensions from 2 to head_dim ({head_dim})"),
        ));
    }
    if rotary.pairing > RopePairing::Adjacent as u32 {
        return Err(invalid(
            "rotary.pairing",
            format!("is {}", rotary.pairing),
            "0 (rotate-half) or 1 (adjacent pairs)",
        ));
    }
    if !(rotary.attention_factor.is_finite() && rotary.attention_factor > 0.0) {
        return Err(invalid(
            "rotary.attention_factor",
            format!("is {}", rotary.attention_factor),
            "a positive, finite scale",
        ));
    }
    check_len(
        "inverse_frequencies",
        inverse_frequencies,
        rotary_dim / 2,
        "rotary_dim / 2",
    )
}

fn rows_launch(rows: usize, shared_mem_bytes: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (rows as u32, 1, 1),
        block_dim: (layout::THREADS, 1, 1),
        shared_mem_bytes,
    }
}

fn check_rows(rows: usize) -> Result<()> {
    if rows == 0 || rows > i32::MAX as usize {
        return Err(invalid("rows", format!("is {rows}"), "1 to 2^31 - 1 rows"));
    }
    Ok(())
}

/// `out[t] = table[ids[t]]` as f32. `ids_host` is the host copy of `ids`, checked against
/// the vocabulary (`table` is `[vocab, hidden]`).
pub fn embedding(
    gpu: &Gpu,
    stream: &CudaStream,
    table: &impl DevicePtr<bf16>,
    hidden: usize,
    ids_host: &[u32],
    ids: &impl DevicePtr<u32>,
    out: &mut impl DevicePtrMut<f32>,
) -> Result<()> {
    embedding_scaled(gpu, stream, table, hidden, (ids_host, ids), 1.0, out)
}

/// [`embedding`] times `scale` (Gemma's `sqrt(hidden)`): `out[t] = table[ids[t]] * scale`.
pub fn embedding_scaled(
    gpu: &Gpu,
    stream: &CudaStream,
    table: &impl DevicePtr<bf16>,
    hidden: usize,
    (ids_host, ids): (&[u32], &impl DevicePtr<u32>),
    scale: f32,
    out: &mut impl DevicePtrMut<f32>,
) -> Result<()> {
    if !scale.is_finite() {
        return Err(invalid("scale", format!("is {scale}"), "a finite factor"));
    }
    check_rows(ids_host.len())?;
    if hidden == 0 || table.len() % hidden != 0 {
        return Err(invalid(
            "table",
            format!("has {} elements", table.len()),
            format!("a multiple of hidden = {hidden}"),
        ));
    }
    let vocab = table.len() / hidden;
    if let Some(bad) = ids_host.iter().find(|&&id| id as usize >= vocab) {
        return Err(invalid(
            "ids",
            format!("holds token id {bad}"),
            format!("ids below the vocabulary size {vocab}"),
        ));
    }
    check_len("ids", ids.len(), ids_host.len(), "one per token")?;
    check_len(
        "out",
        out.len(),
        ids_host.len() * hidden,
        "[tokens, hidden]",
    )?;
    let mut used = LaunchBuffers::new(stream);
    let params = EmbeddingParams {
        table: used.read(table),
        ids: used.read(ids),
        out: used.write(out),
        tokens: ids_host.len() as u32,
        hidden: hidden as u32,
        vocab: vocab as u32,
        scale,
    };
    // SAFETY: the table holds `vocab` rows of `hidden`, `out` one row per id (checked above);
    // the kernel reads a row only for ids below `vocab`.
    unsafe {
        gpu.launch(
            stream,
            ptx::EMBEDDING_GATHER,
            rows_launch(ids_host.len(), 0),
            params,
        )
    }
}

/// `residual += delta` (if given), then `out = rmsnorm(residual) * weight`, per row of
/// `weight.len()` values.
pub fn rms_norm(
    gpu: &Gpu,
    stream: &CudaStream,
    residual: &mut impl DevicePtrMut<f32>,
    delta: Option<&CudaSlice<f32>>,
    weight: &impl DevicePtr<f32>,
    eps: f32,
    out: &mut impl DevicePtrMut<bf16>,
) -> Result<()> {
    let delta = delta.map(|delta| (delta, None));
    rms_norm_launch(gpu, stream, residual, delta, weight, eps, out)
}

/// `residual += rmsnorm(delta) * delta_weight`, then `out = rmsnorm(residual) * weight`, per
/// row of `weight.len()` values, in one launch (Gemma's post-attention and post-FFN norms
/// before the residual add, fused with the next pre-norm); both norms use `eps`.
#[allow(clippy::too_many_arguments)]
pub fn rms_norm_normed_delta(
    gpu: &Gpu,
    stream: &CudaStream,
    residual: &mut impl DevicePtrMut<f32>,
    delta: &CudaSlice<f32>,
    delta_weight: &CudaSlice<f32>,
    weight: &impl DevicePtr<f32>,
    eps: f32,
    out: &mut impl DevicePtrMut<bf16>,
) -> Result<()> {
    check_len(
        "delta_weight",
        delta_weight.len(),
        weight.len(),
        "hidden (the weight's length)",
    )?;
    let delta = Some((delta, Some(delta_weight)));
    rms_norm_launch(gpu, stream, residual, delta, weight, eps, out)
}

type NormedDelta<'a> = (&'a CudaSlice<f32>, Option<&'a CudaSlice<f32>>);

fn rms_norm_launch(
    gpu: &Gpu,
    stream: &CudaStream,
    residual: &mut impl DevicePtrMut<f32>,
    delta: Option<NormedDelta<'_>>,
    weight: &impl DevicePtr<f32>,
    eps: f32,
    out: &mut impl DevicePtrMut<bf16>,
) -> Result<()> {
    let hidden = weight.len();
    if hidden == 0 || residual.len() % hidden != 0 {
        return Err(invalid(
            "residual",
            format!("has {} elements", residual.len()),
            format!("whole rows of {hidden} (the weight's length)"),
        ));
    }
    let rows = residual.len() / hidden;
    check_rows(rows)?;
    if let Some((delta, _)) = delta {
        check_len("delta", delta.len(), residual.len(), "[rows, hidden]")?;
    }
    check_len("out", out.len(), residual.len(), "[rows, hidden]")?;
    if !(eps >= 0.0 && eps.is_finite()) {
        return Err(invalid("eps", format!("is {eps}"), "a finite value >= 0"));
    }
    let mut used = LaunchBuffers::new(stream);
    let params = RmsNormParams {
        residual: used.write(residual),
        delta: delta.map_or(0, |(d, _)| used.read(d)),
        weight: used.read(weight),
        delta_weight: delta.and_then(|(_, w)| w).map_or(0, |w| used.read(w)),
        out: used.write(out),
        rows: rows as u32,
        hidden: hidden as u32,
        eps,
        _reserved: 0,
    };
    // SAFETY: every buffer holds `rows * hidden` elements and the weights `hidden` (checked).
    unsafe {
        gpu.launch(
            stream,
            ptx::RMS_NORM,
            rows_launch(rows, layout::RMS_NORM_SHARED_BYTES),
            params,
        )
    }
}

/// The heads of a fused Q/K/V projection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QkvShape {
    /// Query heads (`Hq`), a multiple of `kv_heads`.
    pub heads: usize,
    /// KV heads (`Hkv`).
    pub kv_heads: usize,
    /// Dimension of one head (`d`); even, for RoPE's rotate-half pairs.
    pub head_dim: usize,
}

impl QkvShape {
    /// Columns of the fused projection: `(heads + 2 kv_heads) * head_dim`.
    pub fn width(&self) -> usize {
        (self.heads + 2 * self.kv_heads) * self.head_dim
    }
}

/// A launch's tokens placed in their sequences' KV blocks, checked and on the device: made
/// once per forward pass, used by every layer's [`rope_qkv`].
pub struct TokenPlan {
    shape: QkvShape,
    tokens: usize,
    sequences: usize,
    /// Elements the K and V caches must hold for these layouts.
    kv_elements: usize,
    /// [`TokenPlacement`]s and [`SequenceLayout`]s as their 32- and 64-bit words.
    placements: CudaSlice<u32>,
    layouts: CudaSlice<u64>,
    /// Where launches read the placements instead of `placements`, while set (see
    /// [`read_placements_from`](Self::read_placements_from)).
    external_placements: Option<u64>,
}

impl TokenPlan {
    /// Checks that each token's sequence exists and its cache row lies inside the sequence's
    /// block (`cache_row < capacity`), and uploads both lists on `stream`.
    pub fn new(
        stream: &Arc<CudaStream>,
        shape: QkvShape,
        placements: &[TokenPlacement],
        layouts: &[SequenceLayout],
    ) -> Result<TokenPlan> {
        check_rows(placements.len())?;
        if shape.heads == 0
            || shape.kv_heads == 0
            || shape.head_dim == 0
            || !shape.head_dim.is_multiple_of(2)
            || !shape.heads.is_multiple_of(shape.kv_heads)
        {
            return Err(invalid(
                "shape",
                format!("{shape:?}"),
                "heads a multiple of kv_heads and an even, positive head_dim",
            ));
        }
        for (t, placement) in placements.iter().enumerate() {
            let Some(layout) = layouts.get(placement.sequence as usize) else {
                return Err(invalid(
                    "placements",
                    format!("token {t} names sequence {}", placement.sequence),
                    format!("one of the {} layouts", layouts.len()),
                ));
            };
            if placement.cache_row >= layout.capacity {
                return Err(invalid(
                    "placements",
                    format!(
                        "token {t} goes to row {} of sequence {}",
                        placement.cache_row, placement.sequence
                    ),
                    format!("a row below the sequence's capacity {}", layout.capacity),
                ));
            }
        }
        let kv_elements = layouts
            .iter()
            .map(|l| l.offset as usize + shape.kv_heads * l.capacity as usize * shape.head_dim)
            .max()
            .unwrap_or(0);
        Ok(TokenPlan {
            shape,
            tokens: placements.len(),
            sequences: layouts.len(),
            kv_elements,
            placements: stream
                .clone_htod(bytemuck::cast_slice::<TokenPlacement, u32>(placements))?,
            layouts: stream.clone_htod(bytemuck::cast_slice::<SequenceLayout, u64>(layouts))?,
            external_placements: None,
        })
    }

    /// Tokens of the launch: one per [`TokenPlacement`].
    pub fn tokens(&self) -> usize {
        self.tokens
    }

    /// With `Some(address)`, launches read the placements from `address` (the caller's
    /// device copy, rewritten on the device between launches) instead of the checked upload:
    /// a decode step replayed from a CUDA graph keeps the addresses it was captured with, so
    /// each step's positions come from device memory. `None` goes back to the upload.
    ///
    /// # Safety
    /// Until the next call, `address` must hold [`tokens`](Self::tokens) placements, each
    /// naming one of the plan's sequences with a `cache_row` below its capacity (what
    /// [`new`](Self::new) checks), whenever a launch that reads them runs.
    pub unsafe fn read_placements_from(&mut self, address: Option<u64>) {
        self.external_placements = address;
    }
}

/// Rotates the queries and keys of the fused projection `qkv` (`[tokens, shape.width()]`),
/// writes the queries to `q` (`[tokens, heads, head_dim]`) and appends each token's key and
/// value to its row of `k_cache`/`v_cache`. `bias` (Qwen2) is added first. The rotation is
/// `rotary` with the `rotary_dim / 2` `inverse_frequencies` (see `shadowkv_kernels::rope`).
/// With `pre_rope_keys` (`[tokens, kv_heads * head_dim]`), the keys before RoPE are written
/// too.
#[allow(clippy::too_many_arguments)]
pub fn rope_qkv(
    gpu: &Gpu,
    stream: &CudaStream,
    plan: &TokenPlan,
    qkv: &impl DevicePtr<f32>,
    bias: Option<&CudaSlice<f32>>,
    rope: (&impl DevicePtr<f64>, RotaryLayout),
    q: &mut impl DevicePtrMut<bf16>,
    kv_cache: (&mut impl DevicePtrMut<bf16>, &mut impl DevicePtrMut<bf16>),
    pre_rope_keys: Option<&mut CudaViewMut<'_, bf16>>,
) -> Result<()> {
    let input = QkvInput {
        qkv,
        bias,
        qk_norm: None,
    };
    rope_qkv_normed(gpu, stream, plan, input, rope, q, kv_cache, pre_rope_keys)
}

/// The per-head RMSNorm of queries and keys before RoPE (Gemma-3): one weight of
/// `head_dim` for every query head and one for every key head, as the model applies them
/// (Gemma's GGUF weights already hold its `1 + w`).
#[derive(Clone, Copy, Debug)]
pub struct QkNorm<'a> {
    /// f32 `[head_dim]`, shared by every query head.
    pub q_weight: &'a CudaSlice<f32>,
    /// f32 `[head_dim]`, shared by every key head.
    pub k_weight: &'a CudaSlice<f32>,
    /// Added to the mean square before the square root.
    pub eps: f32,
}

/// What [`rope_qkv_normed`] reads: the fused projection, its bias (Qwen2) and the QK norm.
#[derive(Clone, Copy)]
pub struct QkvInput<'a, Q> {
    /// f32 `[tokens, (heads + 2 kv_heads) * head_dim]`.
    pub qkv: &'a Q,
    /// f32 `[(heads + 2 kv_heads) * head_dim]`, added first.
    pub bias: Option<&'a CudaSlice<f32>>,
    /// Applied after the bias, before RoPE; the pre-RoPE keys are the normed keys.
    pub qk_norm: Option<QkNorm<'a>>,
}

/// [`rope_qkv`] with the optional QK norm of `input` (see [`QkNorm`]).
#[allow(clippy::too_many_arguments)]
pub fn rope_qkv_normed<Q: DevicePtr<f32>>(
    gpu: &Gpu,
    stream: &CudaStream,
    plan: &TokenPlan,
    input: QkvInput<'_, Q>,
    (inverse_frequencies, rotary): (&impl DevicePtr<f64>, RotaryLayout),
    q: &mut impl DevicePtrMut<bf16>,
    (k_cache, v_cache): (&mut impl DevicePtrMut<bf16>, &mut impl DevicePtrMut<bf16>),
    pre_rope_keys: Option<&mut CudaViewMut<'_, bf16>>,
) -> Result<()> {
    let QkvInput { qkv, bias, qk_norm } = input;
    let shape = plan.shape;
    if let Some(norm) = qk_norm {
        check_len(
            "qk_norm.q_weight",
            norm.q_weight.len(),
            shape.head_dim,
            "head_dim",
        )?;
        check_len(
            "qk_norm.k_weight",
            norm.k_weight.len(),
            shape.head_dim,
            "head_dim",
        )?;
        if !(norm.eps >= 0.0 && norm.eps.is_finite()) {
            return Err(invalid(
                "qk_norm.eps",
                format!("is {}", norm.eps),
                "a finite value >= 0",
            ));
        }
    }
    check_len(
        "qkv",
        qkv.len(),
        plan.tokens * shape.width(),
        "[tokens, (heads + 2 kv_heads) * head_dim]",
    )?;
    if let Some(bias) = bias {
        check_len(
            "bias",
            bias.len(),
            shape.width(),
            "(heads + 2 kv_heads) * head_dim",
        )?;
    }
    check_rotary(&rotary, shape.head_dim, inverse_frequencies.len())?;
    check_len(
        "q",
        q.len(),
        plan.tokens * shape.heads * shape.head_dim,
        "[tokens, heads, head_dim]",
    )?;
    check_reach("k_cache", k_cache.len(), plan.kv_elements)?;
    check_reach("v_cache", v_cache.len(), plan.kv_elements)?;
    if let Some(pre) = &pre_rope_keys {
        check_len(
            "pre_rope_keys",
            pre.len(),
            plan.tokens * shape.kv_heads * shape.head_dim,
            "[tokens, kv_heads * head_dim]",
        )?;
    }
    let mut used = LaunchBuffers::new(stream);
    let params = RopeQkvParams {
        qkv: used.read(qkv),
        bias: bias.map_or(0, |b| used.read(b)),
        inverse_frequencies: used.read(inverse_frequencies),
        placements: match plan.external_placements {
            Some(address) => address,
            None => used.read(&plan.placements),
        },
        layouts: used.read(&plan.layouts),
        q: used.write(q),
        k_cache: used.write(k_cache),
        v_cache: used.write(v_cache),
        pre_rope_keys: pre_rope_keys.map_or(0, |pre| used.write(pre)),
        q_norm: qk_norm.map_or(0, |norm| used.read(norm.q_weight)),
        k_norm: qk_norm.map_or(0, |norm| used.read(norm.k_weight)),
        tokens: plan.tokens as u32,
        heads: shape.heads as u32,
        kv_heads: shape.kv_heads as u32,
        head_dim: shape.head_dim as u32,
        sequences: plan.sequences as u32,
        norm_eps: qk_norm.map_or(0.0, |norm| norm.eps),
        rotary,
    };
    let shared =
        layout::rope_qkv_shared_bytes(shape.heads as u32, shape.kv_heads as u32, qk_norm.is_some());
    // SAFETY: the plan checked every placement against its layout and the caches reach every
    // layout's block; `qkv`, `q`, `pre_rope_keys`, the norm weights and the frequency table
    // match the shape (checked above); the shared memory holds one word per head.
    unsafe {
        gpu.launch(
            stream,
            ptx::ROPE_QKV,
            rows_launch(plan.tokens, shared),
            params,
        )
    }
}

/// `out = silu(gate) * up` for the fused `gate_up` (`[rows, 2 * width]`, gate columns
/// first); `out` is `[rows, width]`.
pub fn silu_mul(
    gpu: &Gpu,
    stream: &CudaStream,
    gate_up: &impl DevicePtr<f32>,
    out: &mut impl DevicePtrMut<bf16>,
    width: usize,
) -> Result<()> {
    gated_activation(gpu, stream, gate_up, out, width, GatedActivation::Silu)
}

/// `out = act(gate) * up` for the fused `gate_up` (`[rows, 2 * width]`, gate columns first)
/// with `activation` SiLU (SwiGLU) or tanh-approximated GELU (GeGLU); `out` is
/// `[rows, width]`.
pub fn gated_activation(
    gpu: &Gpu,
    stream: &CudaStream,
    gate_up: &impl DevicePtr<f32>,
    out: &mut impl DevicePtrMut<bf16>,
    width: usize,
    activation: GatedActivation,
) -> Result<()> {
    if width == 0 || out.len() % width != 0 {
        return Err(invalid(
            "out",
            format!("has {} elements", out.len()),
            format!("whole rows of width {width}"),
        ));
    }
    let rows = out.len() / width;
    check_rows(rows)?;
    check_len("gate_up", gate_up.len(), 2 * out.len(), "[rows, 2 * width]")?;
    let launch = grid_for(out.len(), layout::THREADS, 65_535);
    let mut used = LaunchBuffers::new(stream);
    let params = GatedActivationParams {
        gate_up: used.read(gate_up),
        out: used.write(out),
        rows: rows as u32,
        width: width as u32,
        activation: activation as u32,
        _reserved: 0,
    };
    // SAFETY: `gate_up` holds `rows * 2 * width` and `out` `rows * width` elements (checked).
    unsafe { gpu.launch(stream, ptx::GATED_ACTIVATION, launch, params) }
}
