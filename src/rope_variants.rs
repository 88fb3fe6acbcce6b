//! RoPE variants for the kernel tests: plain, Llama-3 scaled, per-frequency factors
//! (`rope_freqs`), partial rotary with adjacent or rotate-half pairs, and LongRoPE with an
//! attention factor, alone and combined. Tests take them in turn ([`next_variant`]) so that a
//! run of at least [`ROPE_VARIANTS`] cases covers each.
use std::sync::atomic::{AtomicUsize, Ordering};

use rand::Rng;
use shadowkv::{Llama3Scaling, LongRope, RopeConfig, RopeFactors, RopePairing};

/// How many variants [`rope_variant`] draws from.
pub const ROPE_VARIANTS: usize = 7;

/// The variant with rotate-half pairs over part of the head, which the key rebuild refuses.
pub const PARTIAL_HALVES: usize = 4;

/// The next variant in turn (process-wide).
pub fn next_variant() -> usize {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    NEXT.fetch_add(1, Ordering::Relaxed) % ROPE_VARIANTS
}

/// Random positive factors for `pairs` frequencies, between 1 and 40 (LongRoPE's range).
fn random_factors(rng: &mut impl Rng, pairs: usize) -> RopeFactors {
    let values: Vec<f32> = (0..pairs).map(|_| rng.gen_range(1.0f32..40.0)).collect();
    RopeFactors::new(&values).expect("at most MAX_ROPE_PAIRS factors")
}

/// Variant `variant` (of [`ROPE_VARIANTS`]) of heads of `head_dim`, with a random base and
/// random factors: 0 plain, 1 Llama-3 scaled, 2 `rope_freqs` factors, 3 partial rotary with
/// adjacent pairs (GLM-4), 4 partial rotary with rotate-half pairs, 5 LongRoPE (short or long
/// factors), 6 partial adjacent with factors and LongRoPE together.
pub fn rope_variant(rng: &mut impl Rng, head_dim: usize, variant: usize) -> RopeConfig {
    let mut rope = RopeConfig::new(rng.gen_range(1e4..1e6));
    if variant == 1 {
        rope.scaling = Some(Llama3Scaling::LLAMA_3_1);
    }
    if matches!(variant, 3 | 4 | 6) {
        // A quarter, a half or three quarters of the head.
        rope.rotary_dim = (head_dim / 4 * rng.gen_range(1..=3)) as u32;
        rope.pairing = if variant == PARTIAL_HALVES {
            RopePairing::Halves
        } else {
            RopePairing::Adjacent
        };
    }
    let pairs = rope.rotary_dim(head_dim as u32) as usize / 2;
    if matches!(variant, 2 | 6) {
        rope.factors = Some(Llama3Scaling::LLAMA_3_1.factors(rope.theta, 2 * pairs as u32));
    }
    if matches!(variant, 5 | 6) {
        let original = 4096.0;
        let context = if rng.gen_bool(0.5) { 131_072.0 } else { 4096.0 };
        rope.long_rope = Some(LongRope {
            short_factors: random_factors(rng, pairs),
            long_factors: random_factors(rng, pairs),
            original_max_position: original,
            context_length: context,
            attention_factor: LongRope::default_attention_factor(131_072.0, original),
        });
    }
    rope
}
