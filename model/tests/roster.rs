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

/// A stand-in for the GPU backend on the CPU: the [`Roster`]'s bookkeeping around a "model"
/// whose logits pick `next(token, position, kind)`, with a different kind for the exact and the
/// shadow calls, so that a token mixed up between rows or kinds shows in the output.
struct FakeBackend {
    roster: Roster,
}

const VOCAB: usize = 97;

/// The token picked after `token` at `position`; `shadow` for the shadow call's rows.
fn next(token: u32, position: usize, shadow: bool) -> u32 {
    ((token as usize * 7 + position * 3 + shadow as usize * 50) % VOCAB) as u32
}

fn one_hot(token: u32) -> Vec<f32> {
    let mut logits = vec![0.0; VOCAB];
    logits[token as usize] = 1.0;
    logits
}

impl shadowkv_model::Backend for FakeBackend {
    fn vocab(&self) -> usize {
        VOCAB
    }

    fn add_sequence(
        &mut self,
        id: RequestId,
        mode: CacheMode,
        max_len: Option<usize>,
    ) -> shadowkv_model::Result<()> {
        self.roster.add(id, mode, max_len).map(|_| ())
    }

    fn prefill(&mut self, id: RequestId, tokens: &[u32]) -> shadowkv_model::Result<Vec<f32>> {
        let piece = self.roster.plan_piece(id, tokens.len())?;
        self.roster.piece_done(id, tokens.len());
        let last = piece.start + tokens.len() - 1;
        Ok(one_hot(next(tokens[tokens.len() - 1], last, false)))
    }

    fn finish_prompt(&mut self, id: RequestId) -> shadowkv_model::Result<()> {
        let finish = self.roster.plan_finish(id)?;
        self.roster.finish_done(id, finish.build_shadow);
        Ok(())
    }

    fn decode(&mut self, batch: &[(RequestId, u32)]) -> shadowkv_model::Result<Vec<Vec<f32>>> {
        let plan = self.roster.plan_decode(batch)?;
        let position = |roster: &Roster, id| roster.seat(id).unwrap().tokens;
        let exact: Vec<f32> = plan
            .exact
            .iter()
            .flat_map(|row| one_hot(next(row.token, position(&self.roster, row.id), false)))
            .collect();
        let shadow: Vec<f32> = plan
            .shadow
            .iter()
            .flat_map(|row| one_hot(next(row.token, position(&self.roster, row.id), true)))
            .collect();
        self.roster.exact_done(&plan);
        self.roster.shadow_done(&plan);
        plan.merge(VOCAB, &exact, &shadow)
    }

    fn remove_sequence(&mut self, id: RequestId) {
        self.roster.remove(id);
    }
}

/// The tokens a request gets alone: the first from its prompt's last token, then one per step
/// through its kind of call.
fn alone(prompt: &[u32], mode: CacheMode, tokens: usize) -> Vec<u32> {
    let shadow = matches!(mode, CacheMode::ShadowKv(p) if p.check_prompt(prompt.len()).is_ok());
    let mut out = vec![next(prompt[prompt.len() - 1], prompt.len() - 1, false)];
    while out.len() < tokens {
        let position = prompt.len() + out.len() - 1;
        out.push(next(out[out.len() - 1], position, shadow));
    }
    out
}

/// The scheduler over the roster: requests of both modes (long and short ShadowKV prompts)
/// join over time, prompts arrive in pieces while others decode, steps decode subsets in
/// rotating orders, requests leave and their blocks are taken again; each gets the tokens it
/// gets alone.
#[test]
fn the_scheduler_over_the_roster_keeps_every_row_with_its_sequence() {
    use shadowkv_model::{Event, PromptEnd, Request, Scheduler};
    let backend = FakeBackend {
        roster: Roster::new(4, 64, Some(SPARSE), 40),
    };
    let mut scheduler = Scheduler::new(backend, 7);
    let shadow = CacheMode::ShadowKv(SPARSE);
    let prompt = |len: usize, seed: u32| -> Vec<u32> {
        (0..len as u32)
            .map(|i| (i * 13 + seed) % VOCAB as u32)
            .collect()
    };
    let specs = [
        (prompt(30, 1), shadow, 12),
        (prompt(9, 2), CacheMode::Full, 9),
        (prompt(17, 3), shadow, 15),
        (prompt(25, 4), shadow, 5),
        (prompt(40, 5), CacheMode::Full, 10),
        (prompt(20, 6), shadow, 20),
    ];
    let mut expected = std::collections::BTreeMap::new();
    let mut got: std::collections::BTreeMap<RequestId, Vec<u32>> = Default::default();
    let mut submitted = 0;
    let mut open: Option<(RequestId, usize)> = None;
    for step in 0..200 {
        // A new request every 5 steps while there is room; every other one streams its
        // prompt in pieces of 6.
        if step % 5 == 0 && submitted < specs.len() && scheduler.live().len() < 4 {
            let (prompt, mode, tokens) = &specs[submitted];
            let request = Request::new(prompt.clone(), *tokens).with_mode(*mode);
            let id = if submitted % 2 == 1 && open.is_none() {
                let id = scheduler
                    .submit(Request {
                        prompt: prompt[..6].to_vec(),
                        prompt_end: PromptEnd::Open,
                        ..request
                    })
                    .unwrap();
                open = Some((id, 6));
                id
            } else {
                scheduler.submit(request).unwrap()
            };
            expected.insert(id, alone(prompt, *mode, *tokens));
            submitted += 1;
        }
        if let Some((id, fed)) = open {
            let prompt = &specs[id.0 as usize].0;
            let end = (fed + 6).min(prompt.len());
            scheduler
                .push_prompt(id, &prompt[fed..end], end == prompt.len())
                .unwrap();
            open = (end < prompt.len()).then_some((id, end));
        }
        // Alternate whole steps with a prefill and a decode of a rotated subset.
        let events = if step % 3 == 2 {
            let mut events = scheduler.prefill(7).unwrap();
            let mut decoding: Vec<RequestId> = scheduler
                .live()
                .into_iter()
                .filter(|&id| scheduler.is_decoding(id))
                .collect();
            if !decoding.is_empty() {
                let count = decoding.len();
                decoding.rotate_left(step % count);
                decoding.truncate(count.div_ceil(2));
                events.extend(scheduler.decode(&decoding).unwrap());
            }
            events
        } else {
            scheduler.step().unwrap()
        };
        for event in events {
            if let Event::Token { id, token } = event {
                got.entry(id).or_default().push(token);
            }
        }
        if submitted == specs.len() && scheduler.is_idle() {
            break;
        }
    }
    assert!(scheduler.is_idle(), "requests left: {:?}", scheduler.live());
    assert_eq!(got, expected);
    // Every block is free again.
    assert_eq!(scheduler.backend().roster.free_slots(), 4);
}
