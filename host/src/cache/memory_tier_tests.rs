//! The planner's arithmetic for the GPU value tier.
use super::*;
use shadowkv_kernels::tier::entry_bytes;

fn setup() -> (CacheShape, ShadowKvParams, CacheCapacity) {
    (
        CacheShape::LLAMA_3_8B,
        ShadowKvParams::default(),
        CacheCapacity::uniform(4, 122_880, 256),
    )
}

/// The tier adds `layers * sequences * Hkv * chunks_per_head` entries of the format's
/// chunk (16-byte aligned) and a tag each to the GPU side; the host side is the values'.
#[test]
fn the_report_counts_the_tier_on_the_gpu() {
    let (shape, params, capacity) = setup();
    for format in ValueFormat::ALL {
        let host = memory_for(
            &shape,
            &params,
            ValueHome::Host.with_format(format),
            &capacity,
        )
        .unwrap();
        let tiered = memory_for(
            &shape,
            &params,
            ValueHome::Tiered {
                chunks_per_head: 1000,
            }
            .with_format(format),
            &capacity,
        )
        .unwrap();
        assert_eq!(tiered.host, host.host, "{format:?}");
        let entry = entry_bytes(format, 8, 128) as u64 + 4;
        let tier = 32 * 4 * 8 * 1000 * entry;
        assert_eq!(tiered.gpu_bytes(), host.gpu_bytes() + tier, "{format:?}");
        assert!(tiered.gpu.contains(&("value tier", tier)));
    }
}

/// Sizing from bytes gives the largest tier that fits, capped at the prompt's chunks (the
/// tier that holds everything), and refuses a size with no room for one chunk per head.
#[test]
fn tier_sizing_from_bytes() {
    let (shape, params, capacity) = setup();
    let storage = ValueHome::Host.with_format(ValueFormat::Int4);
    let per_chunk = 32 * 4 * 8 * (576 + 4);
    for bytes in [per_chunk, per_chunk * 1000 + 17, 20u64 << 30] {
        let chunks = tier_chunks_for(&shape, &params, storage, &capacity, bytes).unwrap();
        let report = |chunks_per_head| {
            memory_for(
                &shape,
                &params,
                ValueHome::Tiered { chunks_per_head }.with_format(ValueFormat::Int4),
                &capacity,
            )
            .unwrap()
            .gpu
            .into_iter()
            .find(|(label, _)| *label == "value tier")
            .unwrap()
            .1
        };
        assert!(report(chunks) <= bytes);
        let longest = params.prompt_chunks(122_880) as u64;
        assert_eq!(chunks as u64, (bytes / per_chunk).min(longest));
    }
    // 1 TiB holds every chunk of 4 x 122K: capped at the prompt's chunks.
    let all = tier_chunks_for(&shape, &params, storage, &capacity, 1 << 40).unwrap();
    assert_eq!(all, params.prompt_chunks(122_880));
    let error = tier_chunks_for(&shape, &params, storage, &capacity, per_chunk - 1)
        .unwrap_err()
        .to_string();
    assert!(
        error.contains("holds no chunk") && error.contains(&format!("at least {per_chunk} bytes")),
        "{error}"
    );
}

/// A zero-size tier and one larger than the prompt's chunks are refused; a tier that does not
/// fit the GPU says how large a tier fits beside the sequences asked for.
#[test]
fn bad_tiers_are_refused_with_what_fits() {
    let (shape, params, capacity) = setup();
    let tiered = |chunks_per_head| ValueHome::Tiered { chunks_per_head }.into();
    let zero = memory_for(&shape, &params, tiered(0), &capacity)
        .unwrap_err()
        .to_string();
    assert!(zero.contains("no entries"), "{zero}");
    let chunks = params.prompt_chunks(122_880);
    memory_for(&shape, &params, tiered(chunks), &capacity).unwrap();
    let big = memory_for(&shape, &params, tiered(chunks + 1), &capacity)
        .unwrap_err()
        .to_string();
    assert!(
        big.contains(&format!("at most the longest prompt's {chunks} chunks")),
        "{big}"
    );

    let free = 30u64 << 30;
    let error = check_fits(&shape, &params, tiered(chunks), &capacity, free, None)
        .unwrap_err()
        .to_string();
    let fits =
        tier_chunks_in_free(&shape, &params, ValueHome::Host.into(), &capacity, free).unwrap();
    assert!(
        error.contains(&format!(
            "a value tier of at most {fits} chunks per KV head fits"
        )),
        "{error}"
    );
    check_fits(&shape, &params, tiered(fits), &capacity, free, None).unwrap();
    assert!(check_fits(&shape, &params, tiered(fits + 1), &capacity, free, None).is_err());
}

/// The planner counts the tier: fewer sequences fit beside it, and a tier holding every
/// chunk on the GPU costs about what the values on the GPU do.
#[test]
fn the_planner_counts_the_tier() {
    let (shape, params, _) = setup();
    let plan_with = |home: ValueHome| {
        plan(
            &shape,
            &params,
            home.into(),
            122_880,
            256,
            100 << 30,
            1 << 40,
        )
        .unwrap()
        .sequences
    };
    let host = plan_with(ValueHome::Host);
    let device = plan_with(ValueHome::Device);
    let tiered = plan_with(ValueHome::Tiered {
        chunks_per_head: 3072,
    });
    let everything = plan_with(ValueHome::Tiered {
        chunks_per_head: params.prompt_chunks(122_880),
    });
    assert!(tiered < host && tiered > device, "{host} {tiered} {device}");
    assert!(
        everything <= device + 1 && everything + 1 >= device,
        "{everything} {device}"
    );
}
