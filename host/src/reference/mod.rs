//! CPU references, one module per kernel family (same names as the launchers), in f64.
pub mod attention;
pub mod cache;
pub mod decode_step;
pub mod factorise;
pub mod fetch;
pub mod layer;
pub mod plan;
pub mod prefill_attention;
pub mod random;
pub mod rebuild;
pub mod sampling;
pub mod scoring;
pub mod scripted_selection;
pub mod shadow_prefill;
pub mod tier;
pub mod topk;
pub mod values;

/// `‖out − reference‖ / ‖reference‖`; NaN or a length mismatch gives infinity.
pub fn relative_error(out: &[f64], reference: &[f64]) -> f64 {
    if out.len() != reference.len() {
        return f64::INFINITY;
    }
    let (mut diff, mut norm) = (0.0f64, 0.0f64);
    for (o, r) in out.iter().zip(reference) {
        diff += (o - r) * (o - r);
        norm += r * r;
    }
    let error = diff.sqrt() / norm.sqrt().max(f64::MIN_POSITIVE);
    if error.is_nan() {
        f64::INFINITY
    } else {
        error
    }
}
