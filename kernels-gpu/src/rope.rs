//! Rotary position embedding and its variants.
//!
//! A head's dimensions are split into pairs; the first `rotary_dim / 2` pairs are rotated by
//! `position * frequency` and the rest pass through unchanged (partial rotary, GLM-4). Pairs are
//! either rotate-half ([`RopePairing::Halves`]: `i` with `i + rotary_dim / 2`, Llama/NeoX) or
//! adjacent ([`RopePairing::Adjacent`]: `2i` with `2i + 1`, GLM-4's interleaved layout,
//! llama.cpp's NORM mode). [`pair_columns`] is that map, shared by the kernels and the CPU
//! references.
//!
//! The host builds the table of inverse frequencies once ([`inverse_frequencies`]): the base
//! `theta^(-2i / rotary_dim)`, optionally Llama-3 scaled, divided by per-frequency factors
//! (Llama-3.1's `rope_freqs` tensor) and by LongRoPE's short or long factors (Phi-3). Kernels
//! rotate with [`rotate`], which reduces the angle `position * frequency` in f64 before an f32
//! sine/cosine, so positions up to millions keep full accuracy, and scale the rotated pair by
//! the attention factor (LongRoPE's; 1 otherwise). The CPU references use the same table and
//! f64 trigonometry.

/// Most rotated pairs of a head (head dimension 256).
pub const MAX_ROPE_PAIRS: usize = 128;

/// Llama-3's frequency scaling (`rope_scaling` with `rope_type = "llama3"`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Llama3Scaling {
    pub factor: f64,
    pub low_freq_factor: f64,
    pub high_freq_factor: f64,
    pub original_max_position: f64,
}

impl Llama3Scaling {
    /// Llama-3.1's published values.
    pub const LLAMA_3_1: Llama3Scaling = Llama3Scaling {
        factor: 8.0,
        low_freq_factor: 1.0,
        high_freq_factor: 4.0,
        original_max_position: 8192.0,
    };

    /// The scaled frequency of an unscaled `frequency`.
    pub fn scale(&self, frequency: f64) -> f64 {
        let wavelength = 2.0 * core::f64::consts::PI / frequency;
        let low_wavelength = self.original_max_position / self.low_freq_factor;
        let high_wavelength = self.original_max_position / self.high_freq_factor;
        if wavelength < high_wavelength {
            frequency
        } else if wavelength > low_wavelength {
            frequency / self.factor
        } else {
            let smooth = (self.original_max_position / wavelength - self.low_freq_factor)
                / (self.high_freq_factor - self.low_freq_factor);
            (1.0 - smooth) * frequency / self.factor + smooth * frequency
        }
    }

    /// The same scaling as per-frequency divisors in f32, as Llama-3.1 GGUF files carry it
    /// (`rope_freqs.weight`, written by llama.cpp's converter from these parameters).
    #[cfg(not(target_arch = "nvptx64"))]
    pub fn factors(&self, theta: f64, rotary_dim: u32) -> RopeFactors {
        let mut factors = RopeFactors::ONES;
        factors.len = (rotary_dim / 2).min(MAX_ROPE_PAIRS as u32);
        for (i, factor) in factors.values[..factors.len as usize]
            .iter_mut()
            .enumerate()
        {
            let frequency = base_frequency(theta, i as u32, rotary_dim);
            *factor = (frequency / self.scale(frequency)) as f32;
        }
        factors
    }
}

/// Per-frequency divisors of the RoPE frequencies, one per rotated pair (inline, so that a
/// [`RopeConfig`] stays `Copy`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RopeFactors {
    len: u32,
    values: [f32; MAX_ROPE_PAIRS],
}

// Host only: the slicing here keeps panic paths the device code must not have.
#[cfg(not(target_arch = "nvptx64"))]
impl RopeFactors {
    const ONES: RopeFactors = RopeFactors {
        len: 0,
        values: [1.0; MAX_ROPE_PAIRS],
    };

    /// `values` as factors; `None` past [`MAX_ROPE_PAIRS`].
    pub fn new(values: &[f32]) -> Option<RopeFactors> {
        let mut factors = RopeFactors::ONES;
        factors
            .values
            .get_mut(..values.len())?
            .copy_from_slice(values);
        factors.len = values.len() as u32;
        Some(factors)
    }

    /// The factors, one per rotated pair.
    pub fn as_slice(&self) -> &[f32] {
        &self.values[..self.len as usize]
    }
}

/// Phi-3's LongRoPE: the frequencies are divided by the short factors when the run's context
/// fits the original context length and by the long factors past it; every rotated pair is
/// scaled by `attention_factor`, with either set.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LongRope {
    pub short_factors: RopeFactors,
    pub long_factors: RopeFactors,
    /// The context length the model was pretrained for (`original_max_position_embeddings`).
    pub original_max_position: f64,
    /// The context the run is sized for; past `original_max_position` the long factors apply.
    pub context_length: f64,
    /// `sqrt(1 + ln(max / original) / ln(original))` unless the model gives its own.
    pub attention_factor: f64,
}

impl LongRope {
    /// The factor set in force for the run's context.
    pub fn factors(&self) -> &RopeFactors {
        if self.context_length > self.original_max_position {
            &self.long_factors
        } else {
            &self.short_factors
        }
    }

    /// Phi-3's default attention factor for a model extended from `original` to `max`
    /// positions (1 when not extended).
    #[cfg(not(target_arch = "nvptx64"))]
    pub fn default_attention_factor(max: f64, original: f64) -> f64 {
        let scale = max / original;
        if scale <= 1.0 {
            1.0
        } else {
            (1.0 + scale.ln() / original.ln()).sqrt()
        }
    }
}

/// How a head's dimensions pair up for the rotation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum RopePairing {
    /// Rotate-half: dimension `i` pairs with `i + rotary_dim / 2` (Llama, NeoX).
    Halves = 0,
    /// Interleaved: dimension `2i` pairs with `2i + 1` (GLM-4; llama.cpp's NORM mode).
    Adjacent = 1,
}

/// A model's RoPE: `theta` (the base), the rotated part of each head and its pairing, and
/// the frequency adjustments (Llama-3 scaling, `rope_freqs` factors, LongRoPE).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RopeConfig {
    pub theta: f64,
    pub scaling: Option<Llama3Scaling>,
    /// Per-frequency divisors (`rope_freqs.weight` in Llama-3.1 GGUF files).
    pub factors: Option<RopeFactors>,
    pub long_rope: Option<LongRope>,
    /// Rotated dimensions of each head; 0 means all (partial rotary: GLM-4 rotates half).
    pub rotary_dim: u32,
    pub pairing: RopePairing,
}

impl RopeConfig {
    /// Llama-3-8B: theta 500,000, no scaling.
    pub const LLAMA_3: RopeConfig = RopeConfig::new(500_000.0);

    /// Plain rotate-half RoPE of whole heads with base `theta`.
    pub const fn new(theta: f64) -> RopeConfig {
        RopeConfig {
            theta,
            scaling: None,
            factors: None,
            long_rope: None,
            rotary_dim: 0,
            pairing: RopePairing::Halves,
        }
    }

    /// The rotated dimensions of a head of `head_dim`.
    pub fn rotary_dim(&self, head_dim: u32) -> u32 {
        if self.rotary_dim == 0 {
            head_dim
        } else {
            self.rotary_dim
        }
    }

    /// The factor every rotated pair is scaled by (LongRoPE's; 1 otherwise).
    pub fn attention_factor(&self) -> f64 {
        self.long_rope.map_or(1.0, |long| long.attention_factor)
    }

    /// What the kernels need besides the frequency table, for heads of `head_dim`.
    pub fn layout(&self, head_dim: u32) -> RotaryLayout {
        RotaryLayout {
            rotary_dim: self.rotary_dim(head_dim),
            pairing: self.pairing as u32,
            attention_factor: self.attention_factor() as f32,
            _reserved: 0,
        }
    }

    /// Checks the configuration against heads of `head_dim`; the error says what is wrong.
    #[cfg(not(target_arch = "nvptx64"))]
    pub fn check(&self, head_dim: u32) -> Result<(), String> {
        let rotary_dim = self.rotary_dim(head_dim);
        let pairs = rotary_dim as usize / 2;
        if !(self.theta.is_finite() && self.theta > 1.0) {
            return Err(format!("has RoPE theta {}; it must exceed 1", self.theta));
        }
        if !rotary_dim.is_multiple_of(2) || rotary_dim > head_dim || pairs > MAX_ROPE_PAIRS {
            return Err(format!(
                "rotates {rotary_dim} dimensions of {head_dim}; expected an even count up to \
                 the head dimension and {}",
                2 * MAX_ROPE_PAIRS
            ));
        }
        let check_factors = |what: &str, factors: &RopeFactors| {
            let values = factors.as_slice();
            if values.len() != pairs || values.iter().any(|f| !(f.is_finite() && *f > 0.0)) {
                Err(format!(
                    "has {} {what} ({} of them positive and finite); expected {pairs} \
                     (rotary_dim / 2)",
                    values.len(),
                    values.iter().filter(|f| f.is_finite() && **f > 0.0).count()
                ))
            } else {
                Ok(())
            }
        };
        if let Some(factors) = &self.factors {
            check_factors("RoPE factors", factors)?;
        }
        if let Some(long) = &self.long_rope {
            check_factors("LongRoPE short factors", &long.short_factors)?;
            check_factors("LongRoPE long factors", &long.long_factors)?;
            if !(long.attention_factor.is_finite() && long.attention_factor > 0.0) {
                return Err(format!(
                    "has LongRoPE attention factor {}; expected a positive one",
                    long.attention_factor
                ));
            }
        }
        Ok(())
    }
}

/// The rotation's shape as the kernels read it (every RoPE kernel's parameters embed it).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq)]
#[cfg_attr(feature = "host", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct RotaryLayout {
    /// Rotated dimensions of each head (even, at most the head dimension).
    pub rotary_dim: u32,
    /// A [`RopePairing`] as `u32`.
    pub pairing: u32,
    /// Scale of every rotated pair.
    pub attention_factor: f32,
    pub _reserved: u32,
}

impl RotaryLayout {
    /// Plain rotate-half RoPE of whole heads of `head_dim`.
    pub const fn full(head_dim: u32) -> RotaryLayout {
        RotaryLayout {
            rotary_dim: head_dim,
            pairing: RopePairing::Halves as u32,
            attention_factor: 1.0,
            _reserved: 0,
        }
    }
}

/// The two columns of pair `pair` (of `head_dim / 2`) of a head and whether they are rotated
/// (by frequency `pair`): the first `rotary_dim / 2` pairs are rotated, as `layout.pairing`
/// says; the dimensions past `rotary_dim` pass through, two by two.
#[inline(always)]
pub const fn pair_columns(pair: u32, layout: &RotaryLayout) -> (u32, u32, bool) {
    let rotated_pairs = layout.rotary_dim / 2;
    if pair >= rotated_pairs {
        let column = layout.rotary_dim + 2 * (pair - rotated_pairs);
        (column, column + 1, false)
    } else if layout.pairing == RopePairing::Adjacent as u32 {
        (2 * pair, 2 * pair + 1, true)
    } else {
        (pair, pair + rotated_pairs, true)
    }
}

/// The unscaled frequency of pair `i`: `theta^(-2i / rotary_dim)`.
#[cfg(not(target_arch = "nvptx64"))]
fn base_frequency(theta: f64, i: u32, rotary_dim: u32) -> f64 {
    theta.powf(-2.0 * i as f64 / rotary_dim as f64)
}

/// The `rotary_dim / 2` inverse frequencies of heads of `head_dim`: `theta^(-2i/rotary_dim)`,
/// Llama-3-scaled if asked, divided by the `rope_freqs` factors and LongRoPE's factors in
/// force (in that order, as the models apply them).
#[cfg(not(target_arch = "nvptx64"))]
pub fn inverse_frequencies(config: &RopeConfig, head_dim: u32) -> Vec<f64> {
    let rotary_dim = config.rotary_dim(head_dim);
    let divisor = |factors: Option<&RopeFactors>, i: usize| {
        factors
            .and_then(|f| f.as_slice().get(i))
            .map_or(1.0, |&f| f as f64)
    };
    (0..rotary_dim / 2)
        .map(|i| {
            let frequency = base_frequency(config.theta, i, rotary_dim);
            let scaled = config.scaling.map_or(frequency, |s| s.scale(frequency));
            scaled
                / divisor(config.factors.as_ref(), i as usize)
                / divisor(config.long_rope.as_ref().map(|l| l.factors()), i as usize)
        })
        .collect()
}

/// Rotates the pair `(low, high)` of a token at `position` by `position * frequency`, then
/// scales it by `attention_factor`.
#[cfg(target_arch = "nvptx64")]
#[inline(always)]
pub fn rotate(
    low: f32,
    high: f32,
    position: u32,
    inverse_frequency: f64,
    attention_factor: f32,
) -> (f32, f32) {
    use crate::device::{round_f64, sin_cos};
    const TWO_PI: f64 = 2.0 * core::f64::consts::PI;
    let angle = position as f64 * inverse_frequency;
    let reduced = angle - round_f64(angle * (1.0 / TWO_PI)) * TWO_PI;
    let (sin, cos) = sin_cos(reduced as f32);
    let (sin, cos) = (sin * attention_factor, cos * attention_factor);
    (low * cos - high * sin, high * cos + low * sin)
}
