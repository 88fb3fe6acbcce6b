//! GGML tensor types and their dequantisation to f32 (block layouts as ggml defines them).
use half::{bf16, f16};

/// The GGML tensor types this crate reads. Other type ids are reported as unsupported.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GgmlType {
    F32,
    F16,
    BF16,
    Q4_0,
    Q4_1,
    Q8_0,
    Q4K,
    Q6K,
}

/// Elements per super-block of the k-quants.
const K_BLOCK: usize = 256;

impl GgmlType {
    /// The type with GGML id `id`, or `None` if this crate cannot read it.
    pub fn from_id(id: u32) -> Option<Self> {
        Some(match id {
            0 => GgmlType::F32,
            1 => GgmlType::F16,
            2 => GgmlType::Q4_0,
            3 => GgmlType::Q4_1,
            8 => GgmlType::Q8_0,
            12 => GgmlType::Q4K,
            14 => GgmlType::Q6K,
            30 => GgmlType::BF16,
            _ => return None,
        })
    }

    /// The name ggml gives a type id (for error messages), known or not.
    pub fn id_name(id: u32) -> &'static str {
        const NAMES: [&str; 31] = [
            "F32", "F16", "Q4_0", "Q4_1", "Q4_2", "Q4_3", "Q5_0", "Q5_1", "Q8_0", "Q8_1", "Q2_K",
            "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_K", "IQ2_XXS", "IQ2_XS", "IQ3_XXS", "IQ1_S",
            "IQ4_NL", "IQ3_S", "IQ2_S", "IQ4_XS", "I8", "I16", "I32", "I64", "F64", "IQ1_M",
            "BF16",
        ];
        NAMES.get(id as usize).copied().unwrap_or("unknown")
    }

    /// Elements per block.
    pub fn block_len(self) -> usize {
        match self {
            GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 => 1,
            GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q8_0 => 32,
            GgmlType::Q4K | GgmlType::Q6K => K_BLOCK,
        }
    }

    /// Bytes per block.
    pub fn block_bytes(self) -> usize {
        match self {
            GgmlType::F32 => 4,
            GgmlType::F16 | GgmlType::BF16 => 2,
            GgmlType::Q4_0 => 2 + 16,
            GgmlType::Q4_1 => 2 + 2 + 16,
            GgmlType::Q8_0 => 2 + 32,
            GgmlType::Q4K => 2 + 2 + 12 + K_BLOCK / 2,
            GgmlType::Q6K => K_BLOCK / 2 + K_BLOCK / 4 + K_BLOCK / 16 + 2,
        }
    }

    /// Bytes that `elements` elements take, or why they cannot be stored in this type
    /// (a count that is not a whole number of blocks).
    pub fn bytes_for(self, elements: u64) -> Result<u64, String> {
        let block = self.block_len() as u64;
        if !elements.is_multiple_of(block) {
            return Err(format!(
                "{elements} elements are not a whole number of {:?} blocks of {block}",
                self
            ));
        }
        (elements / block)
            .checked_mul(self.block_bytes() as u64)
            .ok_or_else(|| format!("{elements} elements overflow a byte count"))
    }

    /// Dequantises `data` (whole blocks) into `out`, one f32 per element.
    pub fn dequantize(self, data: &[u8], out: &mut Vec<f32>) {
        let blocks = data.chunks_exact(self.block_bytes());
        match self {
            GgmlType::F32 => {
                out.extend(blocks.map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])))
            }
            GgmlType::F16 => out.extend(blocks.map(|b| half_at(b, 0))),
            GgmlType::BF16 => {
                out.extend(blocks.map(|b| bf16::from_le_bytes([b[0], b[1]]).to_f32()))
            }
            GgmlType::Q4_0 => blocks.for_each(|b| q4_0(b, out)),
            GgmlType::Q4_1 => blocks.for_each(|b| q4_1(b, out)),
            GgmlType::Q8_0 => blocks.for_each(|b| q8_0(b, out)),
            GgmlType::Q4K => blocks.for_each(|b| q4_k(b, out)),
            GgmlType::Q6K => blocks.for_each(|b| q6_k(b, out)),
        }
    }
}

/// The little-endian f16 at byte `at`, as f32.
fn half_at(bytes: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([bytes[at], bytes[at + 1]]).to_f32()
}

/// `d: f16, qs: [u8; 16]`: element `i` is the low nibble of `qs[i]`, element `i + 16` the high
/// one, both offset by 8, times `d`.
fn q4_0(block: &[u8], out: &mut Vec<f32>) {
    let d = half_at(block, 0);
    let qs = &block[2..18];
    out.extend(qs.iter().map(|&q| ((q & 0xF) as i32 - 8) as f32 * d));
    out.extend(qs.iter().map(|&q| ((q >> 4) as i32 - 8) as f32 * d));
}

/// `d: f16, m: f16, qs: [u8; 16]`: nibbles as in [`q4_0`], unsigned, `q * d + m`.
fn q4_1(block: &[u8], out: &mut Vec<f32>) {
    let (d, m) = (half_at(block, 0), half_at(block, 2));
    let qs = &block[4..20];
    out.extend(qs.iter().map(|&q| (q & 0xF) as f32 * d + m));
    out.extend(qs.iter().map(|&q| (q >> 4) as f32 * d + m));
}

/// `d: f16, qs: [i8; 32]`: `q * d`.
fn q8_0(block: &[u8], out: &mut Vec<f32>) {
    let d = half_at(block, 0);
    out.extend(block[2..34].iter().map(|&q| q as i8 as f32 * d));
}

/// The 6-bit scale and min of sub-block `j` (0..8) from the 12 packed bytes of a Q4_K block.
fn q4_k_scale_min(j: usize, scales: &[u8]) -> (f32, f32) {
    let (scale, min) = if j < 4 {
        (scales[j] & 63, scales[j + 4] & 63)
    } else {
        (
            (scales[j + 4] & 0xF) | ((scales[j - 4] >> 6) << 4),
            (scales[j + 4] >> 4) | ((scales[j] >> 6) << 4),
        )
    };
    (scale as f32, min as f32)
}

/// `d: f16, dmin: f16, scales: [u8; 12], qs: [u8; 128]`: 8 sub-blocks of 32 with 6-bit scales
/// and mins; each 32 bytes of `qs` hold two sub-blocks (low nibbles, then high).
fn q4_k(block: &[u8], out: &mut Vec<f32>) {
    let (d, dmin) = (half_at(block, 0), half_at(block, 2));
    let scales = &block[4..16];
    for (pair, qs) in block[16..144].chunks_exact(32).enumerate() {
        let (scale_low, min_low) = q4_k_scale_min(2 * pair, scales);
        let (scale_high, min_high) = q4_k_scale_min(2 * pair + 1, scales);
        out.extend(
            qs.iter()
                .map(|&q| d * scale_low * (q & 0xF) as f32 - dmin * min_low),
        );
        out.extend(
            qs.iter()
                .map(|&q| d * scale_high * (q >> 4) as f32 - dmin * min_high),
        );
    }
}

/// `ql: [u8; 128], qh: [u8; 64], scales: [i8; 16], d: f16`: 6-bit values (4 low bits from
/// `ql`, 2 high from `qh`) offset by 32, 16 sub-blocks of 16 with 8-bit scales.
fn q6_k(block: &[u8], out: &mut Vec<f32>) {
    let (ql, qh, scales) = (&block[0..128], &block[128..192], &block[192..208]);
    let d = half_at(block, 208);
    for half in 0..2 {
        let (ql, qh) = (&ql[64 * half..], &qh[32 * half..]);
        let scale = |i: usize| d * scales[8 * half + i] as i8 as f32;
        let mut values = [0.0f32; 128];
        for l in 0..32 {
            let sub = l / 16;
            let q = [
                (ql[l] & 0xF) | ((qh[l] & 3) << 4),
                (ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4),
                (ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4),
                (ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4),
            ];
            for (quarter, &q) in q.iter().enumerate() {
                values[32 * quarter + l] = scale(sub + 2 * quarter) * (q as i32 - 32) as f32;
            }
        }
        out.extend_from_slice(&values);
    }
}
