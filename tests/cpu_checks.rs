//! Checks that need no GPU: shape and layout validation, split planning, kernel naming and
//! the CPU reference itself.
use half::bf16;
use shadowkv::attention::kernel_layout::{self, tokens_per_iteration};
use shadowkv::kernels::{KernelName, ALL};
use shadowkv::reference::{self, relative_error};
use shadowkv::{DecodeAttentionPlan, DecodeAttentionShape, Error, SequenceLayout};

const LLAMA3: DecodeAttentionShape = DecodeAttentionShape {
    batch: 1,
    q_heads: 32,
    kv_heads: 8,
    head_dim: 128,
};

fn layout(offset: u64, capacity: u32, len: u32) -> SequenceLayout {
    SequenceLayout {
        offset,
        capacity,
        len,
    }
}

fn invalid_argument(result: shadowkv::Result<DecodeAttentionPlan>) -> &'static str {
    match result {
        Err(Error::InvalidArgument {
            argument,
            problem,
            expected,
        }) => {
            assert!(!problem.is_empty() && !expected.is_empty());
            argument
        }
        other => panic!("expected InvalidArgument, got {other:?}"),
    }
}

#[test]
fn every_supported_group_and_head_dim_has_a_compiled_kernel() {
    let mut names = Vec::new();
    for head_dim in kernel_layout::HEAD_DIMS {
        for group in 1..=kernel_layout::MAX_GROUP {
            names.push(kernel_layout::kernel_name(group, head_dim));
            for part in [kernel_layout::RESIDENT_TOKENS, kernel_layout::FRESH_TOKENS] {
                names.push(kernel_layout::part_kernel_name(part, group, head_dim));
            }
            names.push(shadowkv::scoring::kernel_layout::kernel_name(
                group, head_dim,
            ));
            if head_dim == kernel_layout::HEAD_DIMS[0] {
                names.push(shadowkv::topk::kernel_layout::kernel_name(group));
            }
        }
        names.push(shadowkv::rebuild::kernel_layout::kernel_name(head_dim));
    }
    names.extend(
        [
            shadowkv::plan::kernel_layout::KERNEL_NAME,
            shadowkv::fetch::kernel_layout::KERNEL_NAME,
        ]
        .map(String::from),
    );
    for name in &names {
        KernelName::lookup(name).unwrap();
    }
    // Every compiled entry is one a launcher names, and none is missing.
    assert_eq!(ALL.len(), names.len());
    assert!(matches!(
        KernelName::lookup("decode_attention_g9_d128"),
        Err(Error::MissingKernel { .. })
    ));
}

#[test]
fn bad_shapes_name_the_argument() {
    let one = [layout(0, 10, 10)];
    let with =
        |shape: DecodeAttentionShape| invalid_argument(DecodeAttentionPlan::new(shape, &one, 132));
    assert_eq!(
        with(DecodeAttentionShape {
            head_dim: 96,
            ..LLAMA3
        }),
        "head_dim"
    );
    assert_eq!(
        with(DecodeAttentionShape {
            q_heads: 30,
            ..LLAMA3
        }),
        "q_heads"
    );
    assert_eq!(
        with(DecodeAttentionShape {
            q_heads: 0,
            ..LLAMA3
        }),
        "q_heads"
    );
    assert_eq!(
        with(DecodeAttentionShape {
            q_heads: 72,
            ..LLAMA3
        }),
        "group (q_heads / kv_heads)"
    );
    assert_eq!(
        with(DecodeAttentionShape {
            kv_heads: 0,
            ..LLAMA3
        }),
        "kv_heads"
    );
    assert_eq!(with(DecodeAttentionShape { batch: 0, ..LLAMA3 }), "batch");
}

#[test]
fn bad_layouts_name_the_problem() {
    let plan = |layouts: &[SequenceLayout]| {
        invalid_argument(DecodeAttentionPlan::new(LLAMA3, layouts, 132))
    };
    assert_eq!(plan(&[]), "layouts");
    assert_eq!(plan(&[layout(0, 10, 0)]), "layouts");
    assert_eq!(plan(&[layout(0, 10, 11)]), "layouts");
    assert_eq!(plan(&[layout(4, 10, 10)]), "layouts");
    assert_eq!(plan(&[layout(0, 10, 10), layout(0, 10, 10)]), "layouts");
    let overflow = plan(&[layout(u64::MAX - 7, u32::MAX, 1)]);
    assert_eq!(overflow, "layouts");
    let split = DecodeAttentionPlan::with_split_len(LLAMA3, &[layout(0, 10, 10)], 33);
    assert_eq!(invalid_argument(split), "split_len");
    let scale = DecodeAttentionPlan::new(LLAMA3, &[layout(0, 10, 10)], 132)
        .unwrap()
        .with_scale(f32::NAN);
    assert_eq!(invalid_argument(scale), "scale");
}

#[test]
fn planner_fills_the_gpu_with_whole_iterations() {
    for (batch, len) in [(1usize, 131_072u32), (16, 2048), (4, 8192), (1, 7)] {
        let shape = DecodeAttentionShape { batch, ..LLAMA3 };
        let layouts: Vec<_> = (0..batch)
            .map(|b| layout((b * 8 * len as usize * 128) as u64, len, len))
            .collect();
        let plan = DecodeAttentionPlan::new(shape, &layouts, 132).unwrap();
        let step = tokens_per_iteration(4, 128);
        assert_eq!(plan.split_len() % step, 0);
        assert_eq!(plan.max_splits(), len.div_ceil(plan.split_len()));
        let blocks = plan.max_splits() as usize * 8 * batch;
        if len >= 2048 {
            assert!(blocks >= 132 * 3 / 2, "{batch}x{len}: only {blocks} blocks");
        }
        assert_eq!(plan.kv_elements(), batch * 8 * len as usize * 128);
        assert_eq!(plan.kv_bytes_read(), 2 * batch * len as usize * 8 * 128 * 2);
    }
}

#[test]
fn reference_of_identical_keys_is_the_mean_value() {
    let shape = DecodeAttentionShape {
        batch: 1,
        q_heads: 2,
        kv_heads: 1,
        head_dim: 64,
    };
    let len = 5;
    let q: Vec<bf16> = (0..128).map(|i| bf16::from_f32(i as f32 * 0.01)).collect();
    let k = vec![bf16::from_f32(0.5); len * 64];
    let v: Vec<bf16> = (0..len * 64)
        .map(|i| bf16::from_f32((i / 64) as f32))
        .collect();
    let out = reference::attention::decode_attention(
        &shape,
        &[layout(0, len as u32, len as u32)],
        &q,
        &k,
        &v,
        0.125,
    );
    assert!(out.iter().all(|&x| (x - 2.0).abs() < 1e-12), "{out:?}");
}

#[test]
fn relative_error_flags_nan_and_length_mismatch() {
    assert_eq!(relative_error(&[1.0, 2.0], &[1.0, 2.0]), 0.0);
    assert!((relative_error(&[1.0, 0.0], &[0.0, 1.0]) - 2f64.sqrt()).abs() < 1e-12);
    assert_eq!(relative_error(&[f64::NAN], &[1.0]), f64::INFINITY);
    assert_eq!(relative_error(&[1.0], &[1.0, 2.0]), f64::INFINITY);
}
