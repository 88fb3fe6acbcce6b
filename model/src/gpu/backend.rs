//! [`GpuBackend`]: the GPU model as a continuous-batching `Backend`, over a full KV cache
//! and a ShadowKV cache.
use std::collections::BTreeMap;

use half::bf16;
use shadowkv::cache::{CacheCapacity, SequenceId, ShadowKvCache, ValueHome};
use shadowkv::cudarc::driver::CudaSlice;
use shadowkv::kernels::shadow_prefill::PrefillSource;
use shadowkv::SequenceLayout;

use super::forward::PrefillTaps;
use super::kv_cache::GpuKvCache;
use super::model::GpuModel;
use super::shadow_cache::GpuShadowCache;
use crate::error::{invalid_input, OnGpu, Result};
use crate::roster::{Placement, Roster};
use crate::serve::{Backend, CacheMode, RequestId};
use crate::{ModelConfig, ShadowKvParams};

/// What a [`GpuBackend`] is sized for; everything is allocated when it is made.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GpuServeCapacity {
    /// Sequences held at once in the full cache (prompts arriving, and sequences with exact
    /// attention); in ShadowKV mode, also the shadow cache's sequences.
    pub max_sequences: usize,
    /// Tokens of one sequence (prompt and generated): a full-cache block, and the longest
    /// prompt a shadow is built from.
    pub max_tokens: usize,
    /// Tokens a ShadowKV sequence may generate after its prompt.
    pub max_generated: usize,
}

impl GpuServeCapacity {
    /// The shadow cache's capacity for `params`, or `None` when no prompt that fits a block
    /// is long enough for the sparse budget: every ShadowKV request then keeps exact
    /// attention, and no shadow cache is made (one sized for such prompts is refused).
    pub fn shadow_capacity(&self, params: &ShadowKvParams) -> Option<CacheCapacity> {
        // `check_prompt` passes for every length past the shortest that it passes for.
        params.check_prompt(self.max_tokens).ok()?;
        Some(CacheCapacity {
            max_sequences: self.max_sequences,
            max_prompt_len: self.max_tokens,
            max_prompt_tokens: self.max_sequences * self.max_tokens,
            max_generated: self.max_generated,
        })
    }

    /// GPU bytes of the caches a backend of this capacity allocates for `config` (weights and
    /// a pass's activations aside): the full cache's blocks and, with `shadowkv`, each block's
    /// pre-RoPE keys and last queries, the shadow cache of the global layers (when a prompt
    /// that fits a block can have one) and the sliding-window layers' full keys and values in
    /// a slot per sequence.
    pub fn cache_gpu_bytes(
        &self,
        config: &ModelConfig,
        shadowkv: Option<(ShadowKvParams, ValueHome)>,
    ) -> Result<u64> {
        let (sequences, layers) = (self.max_sequences as u64, config.layers as u64);
        let block = (config.kv_dim() as u64 * self.max_tokens as u64).next_multiple_of(8);
        let full = sequences * layers * 2 * block * 2;
        let Some((params, home)) = shadowkv else {
            return Ok(full);
        };
        let taps =
            sequences * layers * (self.max_tokens * config.kv_dim() + config.q_dim()) as u64 * 2;
        let shadow = match self.shadow_capacity(&params) {
            None => 0,
            Some(capacity) => {
                let report = ShadowKvCache::memory_for(
                    &config.shadow_cache_shape(),
                    &params,
                    home,
                    &capacity,
                )
                .on_gpu("sizing the ShadowKV cache")?;
                let local = config.local_kv_bytes(capacity.max_prompt_len + capacity.max_generated);
                report.gpu_bytes() + capacity.max_sequences as u64 * local
            }
        };
        Ok(full + taps + shadow)
    }
}

/// What a ShadowKV prompt keeps beside its full-cache block for its shadow: each layer's
/// keys before RoPE (`[max_tokens, kv_dim]`) and last query (`[layers, q_dim]`). Kept per
/// block once made, so that serving allocates nothing new after warm-up.
struct PromptTaps {
    pre_rope_keys: Vec<CudaSlice<bf16>>,
    last_queries: CudaSlice<bf16>,
}

impl PromptTaps {
    /// `taps`, made on a block's first ShadowKV prompt.
    fn get_or_make<'t>(
        taps: &'t mut Option<PromptTaps>,
        model: &GpuModel,
        max_tokens: usize,
    ) -> Result<&'t mut PromptTaps> {
        const WHAT: &str = "allocating a prompt's pre-RoPE keys";
        let (config, stream) = (&model.config, model.stream());
        if taps.is_none() {
            *taps = Some(PromptTaps {
                pre_rope_keys: (0..config.layers)
                    .map(|_| {
                        stream
                            .alloc_zeros::<bf16>(max_tokens * config.kv_dim())
                            .on_gpu(WHAT)
                    })
                    .collect::<Result<_>>()?,
                last_queries: stream
                    .alloc_zeros::<bf16>(config.layers * config.q_dim())
                    .on_gpu(WHAT)?,
            });
        }
        Ok(taps.as_mut().expect("made above"))
    }
}

/// The GPU model as a [`Backend`].
///
/// Two caches hold the sequences. A full KV cache of one block per place holds every prompt
/// while it arrives (each piece runs with full attention, so a prompt may come in pieces
/// while the others decode) and, for good, the sequences with exact attention: full-attention
/// requests and ShadowKV prompts too short for the sparse budget. In ShadowKV mode each
/// piece's keys before RoPE and its last query are kept beside the block, and when the prompt
/// closes each layer's shadow is built from the block (`ShadowKvCache::prefill_layer`); the
/// block is then free for the next prompt. A decode batch may hold both kinds of sequence:
/// one pass over the full cache for the exact ones, one ShadowKV step over the others, the
/// logits merged back into the batch's order. Which sequence is where, and every check of a
/// call's ids and lengths, is the [`Roster`]'s, decided before any GPU work: a refused call
/// changes nothing. A GPU failure in the middle of a mixed batch (after the exact pass, in the
/// ShadowKV step) leaves the exact rows advanced by one token.
pub struct GpuBackend<'m> {
    model: &'m GpuModel,
    roster: Roster,
    full: GpuKvCache,
    /// Per full-cache block, once a ShadowKV prompt has used it.
    taps: Vec<Option<PromptTaps>>,
    shadow: Option<GpuShadowCache>,
    /// The shadow cache's id of each ShadowKV sequence whose shadow is built.
    shadow_ids: BTreeMap<RequestId, SequenceId>,
}

impl<'m> GpuBackend<'m> {
    /// A backend for `model` sized for `capacity`, serving full attention and, with
    /// `shadowkv`, ShadowKV with those parameters and value home (requests in ShadowKV mode
    /// must carry the same parameters).
    pub fn new(
        model: &'m GpuModel,
        capacity: GpuServeCapacity,
        shadowkv: Option<(ShadowKvParams, ValueHome)>,
    ) -> Result<GpuBackend<'m>> {
        if capacity.max_sequences == 0 || capacity.max_tokens == 0 {
            return Err(invalid_input(
                "capacity",
                format!("is {capacity:?}"),
                "at least one sequence of at least one token",
            ));
        }
        let max_tokens = u32::try_from(capacity.max_tokens).map_err(|_| {
            invalid_input(
                "capacity.max_tokens",
                format!("is {}", capacity.max_tokens),
                "below 2^32",
            )
        })?;
        let full = model.new_cache(&vec![max_tokens; capacity.max_sequences])?;
        let shadow = match shadowkv {
            Some((params, home)) => match capacity.shadow_capacity(&params) {
                Some(shadow_capacity) => {
                    Some(model.new_shadow_cache(params, home, shadow_capacity)?)
                }
                None => None,
            },
            None => None,
        };
        Ok(GpuBackend {
            model,
            roster: Roster::new(
                capacity.max_sequences,
                capacity.max_tokens,
                shadowkv.map(|(params, _)| params),
                capacity.max_generated,
            ),
            full,
            taps: (0..capacity.max_sequences).map(|_| None).collect(),
            shadow,
            shadow_ids: BTreeMap::new(),
        })
    }

    /// Where sequence `id` is, if it is live.
    pub fn placement(&self, id: RequestId) -> Option<Placement> {
        self.roster.seat(id).map(|seat| seat.placement)
    }

    /// The places and lengths of the live sequences.
    pub fn roster(&self) -> &Roster {
        &self.roster
    }

    /// The ShadowKV cache (its last step's statistics, its memory), when ShadowKV is served.
    pub fn shadow_cache(&self) -> Option<&GpuShadowCache> {
        self.shadow.as_ref()
    }

    /// Bytes of the full cache on the GPU.
    pub fn full_cache_bytes(&self) -> usize {
        self.full.bytes()
    }

    /// Builds every global layer's shadow of the `tokens`-token prompt in block `slot` as
    /// shadow sequence `id`: the host cache's prefill from the block's keys and values, the
    /// taps' pre-RoPE keys and last queries; a sliding-window layer's keys and values are
    /// copied into the sequence's slot of the cache's local layers.
    fn build_from_block(
        model: &GpuModel,
        shadow: &mut GpuShadowCache,
        id: SequenceId,
        full: &GpuKvCache,
        slot: usize,
        taps: &PromptTaps,
        tokens: usize,
    ) -> Result<()> {
        const WHAT: &str = "building a ShadowKV sequence from its prompt's block";
        let (config, gpu) = (&model.config, model.gpu());
        let layout = SequenceLayout {
            len: tokens as u32,
            ..full.layouts[slot]
        };
        let (kv_dim, q_dim) = (config.kv_dim(), config.q_dim());
        let queued = (|| -> Result<()> {
            for layer in 0..config.layers {
                if model.is_local_layer(layer) {
                    // A sliding-window layer keeps its keys and values exact, in its slot.
                    let buffers = (&full.k[layer], &full.v[layer]);
                    model.keep_local_layer(shadow, layer, id, buffers, layout)?;
                    continue;
                }
                let source = PrefillSource {
                    keys: &full.k[layer],
                    values: &full.v[layer],
                    layout,
                };
                let pre_rope = taps.pre_rope_keys[layer].slice(..tokens * kv_dim);
                let last_query = taps.last_queries.slice(layer * q_dim..(layer + 1) * q_dim);
                shadow
                    .cache
                    .prefill_layer(
                        gpu,
                        model.shadow_layer(layer),
                        id,
                        &pre_rope,
                        &source,
                        &last_query,
                    )
                    .on_gpu(WHAT)?;
            }
            Ok(())
        })();
        // The offload reads the block on the copy stream: it must be done before the block
        // takes the next prompt, whether or not every layer was queued.
        let finished = shadow.cache.check_prefill().on_gpu(WHAT);
        queued.and(finished)
    }

    fn check_tokens(&self, tokens: &[u32]) -> Result<()> {
        let vocab = self.model.config.vocab;
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

impl Backend for GpuBackend<'_> {
    fn vocab(&self) -> usize {
        self.model.config.vocab
    }

    fn add_sequence(
        &mut self,
        id: RequestId,
        mode: CacheMode,
        max_len: Option<usize>,
    ) -> Result<()> {
        let slot = self.roster.add(id, mode, max_len)?;
        if let Err(error) = self.full.clear_sequence(slot) {
            self.roster.remove(id);
            return Err(error);
        }
        Ok(())
    }

    fn prefill(&mut self, id: RequestId, tokens: &[u32]) -> Result<Vec<f32>> {
        let piece = self.roster.plan_piece(id, tokens.len())?;
        self.check_tokens(tokens)?;
        let model = self.model;
        let sequences = vec![piece.slot; tokens.len()];
        let logits = if piece.shadow {
            let max_tokens = self.roster.slot_tokens();
            let taps = PromptTaps::get_or_make(&mut self.taps[piece.slot], model, max_tokens)?;
            let taps = PrefillTaps {
                pre_rope_keys: &mut taps.pre_rope_keys,
                last_queries: &mut taps.last_queries,
                rows_before: piece.start,
            };
            model.forward_full(&mut self.full, &sequences, tokens, Some(taps))?
        } else {
            model.forward_full(&mut self.full, &sequences, tokens, None)?
        };
        let logits = model
            .stream()
            .clone_dtoh(&logits)
            .on_gpu("reading the logits back")?;
        self.roster.piece_done(id, tokens.len());
        Ok(logits)
    }

    fn finish_prompt(&mut self, id: RequestId) -> Result<()> {
        let finish = self.roster.plan_finish(id)?;
        if finish.build_shadow {
            let (model, full) = (self.model, &self.full);
            let taps = self.taps[finish.slot].as_ref().ok_or_else(|| {
                invalid_input(
                    "prompt",
                    "has no pre-RoPE keys kept",
                    "a ShadowKV prompt run through prefill",
                )
            })?;
            let shadow = self.shadow.as_mut().ok_or_else(|| {
                invalid_input("mode", "is ShadowKV", "a backend made with ShadowKV")
            })?;
            let (sequence, ()) = shadow.add_built(model.gpu(), finish.tokens, |shadow, sid| {
                Self::build_from_block(model, shadow, sid, full, finish.slot, taps, finish.tokens)
            })?;
            self.shadow_ids.insert(id, sequence);
            self.full.clear_sequence(finish.slot)?;
        }
        self.roster.finish_done(id, finish.build_shadow);
        Ok(())
    }

    fn decode(&mut self, batch: &[(RequestId, u32)]) -> Result<Vec<Vec<f32>>> {
        let plan = self.roster.plan_decode(batch)?;
        let tokens: Vec<u32> = batch.iter().map(|&(_, token)| token).collect();
        self.check_tokens(&tokens)?;
        let shadow_batch = plan
            .shadow
            .iter()
            .map(|row| match self.shadow_ids.get(&row.id) {
                Some(&sequence) => Ok((sequence, row.token)),
                None => Err(invalid_input(
                    "batch",
                    format!("names request {} as ShadowKV without a shadow", row.id),
                    "a ShadowKV sequence whose prompt was closed",
                )),
            })
            .collect::<Result<Vec<(SequenceId, u32)>>>()?;
        let mut exact_logits = Vec::new();
        if !plan.exact.is_empty() {
            let slots: Vec<usize> = plan.exact.iter().map(|row| row.slot).collect();
            let tokens: Vec<u32> = plan.exact.iter().map(|row| row.token).collect();
            exact_logits = self.model.forward(&mut self.full, &slots, &tokens)?;
            self.roster.exact_done(&plan);
        }
        let mut shadow_logits = Vec::new();
        if !shadow_batch.is_empty() {
            let shadow = self.shadow.as_mut().ok_or_else(|| {
                invalid_input(
                    "batch",
                    "holds ShadowKV rows",
                    "a backend made with ShadowKV",
                )
            })?;
            shadow_logits = self.model.decode_shadow_for(shadow, &shadow_batch)?;
            self.roster.shadow_done(&plan);
        }
        plan.merge(self.model.config.vocab, &exact_logits, &shadow_logits)
    }

    fn remove_sequence(&mut self, id: RequestId) {
        let Some(seat) = self.roster.remove(id) else {
            return;
        };
        match seat.placement {
            Placement::Prompt { slot, .. } | Placement::Exact { slot } => {
                // A block index the roster handed out is always the cache's.
                let _ = self.full.clear_sequence(slot);
            }
            Placement::Shadow => {
                if let (Some(shadow), Some(sequence)) =
                    (self.shadow.as_mut(), self.shadow_ids.remove(&id))
                {
                    // Removal only fails for a sequence that is not live, which this one is.
                    let _ = shadow.remove_sequence(self.model.gpu(), sequence);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_too_short_for_the_budget_make_no_shadow_cache() {
        let params = ShadowKvParams::default();
        let capacity = |max_tokens| GpuServeCapacity {
            max_sequences: 3,
            max_tokens,
            max_generated: 24,
        };
        // 2,270 tokens leave 224 selectable chunks of 8 against the default budget's 256.
        assert!(params.check_prompt(2_270).is_err());
        assert_eq!(capacity(2_270).shadow_capacity(&params), None);
        let long = capacity(8_192).shadow_capacity(&params).unwrap();
        assert_eq!(long.max_prompt_len, 8_192);
        assert_eq!(long.max_prompt_tokens, 3 * 8_192);
    }

    /// A Gemma-3 backend's caches: the full blocks of every layer, and in ShadowKV mode the
    /// taps, the shadow cache of its 3 global layers and the full keys and values of its 15
    /// sliding-window layers per sequence; a Llama-shaped model keeps no such slots.
    #[test]
    fn serving_memory_counts_the_sliding_window_layers() {
        let params = ShadowKvParams::default();
        let capacity = GpuServeCapacity {
            max_sequences: 3,
            max_tokens: 8_192,
            max_generated: 24,
        };
        let gemma = ModelConfig::named("gemma-3-270m").unwrap();
        let (kv_dim, q_dim) = (gemma.kv_dim() as u64, gemma.q_dim() as u64);
        let full = capacity.cache_gpu_bytes(&gemma, None).unwrap();
        assert_eq!(full, 3 * 18 * 2 * (kv_dim * 8_192) * 2);
        let home = ValueHome::Host;
        let served = capacity
            .cache_gpu_bytes(&gemma, Some((params, home)))
            .unwrap();
        let taps = 3 * 18 * (8_192 * kv_dim + q_dim) * 2;
        let shadow_capacity = capacity.shadow_capacity(&params).unwrap();
        let shape = gemma.shadow_cache_shape();
        assert_eq!(shape.layers, 3);
        let shadow = ShadowKvCache::memory_for(&shape, &params, home, &shadow_capacity)
            .unwrap()
            .gpu_bytes();
        let local = 3 * 15 * 2 * (kv_dim * (8_192 + 24)) * 2;
        assert_eq!(served, full + taps + shadow + local);
        let llama = ModelConfig::named("llama-3-8b").unwrap();
        let served = capacity
            .cache_gpu_bytes(&llama, Some((params, home)))
            .unwrap();
        let (kv_dim, q_dim) = (llama.kv_dim() as u64, llama.q_dim() as u64);
        let shadow =
            ShadowKvCache::memory_for(&llama.shadow_cache_shape(), &params, home, &shadow_capacity)
                .unwrap()
                .gpu_bytes();
        let full = 3 * 32 * 2 * (kv_dim * 8_192) * 2;
        let taps = 3 * 32 * (8_192 * kv_dim + q_dim) * 2;
        assert_eq!(served, full + taps + shadow);
    }
}
