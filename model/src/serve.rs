//! Continuous batching: a [`Scheduler`] serves many requests at once over a [`Backend`].
//!
//! Requests join at any time, each with its own cache mode, sampler, token limit and
//! end-of-generation ids; a prompt may arrive in pieces. Every [`Scheduler::step`] feeds up to
//! a token budget of pending prompt pieces (so a long prompt is spread over several steps
//! while the other sequences keep decoding), then decodes every sequence whose prompt is
//! complete, one token each, in one batched [`Backend::decode`] call. Finished sequences
//! leave the batch at once. Sequences are independent: a sequence's tokens do not depend on
//! which others share its steps, nor on how its prompt was split.
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use crate::cpu::{CpuCache, CpuModel};
use crate::error::{invalid_input, Error, RequestProblem, Result};
use crate::sampling::Sampler;
use crate::ShadowKvParams;

/// A request's id, given by [`Scheduler::submit`] in arrival order; the backend's sequence
/// id too.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RequestId(pub u64);

impl std::fmt::Display for RequestId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

/// How a sequence attends over its cache.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CacheMode {
    /// Every cached token, exactly.
    Full,
    /// ShadowKV's sparse attention after the prompt; a prompt too short for the sparse budget
    /// keeps exact attention for that sequence.
    ShadowKv(ShadowKvParams),
}

/// The model side of the scheduler: sequences with their own caches, fed prompt pieces one
/// sequence at a time and decoded in batches.
///
/// Calls for one sequence come in this order: [`Backend::add_sequence`], one or more
/// [`Backend::prefill`] pieces, [`Backend::finish_prompt`], any number of
/// [`Backend::decode`] batches holding it, then [`Backend::remove_sequence`]. The scheduler
/// checks ids and token ranges before calling; a backend still returns errors for what
/// only it can check (parameters, memory, capacity).
pub trait Backend {
    /// The vocabulary size: the length of every logits vector and the bound on token ids.
    fn vocab(&self) -> usize;

    /// Adds an empty sequence `id` attending with `mode`. `max_len`, when known, bounds the
    /// tokens it will ever hold (prompt and generated), for backends that size caches ahead.
    fn add_sequence(
        &mut self,
        id: RequestId,
        mode: CacheMode,
        max_len: Option<usize>,
    ) -> Result<()>;

    /// Runs a (non-empty) piece of sequence `id`'s prompt after what it holds, with full
    /// attention, and returns the piece's last token's logits.
    fn prefill(&mut self, id: RequestId, tokens: &[u32]) -> Result<Vec<f32>>;

    /// Closes sequence `id`'s prompt: in ShadowKV mode its shadows are built (or it keeps
    /// exact attention when the prompt is too short for the budget).
    fn finish_prompt(&mut self, id: RequestId) -> Result<()>;

    /// One decode step of a batch: each `(sequence, token)` appends `token` to its distinct
    /// sequence. Returns each sequence's logits, in the batch's order.
    fn decode(&mut self, batch: &[(RequestId, u32)]) -> Result<Vec<Vec<f32>>>;

    /// Drops sequence `id` and its cache (nothing when it is not there).
    fn remove_sequence(&mut self, id: RequestId);
}

/// The CPU reference model as a [`Backend`]: one [`CpuCache`] per sequence, a batch decoded
/// one sequence after another (each product is already split over the cores).
pub struct CpuBackend<'m> {
    model: &'m CpuModel,
    caches: BTreeMap<RequestId, CpuCache>,
}

impl<'m> CpuBackend<'m> {
    pub fn new(model: &'m CpuModel) -> CpuBackend<'m> {
        CpuBackend {
            model,
            caches: BTreeMap::new(),
        }
    }

    /// Sequence `id`'s cache.
    pub fn cache(&self, id: RequestId) -> Option<&CpuCache> {
        self.caches.get(&id)
    }

    fn cache_mut(&mut self, id: RequestId) -> Result<&mut CpuCache> {
        self.caches.get_mut(&id).ok_or(Error::Request {
            id: id.0,
            problem: RequestProblem::Unknown,
        })
    }
}

impl Backend for CpuBackend<'_> {
    fn vocab(&self) -> usize {
        self.model.config.vocab
    }

    fn add_sequence(&mut self, id: RequestId, mode: CacheMode, _: Option<usize>) -> Result<()> {
        let config = &self.model.config;
        let cache = match mode {
            CacheMode::Full => CpuCache::new(config),
            CacheMode::ShadowKv(params) => CpuCache::shadowkv(config, params)?,
        };
        self.caches.insert(id, cache);
        Ok(())
    }

    fn prefill(&mut self, id: RequestId, tokens: &[u32]) -> Result<Vec<f32>> {
        let model = self.model;
        model.prefill_piece(self.cache_mut(id)?, tokens)
    }

    fn finish_prompt(&mut self, id: RequestId) -> Result<()> {
        let model = self.model;
        model.finish_prompt(self.cache_mut(id)?)
    }

    fn decode(&mut self, batch: &[(RequestId, u32)]) -> Result<Vec<Vec<f32>>> {
        let model = self.model;
        batch
            .iter()
            .map(|&(id, token)| model.forward(self.cache_mut(id)?, &[token]))
            .collect()
    }

    fn remove_sequence(&mut self, id: RequestId) {
        self.caches.remove(&id);
    }
}

/// Where a request's prompt ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PromptEnd {
    /// The request's `prompt` is the whole prompt.
    Complete,
    /// More pieces follow ([`Scheduler::push_prompt`]); the last says so.
    Open,
    /// The prompt has this many tokens; it is complete when they have all arrived.
    Length(usize),
}

/// A generation request.
#[derive(Clone, Debug)]
pub struct Request {
    /// The prompt, or its first piece (see `prompt_end`).
    pub prompt: Vec<u32>,
    pub prompt_end: PromptEnd,
    /// Most tokens to generate (at least 1).
    pub max_new_tokens: usize,
    pub sampler: Sampler,
    /// Tokens that end the generation (the token is emitted, then the request finishes).
    pub end_ids: Vec<u32>,
    pub mode: CacheMode,
}

impl Request {
    /// A request with its whole prompt, greedy, full attention, no end-of-generation ids.
    pub fn new(prompt: Vec<u32>, max_new_tokens: usize) -> Request {
        Request {
            prompt,
            prompt_end: PromptEnd::Complete,
            max_new_tokens,
            sampler: Sampler::greedy(),
            end_ids: Vec::new(),
            mode: CacheMode::Full,
        }
    }

    pub fn with_sampler(self, sampler: Sampler) -> Request {
        Request { sampler, ..self }
    }

    pub fn with_end_ids(self, end_ids: impl IntoIterator<Item = u32>) -> Request {
        Request {
            end_ids: end_ids.into_iter().collect(),
            ..self
        }
    }

    pub fn with_mode(self, mode: CacheMode) -> Request {
        Request { mode, ..self }
    }

    /// `prompt` is the first piece; see [`PromptEnd`].
    pub fn with_prompt_end(self, prompt_end: PromptEnd) -> Request {
        Request { prompt_end, ..self }
    }
}

/// Why a request finished.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FinishReason {
    /// It generated one of its end-of-generation ids (the last token emitted).
    EndOfGeneration,
    /// It generated `max_new_tokens` tokens.
    MaxTokens,
}

/// What a scheduler call produced, in order.
#[derive(Clone, Debug, PartialEq)]
pub enum Event {
    /// Request `id` generated `token`.
    Token { id: RequestId, token: u32 },
    /// Request `id` finished (after its last [`Event::Token`]) and left the batch.
    Finished {
        id: RequestId,
        reason: FinishReason,
        stats: RequestStats,
    },
}

/// A finished request's counts and times.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RequestStats {
    pub prompt_tokens: usize,
    pub generated_tokens: usize,
    /// From submission to the first generated token (prefill, and waiting for its turn).
    pub time_to_first_token: Duration,
    /// From submission to the last generated token.
    pub total_time: Duration,
}

/// One live request's state.
struct Sequence {
    /// Prompt tokens received, and how many of them the backend has run.
    prompt: Vec<u32>,
    fed: usize,
    prompt_end: PromptEnd,
    /// No more prompt pieces will come.
    prompt_closed: bool,
    /// The backend's prompt is closed and the first token sampled.
    prefilled: bool,
    /// The logits after the last prompt piece run, for the first token.
    logits: Option<Vec<f32>>,
    /// The last generated token, not yet fed to the backend.
    next: Option<u32>,
    generated: usize,
    max_new_tokens: usize,
    sampler: Sampler,
    end_ids: Vec<u32>,
    submitted: Instant,
    first_token: Option<Instant>,
}

impl Sequence {
    /// Tokens waiting to be fed.
    fn pending(&self) -> usize {
        self.prompt.len() - self.fed
    }

    /// The prompt has arrived and been run, but the backend's prompt is not closed yet.
    fn ready_to_finish(&self) -> bool {
        self.prompt_closed && !self.prefilled && self.pending() == 0
    }
}

/// Continuous batching over a [`Backend`]; see the [module](self) documentation.
pub struct Scheduler<B: Backend> {
    backend: B,
    prefill_budget: usize,
    next_id: u64,
    /// Live requests by id, which is arrival order.
    live: BTreeMap<RequestId, Sequence>,
}

impl<B: Backend> Scheduler<B> {
    /// A scheduler that feeds at most `prefill_budget` prompt tokens per [`Scheduler::step`]
    /// (at least 1).
    pub fn new(backend: B, prefill_budget: usize) -> Scheduler<B> {
        Scheduler {
            backend,
            prefill_budget: prefill_budget.max(1),
            next_id: 0,
            live: BTreeMap::new(),
        }
    }

    pub fn backend(&self) -> &B {
        &self.backend
    }

    pub fn into_backend(self) -> B {
        self.backend
    }

    /// The live requests (not finished nor cancelled), in arrival order.
    pub fn live(&self) -> Vec<RequestId> {
        self.live.keys().copied().collect()
    }

    /// Whether no request is live.
    pub fn is_idle(&self) -> bool {
        self.live.is_empty()
    }

    /// Whether request `id` has its prompt run and decodes in the next step.
    pub fn is_decoding(&self, id: RequestId) -> bool {
        self.live.get(&id).is_some_and(|s| s.next.is_some())
    }

    /// Adds a request; its prompt is fed by the following steps. Bad input (no tokens to
    /// generate, an empty complete prompt, ids past the vocabulary, a first piece past the
    /// declared length, parameters the backend rejects) is an error and adds nothing.
    pub fn submit(&mut self, request: Request) -> Result<RequestId> {
        if request.max_new_tokens == 0 {
            return Err(invalid_input(
                "max_new_tokens",
                "is 0",
                "at least one token to generate",
            ));
        }
        self.check_vocab(&request.prompt)?;
        let id = RequestId(self.next_id);
        let (closed, max_len) = match request.prompt_end {
            PromptEnd::Complete => (true, Some(request.prompt.len())),
            PromptEnd::Open => (false, None),
            PromptEnd::Length(declared) => {
                if request.prompt.len() > declared {
                    return Err(Error::Request {
                        id: id.0,
                        problem: RequestProblem::PastPromptLength {
                            declared,
                            given: request.prompt.len(),
                        },
                    });
                }
                (request.prompt.len() == declared, Some(declared))
            }
        };
        if closed && request.prompt.is_empty() {
            return Err(invalid_input(
                "prompt",
                "is empty",
                "at least one prompt token",
            ));
        }
        let max_len = max_len.map(|len| len + request.max_new_tokens);
        self.backend.add_sequence(id, request.mode, max_len)?;
        self.next_id += 1;
        self.live.insert(
            id,
            Sequence {
                prompt: request.prompt,
                fed: 0,
                prompt_end: request.prompt_end,
                prompt_closed: closed,
                prefilled: false,
                logits: None,
                next: None,
                generated: 0,
                max_new_tokens: request.max_new_tokens,
                sampler: request.sampler,
                end_ids: request.end_ids,
                submitted: Instant::now(),
                first_token: None,
            },
        );
        Ok(id)
    }

    /// Adds a piece to request `id`'s prompt; `last` says it is the last (a declared length
    /// closes the prompt by itself when reached). The piece may be empty. A piece after the
    /// prompt is complete, past its declared length, or a `last` short of the declared length
    /// is an error that changes nothing.
    pub fn push_prompt(&mut self, id: RequestId, tokens: &[u32], last: bool) -> Result<()> {
        self.check_vocab(tokens)?;
        let sequence = self.sequence(id)?;
        let request_error = |problem| Error::Request { id: id.0, problem };
        if sequence.prompt_closed {
            return Err(request_error(RequestProblem::PromptComplete));
        }
        let given = sequence.prompt.len() + tokens.len();
        let reached = match sequence.prompt_end {
            PromptEnd::Length(declared) if given > declared => {
                return Err(request_error(RequestProblem::PastPromptLength {
                    declared,
                    given,
                }))
            }
            PromptEnd::Length(declared) if last && given < declared => {
                return Err(request_error(RequestProblem::ShortOfPromptLength {
                    declared,
                    given,
                }))
            }
            PromptEnd::Length(declared) => given == declared,
            _ => false,
        };
        if (last || reached) && given == 0 {
            return Err(invalid_input(
                "prompt",
                "is empty",
                "at least one prompt token",
            ));
        }
        let sequence = self.live.get_mut(&id).expect("checked above");
        sequence.prompt.extend_from_slice(tokens);
        sequence.prompt_closed = last || reached;
        Ok(())
    }

    /// Drops request `id` (prefilling or decoding) without a [`Event::Finished`].
    pub fn cancel(&mut self, id: RequestId) -> Result<()> {
        self.sequence(id)?;
        self.live.remove(&id);
        self.backend.remove_sequence(id);
        Ok(())
    }

    /// One round: [`Scheduler::prefill`] with the step's token budget, then a
    /// [`Scheduler::decode`] of every request that was decoding when the step began. A request
    /// whose prompt completes in this step gets its first token here and decodes from the next.
    pub fn step(&mut self) -> Result<Vec<Event>> {
        let decoding: Vec<RequestId> = self
            .live
            .iter()
            .filter(|(_, s)| s.next.is_some())
            .map(|(&id, _)| id)
            .collect();
        let mut events = self.prefill(self.prefill_budget)?;
        if !decoding.is_empty() {
            events.extend(self.decode(&decoding)?);
        }
        Ok(events)
    }

    /// Feeds pending prompt tokens, oldest request first, up to `budget` tokens in all (a
    /// request's pending tokens may be split over several calls). A request whose whole prompt
    /// has arrived and run has its prompt closed and its first token sampled.
    pub fn prefill(&mut self, budget: usize) -> Result<Vec<Event>> {
        let mut events = Vec::new();
        let mut budget = budget;
        let ids: Vec<RequestId> = self.live.keys().copied().collect();
        for id in ids {
            let sequence = self.live.get_mut(&id).expect("a live id");
            let take = sequence.pending().min(budget);
            if take > 0 {
                let piece = &sequence.prompt[sequence.fed..sequence.fed + take];
                sequence.logits = Some(self.backend.prefill(id, piece)?);
                sequence.fed += take;
                budget -= take;
            }
            if sequence.ready_to_finish() {
                self.backend.finish_prompt(id)?;
                let sequence = self.live.get_mut(&id).expect("a live id");
                sequence.prefilled = true;
                let logits = sequence.logits.take().expect("a run prompt has logits");
                self.sample(id, &logits, &mut events);
            }
        }
        Ok(events)
    }

    /// One decode step of exactly the requests `ids`, in that order: each feeds its last token
    /// and samples the next. Naming an unknown or finished request, one still prefilling, or
    /// one twice is an error that changes nothing.
    pub fn decode(&mut self, ids: &[RequestId]) -> Result<Vec<Event>> {
        let mut batch = Vec::with_capacity(ids.len());
        for (i, &id) in ids.iter().enumerate() {
            let next = self.sequence(id)?.next.ok_or(Error::Request {
                id: id.0,
                problem: RequestProblem::Prefilling,
            })?;
            if ids[..i].contains(&id) {
                return Err(Error::Request {
                    id: id.0,
                    problem: RequestProblem::Repeated,
                });
            }
            batch.push((id, next));
        }
        if batch.is_empty() {
            return Ok(Vec::new());
        }
        let logits = self.backend.decode(&batch)?;
        let mut events = Vec::new();
        for (&id, logits) in ids.iter().zip(&logits) {
            self.live.get_mut(&id).expect("checked above").next = None;
            self.sample(id, logits, &mut events);
        }
        Ok(events)
    }

    /// Samples request `id`'s next token from `logits`, emits it, and retires the request
    /// when it is finished.
    fn sample(&mut self, id: RequestId, logits: &[f32], events: &mut Vec<Event>) {
        let sequence = self.live.get_mut(&id).expect("a live id");
        let token = sequence.sampler.sample(logits);
        sequence.generated += 1;
        let now = Instant::now();
        let first_token = *sequence.first_token.get_or_insert(now);
        events.push(Event::Token { id, token });
        let reason = if sequence.end_ids.contains(&token) {
            FinishReason::EndOfGeneration
        } else if sequence.generated >= sequence.max_new_tokens {
            FinishReason::MaxTokens
        } else {
            sequence.next = Some(token);
            return;
        };
        let stats = RequestStats {
            prompt_tokens: sequence.prompt.len(),
            generated_tokens: sequence.generated,
            time_to_first_token: first_token - sequence.submitted,
            total_time: now - sequence.submitted,
        };
        self.live.remove(&id);
        self.backend.remove_sequence(id);
        events.push(Event::Finished { id, reason, stats });
    }

    /// The live request `id`, or why there is none.
    fn sequence(&self, id: RequestId) -> Result<&Sequence> {
        self.live.get(&id).ok_or(Error::Request {
            id: id.0,
            problem: if id.0 < self.next_id {
                RequestProblem::Finished
            } else {
                RequestProblem::Unknown
            },
        })
    }

    fn check_vocab(&self, tokens: &[u32]) -> Result<()> {
        let vocab = self.backend.vocab();
        match tokens.iter().find(|&&t| t as usize >= vocab) {
            Some(bad) => Err(invalid_input(
                "tokens",
                format!("holds id {bad}"),
                format!("ids below the vocabulary size {vocab}"),
            )),
            None => Ok(()),
        }
    }
}
