//! The bookkeeping of the GPU backend, on the CPU: which sequences are exact and which go
//! through their shadow, which full-cache block each holds and when it is free again, how a
//! decode batch splits into the two kinds of call and merges back in the batch's order, and
//! every error decided before the GPU runs (each one changing nothing).
use shadowkv_model::roster::{DecodePlan, ExactRow, Finish, Piece, ShadowRow};
use shadowkv_model::{
    CacheMode, Error, Placement, RequestId, RequestProblem, Roster, ShadowKvParams,
};

/// 2-token chunks, a budget of 2 chunks, one local chunk: a prompt needs 18 tokens for its
/// 8 selectable chunks; 17 is too short and stays exact.
const SPARSE: ShadowKvParams = ShadowKvParams {
    chunk_size: 2,
    sparse_budget: 4,
    rank: 16,
    local_chunks: 1,
    outlier_chunks: 1,
};

const SLOTS: usize = 3;
const SLOT_TOKENS: usize = 64;
const MAX_GENERATED: usize = 8;

fn roster() -> Roster {
    Roster::new(SLOTS, SLOT_TOKENS, Some(SPARSE), MAX_GENERATED)
}

fn problem(result: Result<impl std::fmt::Debug, Error>) -> RequestProblem {
    match result {
        Err(Error::Request { problem, .. }) => problem,
        other => panic!("expected a request error, got {other:?}"),
    }
}

/// Adds `id` in `mode`, feeds `prompt` tokens in one piece and closes the prompt.
fn prefilled(roster: &mut Roster, id: u64, mode: CacheMode, prompt: usize) -> Finish {
    let id = RequestId(id);
    roster.add(id, mode, None).unwrap();
    roster.plan_piece(id, prompt).unwrap();
    roster.piece_done(id, prompt);
    let finish = roster.plan_finish(id).unwrap();
    roster.finish_done(id, finish.build_shadow);
    finish
}

#[test]
fn long_shadowkv_prompts_get_shadows_and_the_rest_stay_exact() {
    let mut roster = roster();
    let shadow = CacheMode::ShadowKv(SPARSE);
    let long = prefilled(&mut roster, 0, shadow, 18);
    let short = prefilled(&mut roster, 1, shadow, 17);
    let full = prefilled(&mut roster, 2, CacheMode::Full, 40);
    assert_eq!(
        (long.build_shadow, short.build_shadow, full.build_shadow),
        (true, false, false)
    );
    assert_eq!(
        roster.seat(RequestId(0)).unwrap().placement,
        Placement::Shadow
    );
    // The shadow sequence gave its block back when its prompt closed; the lowest free block
    // goes first.
    assert_eq!(
        roster.seat(RequestId(1)).unwrap().placement,
        Placement::Exact { slot: 0 }
    );
    assert_eq!(
        roster.seat(RequestId(2)).unwrap().placement,
        Placement::Exact { slot: 1 }
    );
    assert_eq!(roster.free_slots(), 1);
    assert_eq!(roster.add(RequestId(3), shadow, None).unwrap(), 2);
    assert_eq!(
        roster.seat(RequestId(3)).unwrap().placement,
        Placement::Prompt {
            slot: 2,
            shadow: true
        }
    );
}

#[test]
fn pieces_go_after_what_the_block_holds_and_blocks_are_reused() {
    let mut roster = roster();
    let id = RequestId(0);
    assert_eq!(
        roster.add(id, CacheMode::Full, Some(SLOT_TOKENS)).unwrap(),
        0
    );
    for (start, tokens) in [(0, 5), (5, 1), (6, 10)] {
        assert_eq!(
            roster.plan_piece(id, tokens).unwrap(),
            Piece {
                slot: 0,
                start,
                shadow: false
            }
        );
        roster.piece_done(id, tokens);
    }
    assert_eq!(roster.seat(id).unwrap().tokens, 16);
    assert_eq!(roster.remove(id).unwrap().prompt, 16);
    assert_eq!(roster.remove(id), None);
    assert_eq!(roster.free_slots(), SLOTS);
    assert_eq!(roster.add(RequestId(1), CacheMode::Full, None).unwrap(), 0);
    for id in 2..=3 {
        roster.add(RequestId(id), CacheMode::Full, None).unwrap();
    }
    assert_eq!(
        problem(roster.add(RequestId(4), CacheMode::Full, None)),
        RequestProblem::NoRoom { places: SLOTS }
    );
    roster.remove(RequestId(2));
    assert_eq!(roster.add(RequestId(4), CacheMode::Full, None).unwrap(), 1);
}

#[test]
fn additions_it_cannot_serve_are_refused_and_change_nothing() {
    let mut roster = roster();
    roster.add(RequestId(0), CacheMode::Full, None).unwrap();
    assert_eq!(
        problem(roster.add(RequestId(0), CacheMode::Full, None)),
        RequestProblem::Live
    );
    let other = ShadowKvParams {
        sparse_budget: 8,
        ..SPARSE
    };
    assert!(matches!(
        problem(roster.add(RequestId(1), CacheMode::ShadowKv(other), None)),
        RequestProblem::Mode { .. }
    ));
    let mut full_only = Roster::new(1, SLOT_TOKENS, None, 0);
    assert!(matches!(
        problem(full_only.add(RequestId(1), CacheMode::ShadowKv(SPARSE), None)),
        RequestProblem::Mode { .. }
    ));
    assert_eq!(
        problem(roster.add(RequestId(1), CacheMode::Full, Some(SLOT_TOKENS + 1))),
        RequestProblem::PastCapacity {
            capacity: SLOT_TOKENS,
            given: SLOT_TOKENS + 1
        }
    );
    assert_eq!(roster.live(), [RequestId(0)]);
    assert_eq!(roster.free_slots(), SLOTS - 1);
}

#[test]
fn bad_pieces_and_closes_are_refused_and_change_nothing() {
    let mut roster = roster();
    let id = RequestId(1);
    assert_eq!(problem(roster.plan_piece(id, 3)), RequestProblem::Unknown);
    roster.add(id, CacheMode::ShadowKv(SPARSE), None).unwrap();
    assert!(matches!(
        roster.plan_finish(id),
        Err(Error::InvalidInput {
            argument: "prompt",
            ..
        })
    ));
    assert!(matches!(
        roster.plan_piece(id, 0),
        Err(Error::InvalidInput {
            argument: "tokens",
            ..
        })
    ));
    roster.plan_piece(id, 60).unwrap();
    roster.piece_done(id, 60);
    assert_eq!(
        problem(roster.plan_piece(id, 5)),
        RequestProblem::PastCapacity {
            capacity: SLOT_TOKENS,
            given: 65
        }
    );
    assert_eq!(roster.seat(id).unwrap().tokens, 60);
    let finish = roster.plan_finish(id).unwrap();
    roster.finish_done(id, finish.build_shadow);
    assert_eq!(
        problem(roster.plan_piece(id, 1)),
        RequestProblem::PromptComplete
    );
    assert_eq!(
        problem(roster.plan_finish(id)),
        RequestProblem::PromptComplete
    );
    roster.remove(id);
    // A lower id than the newest that is not live has finished; a higher one is unknown.
    assert_eq!(problem(roster.plan_piece(id, 1)), RequestProblem::Finished);
    assert_eq!(
        problem(roster.plan_piece(RequestId(0), 1)),
        RequestProblem::Finished
    );
    assert_eq!(
        problem(roster.plan_piece(RequestId(2), 1)),
        RequestProblem::Unknown
    );
}

#[test]
fn a_mixed_batch_splits_by_kind_and_merges_in_the_batch_order() {
    let mut roster = roster();
    let shadow = CacheMode::ShadowKv(SPARSE);
    prefilled(&mut roster, 0, shadow, 30);
    prefilled(&mut roster, 1, CacheMode::Full, 5);
    prefilled(&mut roster, 2, shadow, 17);
    prefilled(&mut roster, 3, shadow, 40);
    let batch = [
        (RequestId(3), 30),
        (RequestId(2), 20),
        (RequestId(0), 0),
        (RequestId(1), 10),
    ];
    let plan = roster.plan_decode(&batch).unwrap();
    assert_eq!(
        plan,
        DecodePlan {
            exact: vec![
                ExactRow {
                    position: 1,
                    id: RequestId(2),
                    slot: 1,
                    token: 20
                },
                ExactRow {
                    position: 3,
                    id: RequestId(1),
                    slot: 0,
                    token: 10
                },
            ],
            shadow: vec![
                ShadowRow {
                    position: 0,
                    id: RequestId(3),
                    token: 30
                },
                ShadowRow {
                    position: 2,
                    id: RequestId(0),
                    token: 0
                },
            ],
        }
    );
    // Each row's logits are its token's id repeated: the merge must put them back in order.
    let vocab = 3;
    let rows = |rows: Vec<u32>| -> Vec<f32> { rows.iter().flat_map(|&t| [t as f32; 3]).collect() };
    let exact = rows(plan.exact.iter().map(|r| r.token).collect());
    let shadowed = rows(plan.shadow.iter().map(|r| r.token).collect());
    let merged = plan.merge(vocab, &exact, &shadowed).unwrap();
    let tokens: Vec<f32> = merged.iter().map(|logits| logits[0]).collect();
    assert_eq!(tokens, [30.0, 20.0, 0.0, 10.0]);
    assert!(merged.iter().all(|logits| logits.len() == vocab));
    assert!(plan.merge(vocab, &exact[1..], &shadowed).is_err());
    assert!(plan.merge(vocab, &exact, &[]).is_err());
    // Only the kinds that ran advance.
    roster.exact_done(&plan);
    assert_eq!(roster.seat(RequestId(1)).unwrap().tokens, 6);
    assert_eq!(roster.seat(RequestId(2)).unwrap().tokens, 18);
    assert_eq!(roster.seat(RequestId(0)).unwrap().tokens, 30);
    roster.shadow_done(&plan);
    assert_eq!(roster.seat(RequestId(0)).unwrap().tokens, 31);
    assert_eq!(roster.seat(RequestId(3)).unwrap().tokens, 41);
    // A batch of one kind has nothing of the other.
    let plan = roster.plan_decode(&[(RequestId(1), 4)]).unwrap();
    assert!(plan.shadow.is_empty());
    assert_eq!(
        plan.merge(vocab, &[1.0, 2.0, 3.0], &[]).unwrap(),
        [vec![1.0, 2.0, 3.0]]
    );
}

#[test]
fn bad_decode_batches_are_refused_and_change_nothing() {
    let mut roster = roster();
    prefilled(&mut roster, 0, CacheMode::ShadowKv(SPARSE), 30);
    prefilled(&mut roster, 1, CacheMode::Full, SLOT_TOKENS - 1);
    roster.add(RequestId(2), CacheMode::Full, None).unwrap();
    assert!(matches!(
        roster.plan_decode(&[]),
        Err(Error::InvalidInput {
            argument: "batch",
            ..
        })
    ));
    assert_eq!(
        problem(roster.plan_decode(&[(RequestId(0), 1), (RequestId(7), 1)])),
        RequestProblem::Unknown
    );
    assert_eq!(
        problem(roster.plan_decode(&[(RequestId(0), 1), (RequestId(2), 1)])),
        RequestProblem::Prefilling
    );
    assert_eq!(
        problem(roster.plan_decode(&[(RequestId(0), 1), (RequestId(1), 1), (RequestId(0), 2)])),
        RequestProblem::Repeated
    );
    // The exact sequence fills its block with one more token, then has no room.
    let plan = roster.plan_decode(&[(RequestId(1), 1)]).unwrap();
    roster.exact_done(&plan);
    assert_eq!(
        problem(roster.plan_decode(&[(RequestId(1), 1)])),
        RequestProblem::PastCapacity {
            capacity: SLOT_TOKENS,
            given: SLOT_TOKENS + 1
        }
    );
    // The shadow sequence generates `MAX_GENERATED` tokens, then has no room.
    for _ in 0..MAX_GENERATED {
        let plan = roster.plan_decode(&[(RequestId(0), 1)]).unwrap();
        roster.shadow_done(&plan);
    }
    assert_eq!(
        problem(roster.plan_decode(&[(RequestId(0), 1)])),
        RequestProblem::PastCapacity {
            capacity: 30 + MAX_GENERATED,
            given: 30 + MAX_GENERATED + 1
        }
    );
    roster.remove(RequestId(0));
    assert_eq!(
        problem(roster.plan_decode(&[(RequestId(0), 1)])),
        RequestProblem::Finished
    );
    assert_eq!(roster.seat(RequestId(1)).unwrap().tokens, SLOT_TOKENS);
}
