//! Tensor parallelism: one model split over the `N` GPUs of a host.
//!
//! Each rank owns `heads / N` query heads and their `kv_heads / N` KV heads (the rows of Q, K
//! and V, the columns of O), `ffn / N` columns of the MLP (rows of gate and up, columns of
//! down) and a contiguous slice of the vocabulary (rows of the embedding and of the output
//! head). A layer's attention and MLP blocks each end in a matrix whose inputs are split, so
//! every rank holds a partial sum of the block's output; one all-reduce adds them and every
//! rank adds the sum to its copy of the residual stream (the residual is added once, not `N`
//! times). The embedding's all-reduce adds one owner's row to zeros from the others; the
//! output head's logits are gathered, the ranks' slices in rank order.
//!
//! ShadowKV stays within a rank: its cache factorises its own KV heads' pre-RoPE keys (so the
//! factorisation differs from one over all heads; [`crate::CpuCache::shadowkv_grouped`] gives
//! the unsplit model the same grouping), keeps its own landmarks and slots and offloads its
//! values to host memory through its own copy stream.
//!
//! [`plan`] holds the arithmetic, [`cpu`] the in-process CPU reference, [`gpu`] the driver
//! (one thread per GPU) and [`nccl`] the all-reduce, loaded at run time.
pub mod cpu;
pub mod gpu;
pub mod nccl;
pub mod numa;
pub mod plan;

pub use cpu::{TensorParallelCpu, TensorParallelCpuCache};
pub use gpu::{run_ranks, RankContext, ShardSource};
pub use plan::{divisors, vocab_rows, RankShard, ShardPlan, TensorParallelError};
