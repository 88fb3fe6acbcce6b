//! Random RoPE variants for the kernel tests: plain, Llama-3 scaled, per-frequency factors
//! (`rope_freqs`), partial rotary with adjacent or rotate-half pairs, and LongRoPE with an
//! attention factor, alone or combined.
use rand::Rng;
use shadowkv::{Llama3Scaling, LongRope, RopeConfig, RopeFactors, RopePairing};

/// Random positive factors for `pairs` frequencies, between 1 and 40 (LongRoPE's range).
fn random_factors(rng: &mut impl Rng, pairs: usize) -> RopeFactors {
    let values: Vec<f32> = (0..pairs).map(|_| rng.gen_range(1.0f32..40.0)).collect();
    RopeFactors::new(&values).expect("at most MAX_ROPE_PAIRS factors")
}

/// A random RoPE of heads of `head_dim`. With `whole_head_halves`, rotate-half pairs always
/// cover the whole head (the key rebuild's restriction); partial rotary then uses adjacent
/// pairs.
pub fn random_rope(rng: &mut impl Rng, head_dim: usize, whole_head_halves: bool) -> RopeConfig {
    let mut rope = RopeConfig::new(rng.gen_range(1e4..1e6));
    let variant = rng.gen_range(0..6);
    if variant == 1 {
        rope.scaling = Some(Llama3Scaling::LLAMA_3_1);
    }
    if variant == 3 || variant == 5 {
        // Partial rotary: a quarter, a half or three quarters of the head (even counts).
        let rotary_dim = head_dim / 4 * rng.gen_range(1..=3);
        rope.rotary_dim = (rotary_dim & !1) as u32;
        rope.pairing = if whole_head_halves || rng.gen_bool(0.5) {
            RopePairing::Adjacent
        } else {
            RopePairing::Halves
        };
    } else if rng.gen_bool(0.5) {
        rope.pairing = RopePairing::Adjacent;
    }
    let pairs = rope.rotary_dim(head_dim as u32) as usize / 2;
    if variant == 2 || variant == 5 {
        rope.factors = Some(Llama3Scaling::LLAMA_3_1.factors(rope.theta, 2 * pairs as u32));
    }
    if variant == 4 || variant == 5 {
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
