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
    Q5_0,
    Q5_1,
    Q8_0,
    Q2K,
    Q3K,
    Q4K,
    Q5K,
    Q6K,
    IQ4NL,
    IQ4XS,
}

/// Elements per super-block of the k-quants (and of IQ4_XS).
const K_BLOCK: usize = 256;

/// The 16 non-uniformly spaced levels of the IQ4 types (ggml's `kvalues_iq4nl`), denser near
/// zero where most weights lie.
const IQ4_LEVELS: [i8; 16] = [
    -127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113,
];

impl GgmlType {
    /// Every type this crate reads, in GGML id order (listed in the unsupported-type error).
    pub const SUPPORTED: [GgmlType; 15] = [
        GgmlType::F32,
        GgmlType::F16,
        GgmlType::Q4_0,
        GgmlType::Q4_1,
        GgmlType::Q5_0,
        GgmlType::Q5_1,
        GgmlType::Q8_0,
        GgmlType::Q2K,
        GgmlType::Q3K,
        GgmlType::Q4K,
        GgmlType::Q5K,
        GgmlType::Q6K,
        GgmlType::IQ4NL,
        GgmlType::IQ4XS,
        GgmlType::BF16,
    ];

    /// The GGML type id.
    pub fn id(self) -> u32 {
        match self {
            GgmlType::F32 => 0,
            GgmlType::F16 => 1,
            GgmlType::Q4_0 => 2,
            GgmlType::Q4_1 => 3,
            GgmlType::Q5_0 => 6,
            GgmlType::Q5_1 => 7,
            GgmlType::Q8_0 => 8,
            GgmlType::Q2K => 10,
            GgmlType::Q3K => 11,
            GgmlType::Q4K => 12,
            GgmlType::Q5K => 13,
            GgmlType::Q6K => 14,
            GgmlType::IQ4NL => 20,
            GgmlType::IQ4XS => 23,
            GgmlType::BF16 => 30,
        }
    }

    /// The name ggml gives this type (`Q4_K`, `IQ4_XS`).
    pub fn name(self) -> &'static str {
        Self::id_name(self.id())
    }

    /// The type with GGML id `id`, or `None` if this crate cannot read it.
    pub fn from_id(id: u32) -> Option<Self> {
        Self::SUPPORTED.into_iter().find(|t| t.id() == id)
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
            GgmlType::Q4_0
            | GgmlType::Q4_1
            | GgmlType::Q5_0
            | GgmlType::Q5_1
            | GgmlType::Q8_0
            | GgmlType::IQ4NL => 32,
            GgmlType::Q2K
            | GgmlType::Q3K
            | GgmlType::Q4K
            | GgmlType::Q5K
            | GgmlType::Q6K
            | GgmlType::IQ4XS => K_BLOCK,
        }
    }

    /// Bytes per block.
    pub fn block_bytes(self) -> usize {
        match self {
            GgmlType::F32 => 4,
            GgmlType::F16 | GgmlType::BF16 => 2,
            GgmlType::Q4_0 => 2 + 16,
            GgmlType::Q4_1 => 2 + 2 + 16,
            GgmlType::Q5_0 => 2 + 4 + 16,
            GgmlType::Q5_1 => 2 + 2 + 4 + 16,
            GgmlType::Q8_0 => 2 + 32,
            GgmlType::Q2K => K_BLOCK / 16 + K_BLOCK / 4 + 2 + 2,
            GgmlType::Q3K => K_BLOCK / 8 + K_BLOCK / 4 + 12 + 2,
            GgmlType::Q4K => 2 + 2 + 12 + K_BLOCK / 2,
            GgmlType::Q5K => 2 + 2 + 12 + K_BLOCK / 8 + K_BLOCK / 2,
            GgmlType::Q6K => K_BLOCK / 2 + K_BLOCK / 4 + K_BLOCK / 16 + 2,
            GgmlType::IQ4NL => 2 + 16,
            GgmlType::IQ4XS => 2 + 2 + K_BLOCK / 64 + K_BLOCK / 2,
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
            GgmlType::Q5_0 => blocks.for_each(|b| q5_0(b, out)),
            GgmlType::Q5_1 => blocks.for_each(|b| q5_1(b, out)),
            GgmlType::Q8_0 => blocks.for_each(|b| q8_0(b, out)),
            GgmlType::Q2K => blocks.for_each(|b| q2_k(b, out)),
            GgmlType::Q3K => blocks.for_each(|b| q3_k(b, out)),
            GgmlType::Q4K => blocks.for_each(|b| q4_k(b, out)),
            GgmlType::Q5K => blocks.for_each(|b| q5_k(b, out)),
            GgmlType::Q6K => blocks.for_each(|b| q6_k(b, out)),
            GgmlType::IQ4NL => blocks.for_each(|b| iq4_nl(b, out)),
            GgmlType::IQ4XS => blocks.for_each(|b| iq4_xs(b, out)),
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

/// The 5-bit values of a Q5_0/Q5_1 block: the nibbles of `qs` as in [`q4_0`], with bit `i` of
/// the little-endian `qh` as the fifth bit of element `i`.
fn five_bit_values<'a>(qh: &[u8], qs: &'a [u8]) -> impl Iterator<Item = u8> + 'a {
    let high = u32::from_le_bytes([qh[0], qh[1], qh[2], qh[3]]);
    let low = qs
        .iter()
        .map(|&q| q & 0xF)
        .chain(qs.iter().map(|&q| q >> 4));
    low.enumerate()
        .map(move |(i, q)| q | (((high >> i) & 1) as u8) << 4)
}

/// `d: f16, qh: [u8; 4], qs: [u8; 16]`: 5-bit values offset by 16, times `d`.
fn q5_0(block: &[u8], out: &mut Vec<f32>) {
    let d = half_at(block, 0);
    out.extend(five_bit_values(&block[2..6], &block[6..22]).map(|q| (q as i32 - 16) as f32 * d));
}

/// `d: f16, m: f16, qh: [u8; 4], qs: [u8; 16]`: 5-bit values, unsigned, `q * d + m`.
fn q5_1(block: &[u8], out: &mut Vec<f32>) {
    let (d, m) = (half_at(block, 0), half_at(block, 2));
    out.extend(five_bit_values(&block[4..8], &block[8..24]).map(|q| q as f32 * d + m));
}

/// `d: f16, qs: [i8; 32]`: `q * d`.
fn q8_0(block: &[u8], out: &mut Vec<f32>) {
    let d = half_at(block, 0);
    out.extend(block[2..34].iter().map(|&q| q as i8 as f32 * d));
}

/// `scales: [u8; 16], qs: [u8; 64], d: f16, dmin: f16`: 16 sub-blocks of 16 with a 4-bit scale
/// (low nibble) and min (high nibble) each. Each 32 bytes of `qs` hold 128 2-bit values, four
/// bit planes of 32 elements (two sub-blocks) each.
fn q2_k(block: &[u8], out: &mut Vec<f32>) {
    let (scales, qs) = (&block[0..16], &block[16..80]);
    let (d, dmin) = (half_at(block, 80), half_at(block, 82));
    for (half, qs) in qs.chunks_exact(32).enumerate() {
        for plane in 0..4 {
            let shift = 2 * plane;
            for (sub, qs) in qs.chunks_exact(16).enumerate() {
                let packed = scales[8 * half + 2 * plane + sub];
                let scale = d * (packed & 0xF) as f32;
                let min = dmin * (packed >> 4) as f32;
                out.extend(qs.iter().map(|&q| scale * ((q >> shift) & 3) as f32 - min));
            }
        }
    }
}

/// `hmask: [u8; 32], qs: [u8; 64], scales: [u8; 12], d: f16`: 3-bit values (2 low bits laid out
/// as in [`q2_k`], the third from bit plane `j` of `hmask` for the `j`-th run of 32 elements),
/// offset by 4 when that bit is clear; 16 sub-blocks of 16 with 6-bit scales offset by 32.
fn q3_k(block: &[u8], out: &mut Vec<f32>) {
    let (hmask, qs, packed) = (&block[0..32], &block[32..96], &block[96..108]);
    let d = half_at(block, 108);
    // Sub-block `i` keeps its low 4 bits in a nibble of the first 8 bytes and its high 2 bits
    // in a bit pair of the last 4.
    let scale = |i: usize| {
        let low = (packed[i % 8] >> (4 * (i / 8))) & 0xF;
        let high = (packed[8 + i % 4] >> (2 * (i / 4))) & 3;
        d * ((low | high << 4) as i32 - 32) as f32
    };
    for (half, qs) in qs.chunks_exact(32).enumerate() {
        for plane in 0..4 {
            let shift = 2 * plane;
            let high_bit = 4 * half + plane;
            for (sub, (qs, hmask)) in qs.chunks_exact(16).zip(hmask.chunks_exact(16)).enumerate() {
                let scale = scale(8 * half + 2 * plane + sub);
                out.extend(qs.iter().zip(hmask).map(|(&q, &h)| {
                    let offset = if (h >> high_bit) & 1 == 1 { 0 } else { 4 };
                    scale * (((q >> shift) & 3) as i32 - offset) as f32
                }));
            }
        }
    }
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

/// `d: f16, dmin: f16, scales: [u8; 12], qh: [u8; 32], qs: [u8; 128]`: as [`q4_k`], with bit
/// `j` of `qh[l]` as the fifth bit of element `l` of sub-block `j`.
fn q5_k(block: &[u8], out: &mut Vec<f32>) {
    let (d, dmin) = (half_at(block, 0), half_at(block, 2));
    let (scales, qh) = (&block[4..16], &block[16..48]);
    for (pair, qs) in block[48..176].chunks_exact(32).enumerate() {
        for (sub, shift) in [(2 * pair, 0), (2 * pair + 1, 4)] {
            let (scale, min) = q4_k_scale_min(sub, scales);
            out.extend(qs.iter().zip(qh).map(|(&q, &h)| {
                let q = ((q >> shift) & 0xF) | ((h >> sub) & 1) << 4;
                d * scale * q as f32 - dmin * min
            }));
        }
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

/// `d: f16, qs: [u8; 16]`: nibbles laid out as in [`q4_0`], each an index into [`IQ4_LEVELS`],
/// times `d`.
fn iq4_nl(block: &[u8], out: &mut Vec<f32>) {
    let d = half_at(block, 0);
    iq4_values(d, &block[2..18], out);
}

/// `d: f16, scales_h: u16, scales_l: [u8; 4], qs: [u8; 128]`: 8 sub-blocks of 32, each laid out
/// as an [`iq4_nl`] block, with 6-bit scales offset by 32 (low 4 bits in the nibbles of
/// `scales_l`, high 2 bits in the bit pairs of `scales_h`).
fn iq4_xs(block: &[u8], out: &mut Vec<f32>) {
    let d = half_at(block, 0);
    let scales_high = u16::from_le_bytes([block[2], block[3]]);
    let scales_low = &block[4..8];
    for (sub, qs) in block[8..136].chunks_exact(16).enumerate() {
        let low = (scales_low[sub / 2] >> (4 * (sub % 2))) & 0xF;
        let high = ((scales_high >> (2 * sub)) & 3) as u8;
        iq4_values(d * ((low | high << 4) as i32 - 32) as f32, qs, out);
    }
}

/// 32 elements from 16 bytes of IQ4 nibbles: the low nibbles, then the high ones.
fn iq4_values(scale: f32, qs: &[u8], out: &mut Vec<f32>) {
    let level = |q: u8| scale * IQ4_LEVELS[q as usize] as f32;
    out.extend(qs.iter().map(|&q| level(q & 0xF)));
    out.extend(qs.iter().map(|&q| level(q >> 4)));
}
