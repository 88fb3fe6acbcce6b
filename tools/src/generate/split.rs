//! `shadowkv generate --gpus N`: one prompt with the model split over N GPUs of the host, one
//! thread per GPU. Every rank runs the same generation on its shard; the logits are gathered
//! over the vocabulary before each sampling, and every rank samples the same token (the same
//! seed, the same gathered logits). Rank 0 prints.
use std::io::Write;
use std::path::Path;

use shadowkv::cache::CacheCapacity;
use shadowkv_model::tp::{run_ranks, ShardPlan, ShardSource};
use shadowkv_model::{Generation, ModelSource, Sampler};

use super::{DeviceChoice, GenerateArgs};
use crate::args::AttentionMode;
use crate::prefill::{prefill, PREFILL_CHUNK};

pub fn run(
    args: &GenerateArgs,
    path: &Path,
    source: &ModelSource,
    prompts: &[String],
) -> Result<(), Box<dyn std::error::Error>> {
    if prompts.len() != 1 {
        return Err(format!(
            "--gpus {} serves one prompt; {} were given",
            args.gpus,
            prompts.len()
        )
        .into());
    }
    if args.device == DeviceChoice::Cpu {
        return Err("--gpus splits the model over GPUs: leave out --device cpu".into());
    }
    if args.shadowkv.value_tier_bytes()?.is_some() {
        return Err("--value-tier-gib is not planned under --gpus".into());
    }
    let config = &source.config;
    let plan = ShardPlan::new(config, args.gpus)?;
    let rank_config = plan.rank_config();
    let params = args.shadowkv.params();
    if args.attention != AttentionMode::Full {
        shadowkv_model::cpu::shadowkv::validate(&params, &rank_config).map_err(|e| {
            format!(
                "each of the {} GPUs holds {} KV heads: {e}",
                args.gpus, rank_config.kv_heads
            )
        })?;
    }
    let tokens = source.prompt_tokens(&prompts[0], !args.raw)?;
    if args.attention != AttentionMode::Full {
        params.check_prompt(tokens.len())?;
    }
    eprintln!(
        "model {}: {} layers, {} heads / {} KV heads over {} GPUs ({} / {} each); prompt {} tokens; attention {:?}",
        path.display(),
        config.layers,
        config.heads,
        config.kv_heads,
        args.gpus,
        rank_config.heads,
        rank_config.kv_heads,
        tokens.len(),
        args.attention
    );
    let tokenizer = &source.tokenizer;
    let generations = run_ranks(&plan, ShardSource::File(&source.weights), |context| {
        let model = context.model;
        let mut sampler = Sampler::new(args.temperature, args.top_p, args.seed)?;
        let mut stream = tokenizer.stream();
        let lead = context.rank == 0;
        let on_token = |id: u32| -> shadowkv_model::Result<()> {
            if lead && !tokenizer.is_end_of_generation(id) {
                if let Some(text) = stream.push(id)? {
                    print!("{text}");
                    let _ = std::io::stdout().flush();
                }
            }
            Ok(())
        };
        let is_end = |id: u32| tokenizer.is_end_of_generation(id);
        let generation = match args.attention.value_home() {
            None => {
                let mut cache = model.new_cache(&[(tokens.len() + args.max_tokens) as u32])?;
                shadowkv_model::generate(
                    |ids| {
                        let local = prefill(model, &mut cache, 0, ids, None)?;
                        Ok(context.gather_logits(local))
                    },
                    &tokens,
                    &mut sampler,
                    args.max_tokens,
                    is_end,
                    on_token,
                )?
            }
            Some(home) => {
                let capacity = CacheCapacity::uniform(1, tokens.len(), args.max_tokens);
                let storage = home.with_format(args.shadowkv.value_format());
                let mut shadow = model.new_shadow_cache(params, storage, capacity)?;
                shadowkv_model::generate(
                    |ids| {
                        let local = if shadow.sequences().is_empty() {
                            model
                                .prefill_shadow(&mut shadow, ids, PREFILL_CHUNK, |_| {})?
                                .1
                        } else {
                            model.decode_shadow(&mut shadow, ids)?
                        };
                        Ok(context.gather_logits(local))
                    },
                    &tokens,
                    &mut sampler,
                    args.max_tokens,
                    is_end,
                    on_token,
                )?
            }
        };
        if lead {
            print!("{}", stream.finish()?);
            println!();
        }
        Ok(generation)
    })?;
    let generation: &Generation = &generations[0];
    if generations.iter().any(|g| g.tokens != generation.tokens) {
        return Err("the ranks sampled different tokens".into());
    }
    eprintln!(
        "{} GPUs (bf16, attention {:?}): prefill {} tokens in {:.3} s ({:.1} tokens/s); decode {} tokens, {:.1} tokens/s",
        args.gpus,
        args.attention,
        generation.prompt_tokens,
        generation.prefill_seconds,
        generation.prefill_tokens_per_second(),
        generation.tokens.len(),
        generation.decode_tokens_per_second()
    );
    Ok(())
}
