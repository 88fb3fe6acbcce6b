//! The bookkeeping of a batching backend that keeps sequences in two kinds of cache: which
//! place each sequence holds (a block of the full cache while its prompt arrives and, with
//! exact attention, for good; the ShadowKV cache once its shadow is built), how many tokens
//! it holds, and how a decode batch splits into the two kinds of call and merges back.
//!
//! Everything here is decided on the CPU before any GPU work, so that a call naming an
//! unknown, finished or still-prefilling sequence, a piece past a sequence's room, or a
//! sequence in a mode the backend does not serve is refused before anything is queued and
//! changes nothing.
use std::collections::BTreeMap;

use crate::error::{invalid_input, Error, RequestProblem, Result};
use crate::serve::{CacheMode, RequestId};
use crate::ShadowKvParams;

/// Where a sequence's keys and values are.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Placement {
    /// Its prompt is arriving: the pieces run with full attention into block `slot` of the
    /// full cache. `shadow`: in ShadowKV mode (the shadow is built when the prompt closes, if
    /// the prompt is long enough for the sparse budget).
    Prompt { slot: usize, shadow: bool },
    /// Exact attention over block `slot` of the full cache: full-attention mode, or a
    /// ShadowKV prompt too short for the sparse budget.
    Exact { slot: usize },
    /// ShadowKV's sparse attention through the shadow cache (its full-cache block is free).
    Shadow,
}

/// A sequence's place and length.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Seat {
    pub placement: Placement,
    /// Prompt tokens (all of them once the prompt is closed).
    pub prompt: usize,
    /// Tokens held: the prompt so far, then the generated ones.
    pub tokens: usize,
}

/// A checked prompt piece: it goes to `slot` at position `start`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Piece {
    pub slot: usize,
    pub start: usize,
    /// Whether the sequence is in ShadowKV mode (the piece's pre-RoPE keys and last query are
    /// kept for the shadow).
    pub shadow: bool,
}

/// A checked prompt close: the prompt in `slot` has `tokens` tokens; `build_shadow` says
/// whether its shadow is to be built (ShadowKV mode and long enough) or it stays exact.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Finish {
    pub slot: usize,
    pub tokens: usize,
    pub build_shadow: bool,
}

/// One row of a decode batch that runs with exact attention over the full cache.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExactRow {
    /// The row's place in the batch.
    pub position: usize,
    pub id: RequestId,
    pub slot: usize,
    pub token: u32,
}

/// One row of a decode batch that runs through the ShadowKV cache.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ShadowRow {
    /// The row's place in the batch.
    pub position: usize,
    pub id: RequestId,
    pub token: u32,
}

/// A checked decode batch split into its two kinds of call, each in batch order.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct DecodePlan {
    pub exact: Vec<ExactRow>,
    pub shadow: Vec<ShadowRow>,
}

impl DecodePlan {
    /// Rows in the batch.
    pub fn len(&self) -> usize {
        self.exact.len() + self.shadow.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The logits of each row in the batch's order, from the exact call's logits
    /// (`[exact.len(), vocab]`, in `exact` order) and the shadow call's (`[shadow.len(),
    /// vocab]`, in `shadow` order). Lengths that do not match are an error.
    pub fn merge(
        &self,
        vocab: usize,
        exact_logits: &[f32],
        shadow_logits: &[f32],
    ) -> Result<Vec<Vec<f32>>> {
        for (argument, logits, rows) in [
            ("exact_logits", exact_logits, self.exact.len()),
            ("shadow_logits", shadow_logits, self.shadow.len()),
        ] {
            if logits.len() != rows * vocab {
                return Err(invalid_input(
                    argument,
                    format!("holds {} values", logits.len()),
                    format!("{rows} rows of {vocab} logits"),
                ));
            }
        }
        let mut merged = vec![Vec::new(); self.len()];
        let exact = self.exact.iter().map(|row| row.position);
        let shadow = self.shadow.iter().map(|row| row.position);
        let rows = exact_logits
            .chunks_exact(vocab.max(1))
            .zip(exact)
            .chain(shadow_logits.chunks_exact(vocab.max(1)).zip(shadow));
        for (logits, position) in rows {
            merged[position] = logits.to_vec();
        }
        Ok(merged)
    }
}

/// The places of a backend's sequences; see the [module](self) documentation.
#[derive(Clone, Debug)]
pub struct Roster {
    /// Tokens each full-cache block holds (prompt and generated).
    slot_tokens: usize,
    /// Tokens a shadow sequence may generate after its prompt.
    max_generated: usize,
    /// Free blocks of the full cache, highest first (the lowest is taken first).
    free: Vec<usize>,
    slots: usize,
    shadow_params: Option<ShadowKvParams>,
    seats: BTreeMap<RequestId, Seat>,
    /// The highest id ever added: a lower id that is not live has finished.
    newest: Option<RequestId>,
}

impl Roster {
    /// `slots` full-cache blocks of `slot_tokens` tokens each; ShadowKV mode served with
    /// `shadow_params` (if any), each shadow sequence generating up to `max_generated` tokens.
    pub fn new(
        slots: usize,
        slot_tokens: usize,
        shadow_params: Option<ShadowKvParams>,
        max_generated: usize,
    ) -> Roster {
        Roster {
            slot_tokens,
            max_generated,
            free: (0..slots).rev().collect(),
            slots,
            shadow_params,
            seats: BTreeMap::new(),
            newest: None,
        }
    }

    /// Sequence `id`'s place, if it is live.
    pub fn seat(&self, id: RequestId) -> Option<Seat> {
        self.seats.get(&id).copied()
    }

    /// The live sequences, by id.
    pub fn live(&self) -> Vec<RequestId> {
        self.seats.keys().copied().collect()
    }

    /// Full-cache blocks free for a new sequence.
    pub fn free_slots(&self) -> usize {
        self.free.len()
    }

    /// The tokens a sequence may hold in a full-cache block.
    pub fn slot_tokens(&self) -> usize {
        self.slot_tokens
    }

    /// Adds sequence `id` in `mode`, holding at most `max_len` tokens when known; returns
    /// its full-cache block. Refused, changing nothing: a live id, a mode not served, a
    /// `max_len` past a block, no free block.
    pub fn add(&mut self, id: RequestId, mode: CacheMode, max_len: Option<usize>) -> Result<usize> {
        let error = |problem| Error::Request { id: id.0, problem };
        if self.seats.contains_key(&id) {
            return Err(error(RequestProblem::Live));
        }
        let shadow = match mode {
            CacheMode::Full => false,
            CacheMode::ShadowKv(params) if Some(params) == self.shadow_params => true,
            CacheMode::ShadowKv(params) => {
                return Err(error(RequestProblem::Mode {
                    mode: format!("{params:?}"),
                    expected: match self.shadow_params {
                        Some(served) => format!("full attention or ShadowKV with {served:?}"),
                        None => "full attention".into(),
                    },
                }))
            }
        };
        if let Some(len) = max_len.filter(|&len| len > self.slot_tokens) {
            return Err(error(RequestProblem::PastCapacity {
                capacity: self.slot_tokens,
                given: len,
            }));
        }
        let Some(slot) = self.free.pop() else {
            return Err(error(RequestProblem::NoRoom { places: self.slots }));
        };
        self.seats.insert(
            id,
            Seat {
                placement: Placement::Prompt { slot, shadow },
                prompt: 0,
                tokens: 0,
            },
        );
        self.newest = self.newest.max(Some(id));
        Ok(slot)
    }

    /// Checks a piece of `tokens` tokens for sequence `id`'s prompt.
    pub fn plan_piece(&self, id: RequestId, tokens: usize) -> Result<Piece> {
        let seat = self.live_seat(id)?;
        let Placement::Prompt { slot, shadow } = seat.placement else {
            return Err(Error::Request {
                id: id.0,
                problem: RequestProblem::PromptComplete,
            });
        };
        if tokens == 0 {
            return Err(invalid_input(
                "tokens",
                "is empty",
                "a piece of at least one token",
            ));
        }
        let given = seat.tokens + tokens;
        if given > self.slot_tokens {
            return Err(Error::Request {
                id: id.0,
                problem: RequestProblem::PastCapacity {
                    capacity: self.slot_tokens,
                    given,
                },
            });
        }
        Ok(Piece {
            slot,
            start: seat.tokens,
            shadow,
        })
    }

    /// Records that a checked piece of `tokens` tokens ran.
    pub fn piece_done(&mut self, id: RequestId, tokens: usize) {
        if let Some(seat) = self.seats.get_mut(&id) {
            seat.tokens += tokens;
            seat.prompt = seat.tokens;
        }
    }

    /// Checks closing sequence `id`'s prompt and says whether its shadow is built.
    pub fn plan_finish(&self, id: RequestId) -> Result<Finish> {
        let seat = self.live_seat(id)?;
        let Placement::Prompt { slot, shadow } = seat.placement else {
            return Err(Error::Request {
                id: id.0,
                problem: RequestProblem::PromptComplete,
            });
        };
        if seat.tokens == 0 {
            return Err(invalid_input(
                "prompt",
                "is empty",
                "at least one prompt token before the prompt closes",
            ));
        }
        let build_shadow = shadow
            && self
                .shadow_params
                .is_some_and(|params| params.check_prompt(seat.tokens).is_ok());
        Ok(Finish {
            slot,
            tokens: seat.tokens,
            build_shadow,
        })
    }

    /// Records that sequence `id`'s prompt closed: it decodes through its shadow (its block
    /// is free again) or exactly over its block.
    pub fn finish_done(&mut self, id: RequestId, shadow_built: bool) {
        let Some(seat) = self.seats.get_mut(&id) else {
            return;
        };
        if let Placement::Prompt { slot, .. } = seat.placement {
            seat.placement = if shadow_built {
                self.free.push(slot);
                self.free.sort_unstable_by(|a, b| b.cmp(a));
                Placement::Shadow
            } else {
                Placement::Exact { slot }
            };
        }
    }

    /// Checks a decode batch and splits it: exact rows and shadow rows, each in batch order.
    /// Refused: an empty batch, an unknown or finished id, one still prefilling, one named
    /// twice, one without room for another token.
    pub fn plan_decode(&self, batch: &[(RequestId, u32)]) -> Result<DecodePlan> {
        if batch.is_empty() {
            return Err(invalid_input(
                "batch",
                "is empty",
                "at least one sequence to decode",
            ));
        }
        let mut plan = DecodePlan::default();
        for (position, &(id, token)) in batch.iter().enumerate() {
            let seat = self.live_seat(id)?;
            let error = |problem| Error::Request { id: id.0, problem };
            if batch[..position].iter().any(|&(named, _)| named == id) {
                return Err(error(RequestProblem::Repeated));
            }
            match seat.placement {
                Placement::Prompt { .. } => return Err(error(RequestProblem::Prefilling)),
                Placement::Exact { slot } => {
                    if seat.tokens >= self.slot_tokens {
                        return Err(error(RequestProblem::PastCapacity {
                            capacity: self.slot_tokens,
                            given: seat.tokens + 1,
                        }));
                    }
                    plan.exact.push(ExactRow {
                        position,
                        id,
                        slot,
                        token,
                    });
                }
                Placement::Shadow => {
                    let capacity = seat.prompt + self.max_generated;
                    if seat.tokens >= capacity {
                        return Err(error(RequestProblem::PastCapacity {
                            capacity,
                            given: seat.tokens + 1,
                        }));
                    }
                    plan.shadow.push(ShadowRow {
                        position,
                        id,
                        token,
                    });
                }
            }
        }
        Ok(plan)
    }

    /// Records that the exact rows of `plan` ran.
    pub fn exact_done(&mut self, plan: &DecodePlan) {
        for row in &plan.exact {
            if let Some(seat) = self.seats.get_mut(&row.id) {
                seat.tokens += 1;
            }
        }
    }

    /// Records that the shadow rows of `plan` ran.
    pub fn shadow_done(&mut self, plan: &DecodePlan) {
        for row in &plan.shadow {
            if let Some(seat) = self.seats.get_mut(&row.id) {
                seat.tokens += 1;
            }
        }
    }

    /// Drops sequence `id`, freeing its block; returns its last seat.
    pub fn remove(&mut self, id: RequestId) -> Option<Seat> {
        let seat = self.seats.remove(&id)?;
        if let Placement::Prompt { slot, .. } | Placement::Exact { slot } = seat.placement {
            self.free.push(slot);
            self.free.sort_unstable_by(|a, b| b.cmp(a));
        }
        Some(seat)
    }

    /// The live seat of `id`, or why there is none.
    fn live_seat(&self, id: RequestId) -> Result<Seat> {
        self.seats.get(&id).copied().ok_or(Error::Request {
            id: id.0,
            problem: if self.newest.is_some_and(|newest| id <= newest) {
                RequestProblem::Finished
            } else {
                RequestProblem::Unknown
            },
        })
    }
}
