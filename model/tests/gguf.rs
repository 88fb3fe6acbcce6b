//! GGUF parsing and dequantisation on the CPU: blocks against the `gguf` Python package's
//! reference dequantiser, a file built here in memory, and malformed files.
use half::{bf16, f16};
use shadowkv_model::{GgmlType, GgufFile, MetadataValue, ModelConfig};

// Generated values, printed exactly as the reference computed them.
#[allow(clippy::excessive_precision)]
mod known_blocks {
    include!("data/known_blocks.rs");
}

fn hex(text: &str) -> Vec<u8> {
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&text[i..i + 2], 16).unwrap())
        .collect()
}

#[test]
fn quantised_blocks_match_the_reference_dequantiser() {
    use known_blocks::*;
    let cases: [(GgmlType, &str, &[f32]); 12] = [
        (GgmlType::Q4_0, Q40_BYTES, &Q40_VALUES),
        (GgmlType::Q4_1, Q41_BYTES, &Q41_VALUES),
        (GgmlType::Q5_0, Q50_BYTES, &Q50_VALUES),
        (GgmlType::Q5_1, Q51_BYTES, &Q51_VALUES),
        (GgmlType::Q8_0, Q80_BYTES, &Q80_VALUES),
        (GgmlType::Q2K, Q2K_BYTES, &Q2K_VALUES),
        (GgmlType::Q3K, Q3K_BYTES, &Q3K_VALUES),
        (GgmlType::Q4K, Q4K_BYTES, &Q4K_VALUES),
        (GgmlType::Q5K, Q5K_BYTES, &Q5K_VALUES),
        (GgmlType::Q6K, Q6K_BYTES, &Q6K_VALUES),
        (GgmlType::IQ4NL, IQ4NL_BYTES, &IQ4NL_VALUES),
        (GgmlType::IQ4XS, IQ4XS_BYTES, &IQ4XS_VALUES),
    ];
    // Every quantised type the reader accepts has a case.
    for ggml_type in GgmlType::SUPPORTED {
        let plain = [GgmlType::F32, GgmlType::F16, GgmlType::BF16].contains(&ggml_type);
        assert!(
            plain || cases.iter().any(|(t, _, _)| *t == ggml_type),
            "{ggml_type:?} has no known blocks"
        );
        assert_eq!(GgmlType::from_id(ggml_type.id()), Some(ggml_type));
    }
    for (ggml_type, bytes, expected) in cases {
        let bytes = hex(bytes);
        assert_eq!(bytes.len(), 2 * ggml_type.block_bytes(), "{ggml_type:?}");
        let mut out = Vec::new();
        ggml_type.dequantize(&bytes, &mut out);
        assert_eq!(out.len(), expected.len(), "{ggml_type:?}");
        for (i, (&got, &want)) in out.iter().zip(expected).enumerate() {
            // The reference computes in f32 too; allow the last bit of a different op order.
            assert!(
                (got - want).abs() <= 1e-6 * want.abs().max(1e-3),
                "{ggml_type:?} element {i}: {got} vs {want}"
            );
        }
    }
}

/// Writes a GGUF v3 file: metadata, then tensors (name, dims, type id, raw bytes).
fn write_gguf(
    metadata: &[(&str, u32, Vec<u8>)],
    tensors: &[(&str, Vec<u64>, u32, Vec<u8>)],
) -> Vec<u8> {
    let string = |s: &str| {
        [
            (s.len() as u64).to_le_bytes().to_vec(),
            s.as_bytes().to_vec(),
        ]
        .concat()
    };
    let mut out = b"GGUF".to_vec();
    out.extend(3u32.to_le_bytes());
    out.extend((tensors.len() as u64).to_le_bytes());
    out.extend((metadata.len() as u64).to_le_bytes());
    for (key, value_type, value) in metadata {
        out.extend(string(key));
        out.extend(value_type.to_le_bytes());
        out.extend(value);
    }
    let mut offset = 0u64;
    for (name, dims, type_id, bytes) in tensors {
        out.extend(string(name));
        out.extend((dims.len() as u32).to_le_bytes());
        dims.iter().for_each(|d| out.extend(d.to_le_bytes()));
        out.extend(type_id.to_le_bytes());
        out.extend(offset.to_le_bytes());
        offset = (offset + bytes.len() as u64).next_multiple_of(32);
    }
    // Each tensor starts at the next multiple of the default alignment (32).
    for (_, _, _, bytes) in tensors {
        out.resize(out.len().next_multiple_of(32), 0);
        out.extend(bytes);
    }
    out
}

fn sample_file() -> Vec<u8> {
    let f32s: Vec<u8> = (0..6)
        .flat_map(|i| (i as f32 * 0.5 - 1.0).to_le_bytes())
        .collect();
    let bf16s: Vec<u8> = (0..4)
        .flat_map(|i| bf16::from_f32(i as f32 - 1.5).to_le_bytes())
        .collect();
    let mut q8 = f16::from_f32(0.25).to_le_bytes().to_vec();
    q8.extend((0..32).map(|i| (i as i8 - 16) as u8));
    let strings = [("a", 1u64), ("bc", 2)]
        .iter()
        .flat_map(|(s, n)| [n.to_le_bytes().to_vec(), s.as_bytes().to_vec()].concat())
        .collect::<Vec<u8>>();
    write_gguf(
        &[
            (
                "general.architecture",
                8,
                [5u64.to_le_bytes().to_vec(), b"llama".to_vec()].concat(),
            ),
            ("llama.block_count", 4, 30u32.to_le_bytes().to_vec()),
            (
                "tokenizer.ggml.tokens",
                9,
                [
                    8u32.to_le_bytes().to_vec(),
                    2u64.to_le_bytes().to_vec(),
                    strings,
                ]
                .concat(),
            ),
        ],
        &[
            ("weights.f32", vec![3, 2], 0, f32s),
            ("weights.bf16", vec![4], 30, bf16s),
            ("weights.q8", vec![32], 8, q8),
        ],
    )
}

#[test]
fn a_file_built_here_reads_back() {
    let file = GgufFile::parse("sample.gguf".into(), sample_file()).unwrap();
    assert_eq!(file.version, 3);
    assert_eq!(
        file.metadata("general.architecture")
            .and_then(|v| v.as_str()),
        Some("llama")
    );
    assert_eq!(
        file.metadata("llama.block_count").and_then(|v| v.as_u64()),
        Some(30)
    );
    assert_eq!(
        file.metadata("tokenizer.ggml.tokens"),
        Some(&MetadataValue::Array(vec![
            MetadataValue::String("a".into()),
            MetadataValue::String("bc".into())
        ]))
    );
    assert_eq!(file.tensor("weights.f32").unwrap().dims, vec![3, 2]);
    assert_eq!(
        file.dequantize("weights.f32").unwrap(),
        vec![-1.0, -0.5, 0.0, 0.5, 1.0, 1.5]
    );
    assert_eq!(
        file.dequantize("weights.bf16").unwrap(),
        vec![-1.5, -0.5, 0.5, 1.5]
    );
    let q8 = file.dequantize("weights.q8").unwrap();
    assert_eq!(q8.len(), 32);
    assert_eq!((q8[0], q8[31]), (-4.0, 3.75));
    let missing = file.dequantize("nope").unwrap_err();
    assert_eq!(missing.tensor.as_deref(), Some("nope"));
}

#[test]
fn every_truncation_is_an_error_not_a_panic() {
    let whole = sample_file();
    for len in 0..whole.len() {
        let error = GgufFile::parse("cut.gguf".into(), whole[..len].to_vec())
            .err()
            .unwrap_or_else(|| panic!("a file cut to {len} bytes parsed"));
        assert_eq!(error.file, "cut.gguf");
        let text = error.to_string();
        assert!(text.starts_with("cut.gguf"), "{text}");
    }
}

#[test]
fn bad_files_say_what_and_where() {
    let mut wrong_magic = sample_file();
    wrong_magic[0] = b'X';
    let error = GgufFile::parse("m.gguf".into(), wrong_magic).err().unwrap();
    assert!(error.reason.contains("magic"), "{error}");

    // IQ2_XXS (id 16): 256 elements in 66 bytes, a type the reader does not dequantise.
    let iq2 = write_gguf(&[], &[("blk.0.attn_q.weight", vec![256], 16, vec![0; 66])]);
    let error = GgufFile::parse("iq2.gguf".into(), iq2).err().unwrap();
    assert_eq!(error.tensor.as_deref(), Some("blk.0.attn_q.weight"));
    assert!(error.reason.contains("IQ2_XXS (id 16)"), "{error}");
    // The message lists what the reader does take.
    assert!(
        error
            .reason
            .contains("Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K"),
        "{error}"
    );
    assert!(error.reason.contains("IQ4_NL, IQ4_XS, BF16"), "{error}");

    let ragged = write_gguf(&[], &[("t", vec![33], 8, vec![0; 68])]);
    let error = GgufFile::parse("r.gguf".into(), ragged).err().unwrap();
    assert!(error.reason.contains("whole number"), "{error}");

    let mut huge_count = sample_file();
    huge_count[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
    let error = GgufFile::parse("h.gguf".into(), huge_count).err().unwrap();
    assert!(error.reason.contains("tensor count"), "{error}");
}

/// Found while fuzzing: a hand-made input with the metadata below crashed the `gguf_parse`
/// target (kept in model/fuzz/corpus/gguf_parse/ as e215783d5f06d6249159763c25e5fdae4ce06d88).
/// Every count was within its own limit (2^24) but their products overflowed `usize`, so
/// `ModelConfig::parameters` panicked (debug) or wrapped (release) on a 448-byte file that
/// `ModelConfig::from_gguf` accepted.
#[test]
fn a_shape_whose_parameter_count_overflows_is_an_error() {
    let u32_value = |v: u32| (4u32, v.to_le_bytes().to_vec());
    let architecture = [5u64.to_le_bytes().to_vec(), b"llama".to_vec()].concat();
    let keys = [
        "llama.embedding_length",
        "llama.block_count",
        "llama.feed_forward_length",
        "llama.attention.head_count",
        "llama.attention.head_count_kv",
        "llama.attention.key_length",
        "llama.vocab_size",
    ];
    let mut metadata = vec![("general.architecture", 8, architecture)];
    for key in keys {
        let (value_type, value) = u32_value(1 << 24);
        metadata.push((key, value_type, value));
    }
    let bytes = write_gguf(&metadata, &[("token_embd.weight", vec![1], 0, vec![0; 4])]);
    let file = GgufFile::parse("huge.gguf".into(), bytes).unwrap();
    let error = ModelConfig::from_gguf(&file).unwrap_err();
    assert_eq!(error.file, "huge.gguf");
    assert!(error.reason.contains("parameters"), "{error}");

    // A config built by hand saturates instead of overflowing.
    let mut config = ModelConfig::named("smollm2-135m").unwrap();
    assert!(config.parameters() > 100_000_000 && config.parameters() < 200_000_000);
    config.layers = usize::MAX;
    assert_eq!(config.parameters(), usize::MAX);
}

#[test]
fn repeated_metadata_keys_and_tensor_names_are_errors() {
    let one = |n: u32| n.to_le_bytes().to_vec();
    let key_twice = write_gguf(
        &[
            ("llama.block_count", 4, one(30)),
            ("llama.block_count", 4, one(2)),
        ],
        &[],
    );
    let error = GgufFile::parse("twice.gguf".into(), key_twice)
        .err()
        .expect("a repeated key is an error");
    assert!(
        error
            .to_string()
            .contains("repeats the metadata key `llama.block_count`"),
        "{error}"
    );
    let f32s: Vec<u8> = [1.0f32, 2.0].iter().flat_map(|v| v.to_le_bytes()).collect();
    let name_twice = write_gguf(
        &[],
        &[("w", vec![2], 0, f32s.clone()), ("w", vec![2], 0, f32s)],
    );
    let error = GgufFile::parse("twice.gguf".into(), name_twice)
        .err()
        .expect("a repeated tensor is an error");
    assert_eq!(error.tensor.as_deref(), Some("w"));
    assert!(error.reason.contains("twice"), "{error}");
}
