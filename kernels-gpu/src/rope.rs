//! Rotary position embedding, Llama style (rotate-half: dimension `i` pairs with `i + d/2`).
//!
//! The host builds the table of inverse frequencies once ([`inverse_frequencies`]: any theta,
//! optional Llama-3 frequency scaling); kernels rotate with [`rotate`], which reduces the
//! angle `position * frequency` in f64 before an f32 sine/cosine, so positions up to millions
//! keep full accuracy. The CPU references use the same table and f64 trigonometry.

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
}

/// A model's RoPE: `theta` (the base) and optional Llama-3 scaling.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RopeConfig {
    pub theta: f64,
    pub scaling: Option<Llama3Scaling>,
}

impl RopeConfig {
    /// Llama-3-8B: theta 500,000, no scaling.
    pub const LLAMA_3: RopeConfig = RopeConfig {
        theta: 500_000.0,
        scaling: None,
    };
}

/// `head_dim / 2` inverse frequencies `theta^(-2i/d)`, Llama-3-scaled if asked.
#[cfg(not(target_arch = "nvptx64"))]
pub fn inverse_frequencies(config: &RopeConfig, head_dim: u32) -> Vec<f64> {
    (0..head_dim / 2)
        .map(|i| {
            let frequency = config.theta.powf(-2.0 * i as f64 / head_dim as f64);
            match config.scaling {
                None => frequency,
                Some(s) => {
                    let wavelength = 2.0 * core::f64::consts::PI / frequency;
                    let low_wavelength = s.original_max_position / s.low_freq_factor;
                    let high_wavelength = s.original_max_position / s.high_freq_factor;
                    if wavelength < high_wavelength {
                        frequency
                    } else if wavelength > low_wavelength {
                        frequency / s.factor
                    } else {
                        let smooth = (s.original_max_position / wavelength - s.low_freq_factor)
                            / (s.high_freq_factor - s.low_freq_factor);
                        (1.0 - smooth) * frequency / s.factor + smooth * frequency
                    }
                }
            }
        })
        .collect()
}

/// Rotates the pair `(x[i], x[i + d/2])` of a token at `position` by `position * frequency`.
#[cfg(target_arch = "nvptx64")]
#[inline(always)]
pub fn rotate(low: f32, high: f32, position: u32, inverse_frequency: f64) -> (f32, f32) {
    use crate::device::{round_f64, sin_cos};
    const TWO_PI: f64 = 2.0 * core::f64::consts::PI;
    let angle = position as f64 * inverse_frequency;
    let reduced = angle - round_f64(angle * (1.0 / TWO_PI)) * TWO_PI;
    let (sin, cos) = sin_cos(reduced as f32);
    (low * cos - high * sin, high * cos + low * sin)
}
