//! The GPU memory of a ShadowKV prefill, computed on the CPU: what the layer-wise prefill
//! (`GpuModel::prefill_shadow`) holds at its peak, for the capacity planner and to check a
//! measured peak against.
//!
//! The layer-wise prefill runs the whole prompt through one layer (in passes) before the
//! next, so besides the weights it holds the prompt's hidden states (f32, `[prompt, hidden]`),
//! one layer's post-RoPE keys and values, two layers' pre-RoPE keys (the previous layer's are
//! still being factorised beside this layer's passes) and one pass's activations. Its peak is
//! `weights + hidden states + 2 x one layer's K/V + workspace`, whatever the number of layers.
//! A sliding-window layer (Gemma-3's local layers) runs the same way and then copies its keys
//! and values into the sequence's slot of the cache, which the cache allocated when it was
//! made: the bound is the same, and the slots are the cache's (`ModelConfig::local_kv_bytes`).
//! The all-layers route it replaced held every layer's keys, values and pre-RoPE keys: about
//! 1.5 times a full KV cache.
use std::fmt;

use crate::config::ModelConfig;

/// Tokens per pass of a prefill, unless the caller chooses otherwise (bounds the activations).
pub const DEFAULT_PASS_TOKENS: usize = 2048;

/// Room in the workspace for what the formula does not itemise: the passes' token and
/// attention plans, the allocator's rounding, library workspaces that grow on first use (the
/// cuBLAS workspace of a handle is up to 32 MiB on Hopper).
pub const WORKSPACE_SLACK_BYTES: u64 = 128 << 20;

/// The parts of a prefill's peak GPU memory, in bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PrefillMemory {
    /// The model's weights on the GPU.
    pub weights: u64,
    /// The prompt's hidden states, f32 `[prompt, hidden]`.
    pub hidden_states: u64,
    /// One layer's keys and values of the prompt, bf16 `2 x [prompt, kv_heads * head_dim]`.
    pub layer_kv: u64,
    /// One pass's activations, the logits and [`WORKSPACE_SLACK_BYTES`]: independent of the
    /// prompt's length once it is longer than a pass.
    pub workspace: u64,
}

impl PrefillMemory {
    /// The layer-wise prefill of a `prompt_len`-token prompt in passes of `pass_tokens`, with
    /// `weights` bytes of weights (0: the prefill's own memory only).
    pub fn layerwise(
        config: &ModelConfig,
        weights: u64,
        prompt_len: usize,
        pass_tokens: usize,
    ) -> PrefillMemory {
        let prompt = prompt_len as u64;
        PrefillMemory {
            weights,
            hidden_states: prompt * config.hidden as u64 * 4,
            layer_kv: 2 * prompt * config.kv_dim() as u64 * 2,
            workspace: pass_workspace(config, pass_tokens.clamp(1, prompt_len.max(1)))
                + WORKSPACE_SLACK_BYTES,
        }
    }

    /// The bound: `weights + hidden states + 2 x one layer's K/V + workspace`. The two
    /// layers' worth of K/V are one layer's keys and values and two layers' pre-RoPE keys.
    pub fn bound(&self) -> u64 {
        self.weights + self.transient()
    }

    /// What the prefill holds beyond the weights (and the cache it fills).
    pub fn transient(&self) -> u64 {
        self.hidden_states + 2 * self.layer_kv + self.workspace
    }

    /// The all-layers route's peak, for comparison: every layer's keys, values and pre-RoPE
    /// keys (a full cache and half another) and one pass's activations with its f32 hidden
    /// states.
    pub fn all_layers(
        config: &ModelConfig,
        weights: u64,
        prompt_len: usize,
        pass_tokens: usize,
    ) -> u64 {
        let layerwise = PrefillMemory::layerwise(config, weights, prompt_len, pass_tokens);
        let pass = pass_tokens.clamp(1, prompt_len.max(1)) as u64;
        weights
            + config.layers as u64 * layerwise.layer_kv * 3 / 2
            + pass * config.hidden as u64 * 4
            + layerwise.workspace
    }
}

/// The activations of one pass of `tokens` tokens through one layer, the pass's token ids,
/// the last query and the logits of the last token.
fn pass_workspace(config: &ModelConfig, tokens: usize) -> u64 {
    let (hidden, ffn) = (config.hidden as u64, config.ffn as u64);
    let (q, kv) = (config.q_dim() as u64, config.kv_dim() as u64);
    let per_token = hidden * 2 // normed, bf16
        + (q + 2 * kv) * 4 // the fused Q/K/V projection, f32
        + q * 2 * 2 // the rotated queries and the attention output, bf16
        + hidden * 4 * 2 // the output projection and the MLP output, f32
        + 2 * ffn * 4 // gate and up, f32
        + ffn * 2 // the activation, bf16
        + 4; // the token id
    tokens as u64 * per_token + q * 2 + config.vocab as u64 * 4
}

/// Bytes as GB (10^9 bytes), two decimals.
fn gb(bytes: u64) -> String {
    format!("{:.2} GB", bytes as f64 / 1e9)
}

impl fmt::Display for PrefillMemory {
    /// `X GB (weights A, hidden states B, one layer's K/V C, workspace D)`, X the bound.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} (weights {}, hidden states {}, one layer's K/V {}, workspace {})",
            gb(self.bound()),
            gb(self.weights),
            gb(self.hidden_states),
            gb(self.layer_kv),
            gb(self.workspace)
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bound_is_weights_hidden_two_layers_of_kv_and_a_workspace() {
        let config = ModelConfig::named("llama-3-8b").unwrap();
        let weights = config.parameters() as u64 * 2;
        let prompt = 122_880;
        let memory = PrefillMemory::layerwise(&config, weights, prompt, DEFAULT_PASS_TOKENS);
        // f32 hidden states: 122,880 x 4,096 x 4 bytes; one layer's K/V: 2 x 122,880 x 1,024
        // x 2 bytes.
        assert_eq!(memory.hidden_states, 2_013_265_920);
        assert_eq!(memory.layer_kv, 503_316_480);
        assert_eq!(
            memory.bound(),
            weights + memory.hidden_states + 2 * memory.layer_kv + memory.workspace
        );
        assert_eq!(memory.transient(), memory.bound() - weights);
        // The workspace does not grow with the prompt past one pass.
        let longer = PrefillMemory::layerwise(&config, weights, 4 * prompt, DEFAULT_PASS_TOKENS);
        assert_eq!(longer.workspace, memory.workspace);
        assert_eq!(longer.layer_kv, 4 * memory.layer_kv);
        // A pass of 2,048 tokens at Llama-3-8B: about 0.46 GB of activations, and the slack.
        assert!(memory.workspace < 700 << 20, "{memory:?}");
        // The all-layers route holds 1.5 full caches: 24 GB at 122,880 tokens, against about
        // 3.6 GB beyond the weights here (2.0 of hidden states, 1.0 of K/V, 0.6 of workspace).
        let all = PrefillMemory::all_layers(&config, weights, prompt, DEFAULT_PASS_TOKENS);
        assert!(all - weights > 24_000_000_000, "{all}");
        assert!(memory.transient() < 3_700_000_000, "{memory:?}");
        let text = memory.to_string();
        assert!(
            text.contains("hidden states 2.01 GB") && text.contains("one layer's K/V 0.50 GB"),
            "{text}"
        );
    }

    #[test]
    fn short_prompts_and_empty_passes_are_sized_by_the_prompt() {
        let config = ModelConfig::named("llama-3-8b").unwrap();
        let short = PrefillMemory::layerwise(&config, 0, 100, DEFAULT_PASS_TOKENS);
        let exact = PrefillMemory::layerwise(&config, 0, 100, 100);
        assert_eq!(short, exact);
        // A pass of 0 tokens is sized as 1 (the prefill refuses it before allocating).
        let zero = PrefillMemory::layerwise(&config, 0, 100, 0);
        assert_eq!(zero, PrefillMemory::layerwise(&config, 0, 100, 1));
        assert_eq!(short.weights, 0);
    }
}
