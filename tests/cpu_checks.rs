//! Checks that need no GPU: shape and layout validation, split planning, kernel naming and
//! the CPU reference itself.
use half::bf16;
use shadowkv::kernels::attention::kernel_layout::{self, tokens_per_iteration, MAX_SPLITS};
use shadowkv::ptx::{KernelName, ALL};
use shadowkv::reference::{self, relative_error};
use shadowkv::{DecodeAttentionPlan, DecodeAttentionShape, Error, SequenceLayout};

/// Blocks of the Llama-3 decode-attention kernel an H100 runs at once (3 per SM at 168
/// registers, 132 SMs): what `DecodeAttentionPlan::for_gpu` passes there.
const H100_RESIDENT: u32 = 396;

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
        for group in 1..=kernel_layout::MAX_KERNEL_GROUP {
            if !kernel_layout::has_kernel(group, head_dim) {
                continue;
            }
            names.push(kernel_layout::kernel_name(group, head_dim));
            for part in [kernel_layout::RESIDENT_TOKENS, kernel_layout::FRESH_TOKENS] {
                names.push(kernel_layout::part_kernel_name(part, group, head_dim));
            }
            names.push(shadowkv::kernels::scoring::kernel_layout::kernel_name(
                group, head_dim,
            ));
            if head_dim == kernel_layout::HEAD_DIMS[0] {
                names.push(shadowkv::kernels::topk::kernel_layout::kernel_name(group));
            }
        }
        // Group 16: decode attention runs the group-8 kernels; scoring has its own.
        if kernel_layout::has_kernel(kernel_layout::MAX_GROUP, head_dim) {
            names.push(shadowkv::kernels::scoring::kernel_layout::kernel_name(
                kernel_layout::MAX_GROUP,
                head_dim,
            ));
        }
        if head_dim == kernel_layout::HEAD_DIMS[0] {
            names.push(shadowkv::kernels::topk::kernel_layout::kernel_name(
                kernel_layout::MAX_GROUP,
            ));
        }
        names.push(shadowkv::kernels::rebuild::kernel_layout::kernel_name(
            head_dim,
        ));
        names.push(
            shadowkv::kernels::shadow_prefill::kernel_layout::chunk_statistics_name(head_dim),
        );
        for warps in shadowkv::kernels::prefill_attention::kernel_layout::WARP_COUNTS {
            // Heads past 128 have one warp count.
            if head_dim > 128
                && warps != shadowkv::kernels::prefill_attention::kernel_layout::warps(head_dim)
            {
                continue;
            }
            for split_p in [true, false] {
                names.push(
                    shadowkv::kernels::prefill_attention::kernel_layout::kernel_name_for(
                        head_dim, warps, split_p,
                    ),
                );
            }
        }
    }
    names.extend(
        [
            shadowkv::kernels::plan::kernel_layout::KERNEL_NAME,
            shadowkv::kernels::scripted_selection::kernel_layout::KERNEL_NAME,
            shadowkv::kernels::fetch::kernel_layout::KERNEL_NAME,
            shadowkv::kernels::fetch::kernel_layout::FP8_KERNEL,
            shadowkv::kernels::fetch::kernel_layout::INT4_KERNEL,
            shadowkv::kernels::values::kernel_layout::QUANTISE_FP8_KERNEL,
            shadowkv::kernels::values::kernel_layout::QUANTISE_INT4_KERNEL,
            shadowkv::kernels::layer::kernel_layout::EMBEDDING_KERNEL,
            shadowkv::kernels::layer::kernel_layout::RMS_NORM_KERNEL,
            shadowkv::kernels::layer::kernel_layout::ROPE_QKV_KERNEL,
            shadowkv::kernels::layer::kernel_layout::GATED_ACTIVATION_KERNEL,
            shadowkv::kernels::sampling::kernel_layout::ARGMAX_KERNEL,
            shadowkv::kernels::random::kernel_layout::KERNEL_NAME,
            shadowkv::kernels::shadow_prefill::kernel_layout::OUTLIER_SELECT,
            shadowkv::kernels::shadow_prefill::kernel_layout::LANDMARK_GATHER,
            shadowkv::kernels::shadow_prefill::kernel_layout::EXACT_GATHER,
            shadowkv::kernels::factorise::kernel_layout::KERNEL_NAME,
            shadowkv::cache::kernel_layout::KERNEL_NAME,
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

/// The generated family functions that the launchers use name the same kernels as the
/// naming functions of the kernel crate.
#[test]
fn family_functions_agree_with_the_kernel_names() {
    use shadowkv::kernels::{prefill_attention, rebuild, scoring, shadow_prefill, topk};
    use shadowkv::ptx;
    for head_dim in kernel_layout::HEAD_DIMS {
        for group in 1..=kernel_layout::MAX_KERNEL_GROUP {
            if !kernel_layout::has_kernel(group, head_dim) {
                continue;
            }
            let name = |kernel: shadowkv::Result<KernelName>| kernel.unwrap().as_str();
            assert_eq!(
                name(ptx::decode_attention(group, head_dim)),
                kernel_layout::kernel_name(group, head_dim)
            );
            assert_eq!(
                name(ptx::decode_attention_resident(group, head_dim)),
                kernel_layout::part_kernel_name(kernel_layout::RESIDENT_TOKENS, group, head_dim)
            );
            assert_eq!(
                name(ptx::decode_attention_fresh(group, head_dim)),
                kernel_layout::part_kernel_name(kernel_layout::FRESH_TOKENS, group, head_dim)
            );
            assert_eq!(
                name(ptx::landmark_scoring(group, head_dim)),
                scoring::kernel_layout::kernel_name(group, head_dim)
            );
            assert_eq!(
                name(ptx::topk_select(group)),
                topk::kernel_layout::kernel_name(group)
            );
        }
        assert_eq!(
            ptx::key_rebuild(head_dim).unwrap().as_str(),
            rebuild::kernel_layout::kernel_name(head_dim)
        );
        assert_eq!(
            ptx::chunk_statistics(head_dim).unwrap().as_str(),
            shadow_prefill::kernel_layout::chunk_statistics_name(head_dim)
        );
        assert_eq!(
            ptx::prefill_attention(head_dim).unwrap().as_str(),
            prefill_attention::kernel_layout::kernel_name(head_dim)
        );
    }
    assert!(matches!(
        ptx::decode_attention(1, 96),
        Err(Error::MissingKernel { .. })
    ));
}

#[test]
fn bad_shapes_name_the_argument() {
    let one = [layout(0, 10, 10)];
    let with = |shape: DecodeAttentionShape| {
        invalid_argument(DecodeAttentionPlan::new(shape, &one, H100_RESIDENT))
    };
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
        invalid_argument(DecodeAttentionPlan::new(LLAMA3, layouts, H100_RESIDENT))
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
    // More splits than the merge holds.
    let long = layout(0, 300 * 32, 300 * 32);
    let too_many = DecodeAttentionPlan::with_split_len(LLAMA3, &[long], 32);
    assert_eq!(invalid_argument(too_many), "split_len");
    let one_head = DecodeAttentionShape {
        q_heads: 4,
        kv_heads: 1,
        ..LLAMA3
    };
    let capped = DecodeAttentionPlan::new(one_head, &[layout(0, 1 << 20, 1 << 20)], 100_000);
    assert_eq!(capped.unwrap().max_splits(), MAX_SPLITS);
    let scale = DecodeAttentionPlan::new(LLAMA3, &[layout(0, 10, 10)], H100_RESIDENT)
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
        let plan = DecodeAttentionPlan::new(shape, &layouts, H100_RESIDENT).unwrap();
        let step = tokens_per_iteration(4, 128);
        assert_eq!(plan.split_len() % step, 0);
        assert_eq!(plan.max_splits(), len.div_ceil(plan.split_len()));
        let blocks = plan.max_splits() * 8 * batch as u32;
        if len >= 2048 {
            // About one wave: within a row of blocks (8 KV heads x batch) of the target.
            let row = 8 * batch as u32;
            assert!(
                blocks + row >= H100_RESIDENT && blocks <= H100_RESIDENT + row,
                "{batch}x{len}: {blocks} blocks for {H100_RESIDENT} resident"
            );
        }
        assert!(plan.max_splits() <= MAX_SPLITS);
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

const SMOLLM2_PREFILL: shadowkv::PrefillAttentionShape = shadowkv::PrefillAttentionShape {
    tokens: 100,
    q_heads: 9,
    kv_heads: 3,
    head_dim: 64,
};

fn queries(query_offset: u32, query_len: u32, start: u32) -> shadowkv::QueryPlacement {
    shadowkv::QueryPlacement {
        query_offset,
        query_len,
        start,
    }
}

fn prefill_invalid(
    shape: shadowkv::PrefillAttentionShape,
    layouts: &[SequenceLayout],
    placements: &[shadowkv::QueryPlacement],
) -> &'static str {
    match shadowkv::PrefillAttentionPlan::new(shape, layouts, placements) {
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
fn prefill_plan_rejects_bad_input_naming_the_argument() {
    let shape = SMOLLM2_PREFILL;
    let one = [layout(0, 128, 100)];
    let all = [queries(0, 100, 0)];
    let with = |shape| prefill_invalid(shape, &one, &all);
    assert_eq!(
        with(shadowkv::PrefillAttentionShape {
            head_dim: 96,
            ..shape
        }),
        "head_dim"
    );
    assert_eq!(
        with(shadowkv::PrefillAttentionShape {
            q_heads: 10,
            ..shape
        }),
        "q_heads"
    );
    assert_eq!(
        // Group 17: past the largest (16).
        with(shadowkv::PrefillAttentionShape {
            q_heads: 51,
            ..shape
        }),
        "group (q_heads / kv_heads)"
    );
    assert_eq!(
        with(shadowkv::PrefillAttentionShape {
            kv_heads: 0,
            ..shape
        }),
        "kv_heads"
    );
    assert_eq!(
        with(shadowkv::PrefillAttentionShape { tokens: 0, ..shape }),
        "tokens"
    );
    // Layouts: count, len past capacity, unaligned offset.
    assert_eq!(prefill_invalid(shape, &[], &[]), "layouts");
    assert_eq!(
        prefill_invalid(shape, &[layout(0, 99, 100)], &all),
        "layouts"
    );
    assert_eq!(
        prefill_invalid(shape, &[layout(4, 128, 100)], &all),
        "layouts"
    );
    // Queries: count, rows past q, keys not in the cache yet, overlapping sequences.
    assert_eq!(prefill_invalid(shape, &one, &[]), "queries");
    assert_eq!(
        prefill_invalid(shape, &one, &[queries(1, 100, 0)]),
        "queries"
    );
    assert_eq!(
        prefill_invalid(shape, &one, &[queries(0, 100, 1)]),
        "queries"
    );
    let two = [layout(0, 128, 100), layout(3 * 128 * 64, 128, 100)];
    assert_eq!(
        prefill_invalid(shape, &two, &[queries(0, 50, 0), queries(49, 50, 0)]),
        "queries"
    );
    assert!(shadowkv::PrefillAttentionPlan::new(
        shape,
        &two,
        &[queries(0, 50, 50), queries(50, 50, 0)]
    )
    .is_ok());
    let plan = shadowkv::PrefillAttentionPlan::new(shape, &one, &all).unwrap();
    assert!(matches!(
        plan.clone().with_scale(f32::NAN),
        Err(Error::InvalidArgument {
            argument: "scale",
            ..
        })
    ));
    assert!(matches!(
        plan.clone().with_warps(5),
        Err(Error::InvalidArgument {
            argument: "warps",
            ..
        })
    ));
    assert!(matches!(
        plan.with_scale(0.0),
        Err(Error::InvalidArgument {
            argument: "scale",
            ..
        })
    ));
}

#[test]
fn prefill_plan_counts_tiles_and_causal_flops() {
    let shape = shadowkv::PrefillAttentionShape {
        tokens: 4096 + 10,
        q_heads: 32,
        kv_heads: 8,
        head_dim: 128,
    };
    let layouts = [layout(0, 4096, 4096), layout(8 * 4096 * 128, 64, 60)];
    let placements = [queries(0, 4096, 0), queries(4096, 10, 50)];
    let plan = shadowkv::PrefillAttentionPlan::new(shape, &layouts, &placements).unwrap();
    let rows =
        shadowkv::kernels::prefill_attention::kernel_layout::block_rows(plan.warps()) as usize;
    assert_eq!(plan.tiles(), (4096 * 4usize).div_ceil(rows) + 1);
    let pairs = 4096.0 * 4097.0 / 2.0 + (10.0 * 50.0 + 10.0 * 11.0 / 2.0);
    assert_eq!(plan.causal_flops(), 4.0 * 128.0 * 32.0 * pairs);
    assert_eq!(plan.kv_elements(), 8 * 4096 * 128 + 8 * 64 * 128);
    // Either warp count: blocks of its rows.
    for warps in shadowkv::kernels::prefill_attention::kernel_layout::WARP_COUNTS {
        let plan = plan.clone().with_warps(warps).unwrap();
        let rows = shadowkv::kernels::prefill_attention::kernel_layout::block_rows(warps) as usize;
        assert_eq!(plan.warps(), warps);
        assert_eq!(plan.tiles(), (4096 * 4usize).div_ceil(rows) + 1);
    }
    // A sequence with no new tokens has no tiles; a plan may have none at all.
    let idle = shadowkv::PrefillAttentionPlan::new(
        SMOLLM2_PREFILL,
        &[layout(0, 128, 100)],
        &[queries(0, 0, 100)],
    )
    .unwrap();
    assert_eq!(idle.tiles(), 0);
}

#[test]
fn prefill_reference_of_the_last_query_is_decode_attention() {
    // The last query of a prompt sees every cached token: decode attention over `len`; at
    // every head dimension the kernels take.
    for head_dim in [64usize, 128, 256] {
        let len = 37usize;
        let decode_shape = DecodeAttentionShape {
            batch: 1,
            q_heads: 6,
            kv_heads: 2,
            head_dim,
        };
        let prefill_shape = shadowkv::PrefillAttentionShape {
            tokens: 3,
            q_heads: 6,
            kv_heads: 2,
            head_dim,
        };
        let value = |i: usize| bf16::from_f32(((i * 7919) % 211) as f32 / 105.0 - 1.0);
        let k: Vec<bf16> = (0..2 * len * head_dim).map(value).collect();
        let v: Vec<bf16> = (0..2 * len * head_dim).map(|i| value(i + 5)).collect();
        let q: Vec<bf16> = (0..3 * 6 * head_dim).map(|i| value(i + 11)).collect();
        let layouts = [layout(0, len as u32, len as u32)];
        let prefill = reference::prefill_attention::prefill_attention(
            &prefill_shape,
            &layouts,
            &[queries(0, 3, len as u32 - 3)],
            &q,
            &k,
            &v,
            0.125,
        );
        let last = &q[2 * 6 * head_dim..];
        let decode =
            reference::attention::decode_attention(&decode_shape, &layouts, last, &k, &v, 0.125);
        let prefill_last = &prefill[2 * 6 * head_dim..];
        assert!(relative_error(prefill_last, &decode) < 1e-12);
        // The first query sees one key fewer than the second.
        let first_alone = reference::attention::decode_attention(
            &decode_shape,
            &[layout(0, len as u32, len as u32 - 2)],
            &q[..6 * head_dim],
            &k,
            &v,
            0.125,
        );
        assert!(relative_error(&prefill[..6 * head_dim], &first_alone) < 1e-12);
    }
}

#[test]
fn topk_clusters_only_long_sequences_at_small_batches() {
    use shadowkv::kernels::topk::kernel_layout::{block_landmarks, cluster_blocks, shared_scores};
    // H100: 132 SMs; Llama-3-8B has 8 KV heads per sequence.
    assert_eq!(cluster_blocks(132, 8, 4_040), 1, "32K tokens: one block");
    assert_eq!(cluster_blocks(132, 8, 15_304), 4, "122K tokens: four");
    assert_eq!(
        cluster_blocks(132, 8, 131_016),
        8,
        "1M tokens at batch 1: eight"
    );
    assert_eq!(
        cluster_blocks(132, 32, 131_016),
        4,
        "batch 4: the idle SMs allow four"
    );
    assert_eq!(
        cluster_blocks(132, 128, 131_016),
        1,
        "batch 16: no idle SMs"
    );
    assert_eq!(cluster_blocks(132, 0, 0), 1);
    // Eight blocks of a 131,016-landmark sequence each stage their range in shared memory.
    assert_eq!(block_landmarks(131_016, 8), 16_377);
    assert_eq!(shared_scores(131_016, 8), 16_377);
    assert_eq!(
        shared_scores(131_016, 1),
        0,
        "past shared memory: scores stay global"
    );
}

/// The rebuild's RoPE check (also run by `DecodeStep::new`): partial rotary with adjacent
/// pairs, whole-head rotate-half; partial rotate-half, odd or oversized rotary parts, a bad
/// pairing or attention factor and a frequency table of the wrong length are refused.
#[test]
fn rebuild_rotary_layouts_are_checked() {
    use shadowkv::kernels::rebuild::check_rebuild_rotary;
    use shadowkv::{RopeConfig, RopePairing, RotaryLayout};
    let glm = RopeConfig {
        rotary_dim: 64,
        pairing: RopePairing::Adjacent,
        ..RopeConfig::new(10_000.0)
    };
    assert!(check_rebuild_rotary(&glm.layout(128), 128, 32).is_ok());
    assert!(check_rebuild_rotary(&RotaryLayout::full(128), 128, 64).is_ok());
    let partial_halves = RopeConfig {
        rotary_dim: 64,
        ..RopeConfig::new(10_000.0)
    };
    let bad = [
        (partial_halves.layout(128), 32, "rotary.rotary_dim"),
        (RotaryLayout::full(128), 32, "inverse_frequencies"),
        (
            RotaryLayout {
                rotary_dim: 130,
                ..RotaryLayout::full(128)
            },
            65,
            "rotary.rotary_dim",
        ),
        (
            RotaryLayout {
                pairing: 2,
                ..RotaryLayout::full(128)
            },
            64,
            "rotary.pairing",
        ),
        (
            RotaryLayout {
                attention_factor: f32::NAN,
                ..RotaryLayout::full(128)
            },
            64,
            "rotary.attention_factor",
        ),
    ];
    for (layout, frequencies, argument) in bad {
        match check_rebuild_rotary(&layout, 128, frequencies) {
            Err(Error::InvalidArgument { argument: a, .. }) if a == argument => {}
            other => panic!("{layout:?}: expected {argument} refused, got {other:?}"),
        }
    }
}
