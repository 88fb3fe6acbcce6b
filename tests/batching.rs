//! GPU tests of continuous batching in `ShadowKvCache`: decode steps over any subset of the
//! live sequences in any order (`attend_for`, `append_for`, `decode_layer_for`) against caches
//! that hold one sequence each, a prefill interleaved with other sequences' steps, GPU memory
//! over 10,000 steps with sequences joining and leaving, and bad ids and tensors, each
//! followed by a correct call.
//! Without a GPU every test here is reported as ignored (see `run_gpu_tests`).
use half::bf16;
use rand::{rngs::StdRng, seq::SliceRandom, Rng, SeedableRng};
use shadowkv::cudarc::driver::CudaSlice;
use shadowkv::kernels::random;
use shadowkv::reference::relative_error;
use shadowkv::{
    CacheCapacity, CacheShape, DecodeAttentionPlan, DecodeAttentionShape, Error, Gpu,
    PrefillSource, RopeConfig, SequenceId, SequenceLayout, ShadowKvCache, ShadowKvParams,
    ValueHome,
};
use shadowkv_suite::{poisoned, random_bf16, run_gpu_tests, to_f64};

fn main() {
    run_gpu_tests(&[
        (
            "subset_steps_match_a_cache_per_sequence",
            subsets_match_alone,
        ),
        (
            "a_prefill_interleaved_with_other_sequences_steps",
            interleaved_prefill,
        ),
        (
            "gpu_memory_flat_over_10000_steps_with_joins_and_leaves",
            memory_flat,
        ),
        ("bad_ids_and_tensors_then_a_correct_call", rejects_bad_input),
    ])
}

fn s(error: impl std::fmt::Display) -> String {
    error.to_string()
}

const SHAPE: CacheShape = CacheShape {
    layers: 2,
    q_heads: 4,
    kv_heads: 2,
    head_dim: 64,
    rope: RopeConfig::LLAMA_3,
};

/// 8 chunks of 8 tokens selected per head; 4 local and 4 outlier chunks.
fn params() -> ShadowKvParams {
    ShadowKvParams {
        chunk_size: 8,
        sparse_budget: 64,
        rank: 32,
        local_chunks: 4,
        outlier_chunks: 4,
    }
}

/// Prompt lengths 64 tokens apart: the same local window (64 tokens) and exact rows (96), so
/// every sequence's K/V block has the same capacity.
const LENS: [usize; 3] = [512, 576, 640];
/// Generated tokens each sequence has room for: with 96 exact rows and 64 slot rows, K/V
/// blocks of 256 rows, which every batch here splits into blocks of 128 tokens.
const MAX_GENERATED: usize = 96;

fn kv_width() -> usize {
    SHAPE.kv_heads * SHAPE.head_dim
}

fn q_width() -> usize {
    SHAPE.q_heads * SHAPE.head_dim
}

/// `len` bf16 values drawn from `seed` on the GPU.
fn random_buffer(gpu: &Gpu, len: usize, seed: u64) -> Result<CudaSlice<bf16>, String> {
    let mut buffer = poisoned(gpu, len).map_err(s)?;
    random::fill(gpu, gpu.stream(), &mut buffer, seed, 1.0, 0.0).map_err(s)?;
    Ok(buffer)
}

/// One layer's prompt of one sequence on the GPU: pre-RoPE keys `[L, Hkv*d]`, post-RoPE keys
/// and values `[Hkv, L, d]`, the last query `[Hq, d]`.
struct Prompt {
    len: usize,
    pre_rope: CudaSlice<bf16>,
    keys: CudaSlice<bf16>,
    values: CudaSlice<bf16>,
    query: CudaSlice<bf16>,
}

impl Prompt {
    fn new(gpu: &Gpu, len: usize, seed: u64) -> Result<Prompt, String> {
        let kv = len * kv_width();
        Ok(Prompt {
            len,
            pre_rope: random_buffer(gpu, kv, seed)?,
            keys: random_buffer(gpu, kv, seed + 1)?,
            values: random_buffer(gpu, kv, seed + 2)?,
            query: random_buffer(gpu, q_width(), seed + 3)?,
        })
    }

    /// Prefills `layer` of `id` from this prompt.
    fn prefill(
        &self,
        gpu: &Gpu,
        cache: &mut ShadowKvCache,
        id: SequenceId,
        layer: usize,
    ) -> Result<(), String> {
        let source = PrefillSource {
            keys: &self.keys,
            values: &self.values,
            layout: SequenceLayout {
                offset: 0,
                capacity: self.len as u32,
                len: self.len as u32,
            },
        };
        cache
            .prefill_layer(gpu, layer, id, &self.pre_rope, &source, &self.query)
            .map_err(s)
    }
}

/// Each sequence's prompt per layer: `prompts[sequence][layer]`.
fn prompts(gpu: &Gpu, lens: &[usize]) -> Result<Vec<Vec<Prompt>>, String> {
    lens.iter()
        .enumerate()
        .map(|(b, &len)| {
            (0..SHAPE.layers)
                .map(|layer| Prompt::new(gpu, len, 1000 * (b as u64 + 1) + 10 * layer as u64))
                .collect()
        })
        .collect()
}

fn new_cache(gpu: &Gpu, lens: &[usize]) -> Result<ShadowKvCache, String> {
    let capacity = CacheCapacity {
        max_sequences: lens.len(),
        max_prompt_len: *lens.iter().max().unwrap_or(&1),
        max_prompt_tokens: lens.iter().sum(),
        max_generated: MAX_GENERATED,
    };
    ShadowKvCache::new(gpu, SHAPE, params(), ValueHome::Host, capacity).map_err(s)
}

/// One sequence's inputs of one layer of one step: its query, new key and new value.
struct Token {
    q: Vec<bf16>,
    k: Vec<bf16>,
    v: Vec<bf16>,
}

fn token(step: usize, layer: usize, sequence: usize) -> Token {
    let mut rng =
        StdRng::seed_from_u64(((step as u64) << 20) | ((layer as u64) << 8) | sequence as u64);
    Token {
        q: random_bf16(&mut rng, q_width(), 1.0),
        k: random_bf16(&mut rng, kv_width(), 1.0),
        v: random_bf16(&mut rng, kv_width(), 1.0),
    }
}

/// The tensors of a step of `tokens`, in order, on the GPU: (q, keys, values, poisoned out).
#[allow(clippy::type_complexity)]
fn upload(
    gpu: &Gpu,
    tokens: &[&Token],
) -> Result<
    (
        CudaSlice<bf16>,
        CudaSlice<bf16>,
        CudaSlice<bf16>,
        CudaSlice<bf16>,
    ),
    String,
> {
    let stream = gpu.stream();
    let q: Vec<bf16> = tokens.iter().flat_map(|t| t.q.iter().copied()).collect();
    let k: Vec<bf16> = tokens.iter().flat_map(|t| t.k.iter().copied()).collect();
    let v: Vec<bf16> = tokens.iter().flat_map(|t| t.v.iter().copied()).collect();
    Ok((
        stream.clone_htod(&q).map_err(s)?,
        stream.clone_htod(&k).map_err(s)?,
        stream.clone_htod(&v).map_err(s)?,
        poisoned(gpu, q.len()).map_err(s)?,
    ))
}

/// How outputs of a subset step must match those of a cache of one sequence. Bit for bit
/// when every batch of these sequences splits its attention alike: the split length follows
/// the batch's longest K/V block (`DecodeAttentionPlan::new`), and all blocks here have the
/// same capacity, so the plans agree; else (another GPU's occupancy, say) within 1e-3.
fn bitwise_expected(gpu: &Gpu, cache: &ShadowKvCache, ids: &[SequenceId]) -> Result<bool, String> {
    let layouts: Vec<SequenceLayout> = ids
        .iter()
        .map(|&id| {
            cache.layout(0, id).map(|l| SequenceLayout {
                len: l.kv.capacity,
                ..l.kv
            })
        })
        .collect::<shadowkv::Result<_>>()
        .map_err(s)?;
    let mut split_lens = Vec::new();
    for batch in 1..=layouts.len() {
        let shape = DecodeAttentionShape {
            batch,
            q_heads: SHAPE.q_heads,
            kv_heads: SHAPE.kv_heads,
            head_dim: SHAPE.head_dim,
        };
        let plan = DecodeAttentionPlan::for_gpu(gpu, shape, &layouts[..batch]).map_err(s)?;
        split_lens.push(plan.split_len());
    }
    let same = split_lens.windows(2).all(|w| w[0] == w[1]);
    eprintln!(
        "split lengths by batch size {split_lens:?}: outputs compared {}",
        if same { "bit for bit" } else { "within 1e-3" }
    );
    Ok(same)
}

/// Row `row` of a `[rows, Hq, d]` output against a cache of one sequence's `[1, Hq, d]`.
fn compare(
    what: &str,
    got: &[bf16],
    row: usize,
    alone: &[bf16],
    bitwise: bool,
) -> Result<(), String> {
    let got = &got[row * q_width()..(row + 1) * q_width()];
    if got.iter().any(|x| !x.to_f32().is_finite()) {
        return Err(format!("{what}: an output is not finite"));
    }
    if bitwise {
        let differing = got
            .iter()
            .zip(alone)
            .filter(|(a, b)| a.to_bits() != b.to_bits())
            .count();
        if differing > 0 {
            return Err(format!(
                "{what}: {differing} of {} values differ from the cache of the sequence alone \
                 (relative error {:.2e})",
                got.len(),
                relative_error(&to_f64(got), &to_f64(alone))
            ));
        }
    } else {
        let error = relative_error(&to_f64(got), &to_f64(alone));
        if error > 1e-3 {
            return Err(format!(
                "{what}: relative error {error:.2e} against the cache of the sequence alone"
            ));
        }
    }
    Ok(())
}

/// A cache per sequence, each prefilled from the same prompts as in the shared cache.
fn alone_caches(
    gpu: &Gpu,
    prompts: &[Vec<Prompt>],
) -> Result<Vec<(ShadowKvCache, SequenceId)>, String> {
    let mut caches = Vec::new();
    for layers in prompts {
        let mut cache = new_cache(gpu, &[layers[0].len])?;
        let id = cache.add_sequence(gpu, layers[0].len).map_err(s)?;
        for (layer, prompt) in layers.iter().enumerate() {
            prompt.prefill(gpu, &mut cache, id, layer)?;
        }
        cache.check_prefill().map_err(s)?;
        caches.push((cache, id));
    }
    Ok(caches)
}

/// How a step of the shared cache is issued.
#[derive(Clone, Copy, Debug)]
enum Call {
    /// `attend_for`.
    AttendFor,
    /// `append_for`, then `decode_layer_for`.
    AppendThenDecode,
    /// `attend` over every live sequence (the subset must be all of them, in order).
    Attend,
}

/// One step over `subset` (indices into `ids`, in the step's order) in every layer of the
/// shared cache and, for each sequence of the subset, of its own cache; outputs compared.
#[allow(clippy::too_many_arguments)]
fn step(
    gpu: &Gpu,
    shared: &mut ShadowKvCache,
    ids: &[SequenceId],
    alone: &mut [(ShadowKvCache, SequenceId)],
    steps_taken: &mut [usize],
    subset: &[usize],
    call: Call,
    bitwise: bool,
) -> Result<(), String> {
    let stream = gpu.stream().clone();
    let chosen: Vec<SequenceId> = subset.iter().map(|&b| ids[b]).collect();
    for layer in 0..SHAPE.layers {
        let tokens: Vec<Token> = subset
            .iter()
            .map(|&b| token(steps_taken[b], layer, b))
            .collect();
        let (q, k, v, mut out) = upload(gpu, &tokens.iter().collect::<Vec<_>>())?;
        match call {
            Call::AttendFor => shared.attend_for(gpu, layer, &chosen, &q, &k, &v, &mut out),
            Call::AppendThenDecode => shared
                .append_for(gpu, layer, &chosen, &k, &v)
                .and_then(|()| shared.decode_layer_for(gpu, layer, &chosen, &q, &mut out)),
            Call::Attend => shared.attend(gpu, layer, &q, &k, &v, &mut out),
        }
        .map_err(|e| format!("{call:?} {subset:?} layer {layer}: {e}"))?;
        let got = stream.clone_dtoh(&out).map_err(s)?;
        for (row, (&b, token)) in subset.iter().zip(&tokens).enumerate() {
            let (cache, _) = &mut alone[b];
            let (q1, k1, v1, mut out1) = upload(gpu, &[token])?;
            cache
                .attend(gpu, layer, &q1, &k1, &v1, &mut out1)
                .map_err(s)?;
            let expected = stream.clone_dtoh(&out1).map_err(s)?;
            let what = format!(
                "{call:?} {subset:?}, layer {layer}: sequence {b} (its step {})",
                steps_taken[b]
            );
            compare(&what, &got, row, &expected, bitwise)?;
        }
    }
    for &b in subset {
        steps_taken[b] += 1;
    }
    Ok(())
}

/// (a) Three sequences of different prompt lengths; steps over {0,2}, {2,1,0}, {1} and the
/// whole batch in changing orders, through each entry point: every sequence's output equals
/// that of a cache holding it alone, fed the same inputs at its own steps.
fn subsets_match_alone(gpu: &Gpu) -> Result<(), String> {
    let prompts = prompts(gpu, &LENS)?;
    let mut shared = new_cache(gpu, &LENS)?;
    let mut ids = Vec::new();
    for layers in &prompts {
        let id = shared.add_sequence(gpu, layers[0].len).map_err(s)?;
        for (layer, prompt) in layers.iter().enumerate() {
            prompt.prefill(gpu, &mut shared, id, layer)?;
        }
        ids.push(id);
    }
    shared.check_prefill().map_err(s)?;
    let mut alone = alone_caches(gpu, &prompts)?;
    let bitwise = bitwise_expected(gpu, &shared, &ids)?;
    let schedule: [(&[usize], Call); 12] = [
        (&[0, 2], Call::AttendFor),
        (&[2, 1, 0], Call::AttendFor),
        (&[1], Call::AppendThenDecode),
        (&[0, 1, 2], Call::Attend),
        (&[1, 0, 2], Call::AppendThenDecode),
        (&[0, 2], Call::AppendThenDecode),
        (&[2, 0, 1], Call::AttendFor),
        (&[1], Call::AttendFor),
        (&[2], Call::AttendFor),
        (&[0, 1, 2], Call::Attend),
        (&[1, 2, 0], Call::AttendFor),
        (&[2, 0], Call::AttendFor),
    ];
    let mut steps_taken = vec![0usize; ids.len()];
    for _ in 0..2 {
        for &(subset, call) in &schedule {
            step(
                gpu,
                &mut shared,
                &ids,
                &mut alone,
                &mut steps_taken,
                subset,
                call,
                bitwise,
            )?;
        }
    }
    // Each sequence's K/V block holds its own steps' tokens, no one else's.
    for (b, &id) in ids.iter().enumerate() {
        let layout = shared.layout(0, id).map_err(s)?;
        let base = layout.sparse_start + params().sparse_budget as u32;
        if layout.kv.len != base + steps_taken[b] as u32 {
            return Err(format!(
                "sequence {b}: K/V length {} after {} steps (base {base})",
                layout.kv.len, steps_taken[b]
            ));
        }
    }
    eprintln!("subset steps: {steps_taken:?} steps per sequence match their own caches");
    Ok(())
}

/// (b) Sequences 0 and 1 decode while sequence 2 is prefilled one layer per step; then all
/// three decode. Every output equals its cache-alone counterpart; a step that names sequence 2
/// in a layer not yet prefilled is refused and the next correct step goes on.
fn interleaved_prefill(gpu: &Gpu) -> Result<(), String> {
    let prompts = prompts(gpu, &LENS)?;
    let mut shared = new_cache(gpu, &LENS)?;
    let mut ids = Vec::new();
    for layers in &prompts[..2] {
        let id = shared.add_sequence(gpu, layers[0].len).map_err(s)?;
        for (layer, prompt) in layers.iter().enumerate() {
            prompt.prefill(gpu, &mut shared, id, layer)?;
        }
        ids.push(id);
    }
    let late = shared.add_sequence(gpu, LENS[2]).map_err(s)?;
    ids.push(late);
    let mut alone = alone_caches(gpu, &prompts)?;
    let bitwise = bitwise_expected(gpu, &shared, &ids)?;
    let mut steps_taken = vec![0usize; ids.len()];
    let orders: [&[usize]; 2] = [&[0, 1], &[1, 0]];
    for layer in 0..SHAPE.layers {
        // The late sequence is not decodable before its every layer is prefilled.
        let q = poisoned(gpu, q_width()).map_err(s)?;
        let mut out = poisoned(gpu, q_width()).map_err(s)?;
        match shared.decode_layer_for(gpu, layer, &[late], &q, &mut out) {
            Err(Error::InvalidArgument {
                argument: "ids",
                problem,
                ..
            }) if problem.contains("not prefilled") && problem.contains(&format!("{late:?}")) => {}
            other => {
                return Err(format!(
                    "layer {layer} of the late sequence before its prefill: expected an error \
                     naming ids and {late:?}, got {other:?}"
                ))
            }
        }
        step(
            gpu,
            &mut shared,
            &ids,
            &mut alone,
            &mut steps_taken,
            orders[layer % 2],
            Call::AttendFor,
            bitwise,
        )?;
        prompts[2][layer].prefill(gpu, &mut shared, late, layer)?;
        step(
            gpu,
            &mut shared,
            &ids,
            &mut alone,
            &mut steps_taken,
            orders[(layer + 1) % 2],
            Call::AppendThenDecode,
            bitwise,
        )?;
    }
    shared.check_prefill().map_err(s)?;
    for round in 0..6 {
        let subset: &[usize] = [&[2, 0, 1][..], &[0, 1, 2], &[1, 2]][round % 3];
        let call = if round % 3 == 1 {
            Call::Attend
        } else {
            Call::AttendFor
        };
        step(
            gpu,
            &mut shared,
            &ids,
            &mut alone,
            &mut steps_taken,
            subset,
            call,
            bitwise,
        )?;
    }
    eprintln!("interleaved prefill: {steps_taken:?} steps per sequence match their own caches");
    Ok(())
}

/// (c) 10,000 steps of one layer over random subsets in random orders, sequences joining
/// (prefilled at once) and leaving (when full, or at random): GPU memory after equals memory
/// after a warm-up that saw every batch size and every sequence slot.
fn memory_flat(gpu: &Gpu) -> Result<(), String> {
    const STEPS: usize = 10_000;
    const WARM_UP: usize = 500;
    const MAX_LIVE: usize = 4;
    const LEN: usize = 128;
    let shape = CacheShape {
        layers: 1,
        q_heads: 2,
        kv_heads: 1,
        head_dim: 64,
        rope: RopeConfig::LLAMA_3,
    };
    // 8 chunks outside the local window, all selectable: every slot is a candidate.
    let params = ShadowKvParams {
        chunk_size: 8,
        sparse_budget: 64,
        rank: 16,
        local_chunks: 4,
        outlier_chunks: 0,
    };
    let max_generated = 48;
    let capacity = CacheCapacity::uniform(MAX_LIVE, LEN, max_generated);
    let mut cache = ShadowKvCache::new(gpu, shape, params, ValueHome::Host, capacity).map_err(s)?;
    let (q_width, kv_width) = (
        shape.q_heads * shape.head_dim,
        shape.kv_heads * shape.head_dim,
    );
    let kv = LEN * kv_width;
    let (pre_rope, keys, values, query) = (
        random_buffer(gpu, kv, 1)?,
        random_buffer(gpu, kv, 2)?,
        random_buffer(gpu, kv, 3)?,
        random_buffer(gpu, q_width, 4)?,
    );
    let source = PrefillSource {
        keys: &keys,
        values: &values,
        layout: SequenceLayout {
            offset: 0,
            capacity: LEN as u32,
            len: LEN as u32,
        },
    };
    let q = random_buffer(gpu, MAX_LIVE * q_width, 5)?;
    let new_keys = random_buffer(gpu, MAX_LIVE * kv_width, 6)?;
    let new_values = random_buffer(gpu, MAX_LIVE * kv_width, 7)?;
    let mut out = poisoned(gpu, MAX_LIVE * q_width).map_err(s)?;
    let mut rng = StdRng::seed_from_u64(0xba7c);
    // (id, generated tokens)
    let mut live: Vec<(SequenceId, usize)> = Vec::new();
    let (mut joins, mut leaves) = (0usize, 0usize);
    let mut free_before = 0;
    let started = std::time::Instant::now();
    for step in 0..STEPS {
        if step == WARM_UP {
            gpu.stream().synchronize().map_err(s)?;
            cache.check_prefill().map_err(s)?;
            free_before = gpu.context().mem_get_info().map_err(s)?.0;
        }
        // Leaves: a full sequence, or one at random now and then.
        let mut i = 0;
        while i < live.len() {
            let (id, generated) = live[i];
            if generated >= max_generated || rng.gen_bool(0.01) {
                cache.remove_sequence(gpu, id).map_err(s)?;
                live.swap_remove(i);
                leaves += 1;
            } else {
                i += 1;
            }
        }
        // Joins: at the start every slot fills; later now and then while there is room.
        while live.len() < MAX_LIVE && (step == 0 || rng.gen_bool(0.15)) {
            let id = cache.add_sequence(gpu, LEN).map_err(s)?;
            cache
                .prefill_layer(gpu, 0, id, &pre_rope, &source, &query)
                .map_err(s)?;
            live.push((id, 0));
            joins += 1;
            if step != 0 {
                break;
            }
        }
        if live.is_empty() {
            continue;
        }
        // A subset of every size in turn (all sizes during the warm-up), in a random order.
        let size = 1 + step % live.len();
        let mut order: Vec<usize> = (0..live.len()).collect();
        order.shuffle(&mut rng);
        order.truncate(size);
        let ids: Vec<SequenceId> = order.iter().map(|&i| live[i].0).collect();
        let n = ids.len();
        cache
            .attend_for(
                gpu,
                0,
                &ids,
                &q.slice(0..n * q_width),
                &new_keys.slice(0..n * kv_width),
                &new_values.slice(0..n * kv_width),
                &mut out.slice_mut(0..n * q_width),
            )
            .map_err(|e| format!("step {step}: {e}"))?;
        for &i in &order {
            live[i].1 += 1;
        }
    }
    gpu.stream().synchronize().map_err(s)?;
    cache.check_prefill().map_err(s)?;
    let (free_after, _) = gpu.context().mem_get_info().map_err(s)?;
    let seconds = started.elapsed().as_secs_f64();
    eprintln!(
        "{STEPS} steps in {seconds:.1} s, {joins} joins, {leaves} leaves: free GPU memory \
         {free_before} -> {free_after} after a warm-up of {WARM_UP} steps"
    );
    let last = gpu.stream().clone_dtoh(&out).map_err(s)?;
    if last[..q_width].iter().any(|x| !x.to_f32().is_finite()) {
        return Err("the last step's output is not finite".into());
    }
    // The memory pool's granularity may move what the driver reports by a page; growth per
    // step (a buffer per call) would be far more over 9,500 steps.
    const SLACK: usize = 2 << 20;
    if free_after + SLACK < free_before {
        return Err(format!(
            "GPU memory grew by {} bytes over {} steps",
            free_before - free_after,
            STEPS - WARM_UP
        ));
    }
    Ok(())
}

/// A bad id list: what it is, the ids, the layer, what the error must mention.
type BadIds<'a> = (&'a str, &'a [SequenceId], usize, Vec<String>);

/// `result` is an `InvalidArgument` naming `argument` whose problem mentions each of `needles`.
fn expect_invalid<T>(
    what: &str,
    result: shadowkv::Result<T>,
    argument: &str,
    needles: &[String],
) -> Result<(), String> {
    match result {
        Err(Error::InvalidArgument {
            argument: got,
            ref problem,
            ..
        }) if got == argument && needles.iter().all(|n| problem.contains(n.as_str())) => Ok(()),
        Err(other) => Err(format!(
            "{what}: expected an error naming {argument} and {needles:?}, got {other}"
        )),
        Ok(_) => Err(format!(
            "{what}: expected an error naming {argument}, got Ok"
        )),
    }
}

/// (d) Unknown, removed and repeated ids, an id not prefilled in the layer, empty ids and
/// tensors of the wrong length: each refused with `InvalidArgument` naming the argument (and
/// the id), changing nothing, and the next correct call works.
fn rejects_bad_input(gpu: &Gpu) -> Result<(), String> {
    let lens = [LENS[0], LENS[1], LENS[0]];
    let prompts = prompts(gpu, &lens)?;
    let mut cache = new_cache(gpu, &lens)?;
    let ready = cache.add_sequence(gpu, lens[0]).map_err(s)?;
    for (layer, prompt) in prompts[0].iter().enumerate() {
        prompt.prefill(gpu, &mut cache, ready, layer)?;
    }
    // Prefilled in layer 0 only.
    let half = cache.add_sequence(gpu, lens[1]).map_err(s)?;
    prompts[1][0].prefill(gpu, &mut cache, half, 0)?;
    let removed = cache.add_sequence(gpu, lens[2]).map_err(s)?;
    cache.remove_sequence(gpu, removed).map_err(s)?;
    cache.check_prefill().map_err(s)?;

    let mut step = 0;
    // The correct call after each error: a step of `ready` (and `half` in layer 0).
    let mut correct = |cache: &mut ShadowKvCache, after: &str| -> Result<(), String> {
        for layer in 0..SHAPE.layers {
            let chosen: Vec<SequenceId> = if layer == 0 {
                vec![half, ready]
            } else {
                vec![ready]
            };
            let tokens: Vec<Token> = (0..chosen.len()).map(|b| token(step, layer, b)).collect();
            let (q, k, v, mut out) = upload(gpu, &tokens.iter().collect::<Vec<_>>())?;
            cache
                .attend_for(gpu, layer, &chosen, &q, &k, &v, &mut out)
                .map_err(|e| format!("the correct call after {after}: {e}"))?;
            let out = gpu.stream().clone_dtoh(&out).map_err(s)?;
            if out.iter().any(|x| !x.to_f32().is_finite()) {
                return Err(format!("the correct call after {after}: output not finite"));
            }
        }
        step += 1;
        Ok(())
    };
    // What the errors must not change: every live sequence's lengths in every layer.
    let lengths = |cache: &ShadowKvCache| -> Result<Vec<u32>, String> {
        let mut lengths = Vec::new();
        for id in [ready, half] {
            for layer in 0..SHAPE.layers {
                lengths.push(cache.layout(layer, id).map_err(s)?.kv.len);
            }
        }
        Ok(lengths)
    };
    correct(&mut cache, "nothing")?;

    let stream = gpu.stream().clone();
    let one = |n: usize| poisoned(gpu, n);
    let (q2, kv2) = (
        one(2 * q_width()).map_err(s)?,
        one(2 * kv_width()).map_err(s)?,
    );
    let (q1, kv1) = (one(q_width()).map_err(s)?, one(kv_width()).map_err(s)?);
    let mut out2 = one(2 * q_width()).map_err(s)?;
    let mut out1 = one(q_width()).map_err(s)?;
    let unknown_ids = [ready, removed];
    let repeated = [ready, ready];
    let only_half = [half];
    // (what, ids, layer, what the error must mention)
    let cases: [BadIds<'_>; 4] = [
        (
            "a removed id",
            &unknown_ids,
            0,
            vec![format!("{removed:?}"), "not live".into()],
        ),
        (
            "a repeated id",
            &repeated,
            0,
            vec![format!("{ready:?}"), "repeats".into()],
        ),
        (
            "an id not prefilled in the layer",
            &only_half,
            1,
            vec![format!("{half:?}"), "not prefilled".into()],
        ),
        ("no ids", &[], 0, vec!["empty".into()]),
    ];
    for (what, ids, layer, needles) in &cases {
        let before = lengths(&cache)?;
        let (q, kv, out) = if ids.len() == 2 {
            (&q2, &kv2, &mut out2)
        } else {
            (&q1, &kv1, &mut out1)
        };
        expect_invalid(
            &format!("attend_for with {what}"),
            cache.attend_for(gpu, *layer, ids, q, kv, kv, out),
            "ids",
            needles,
        )?;
        expect_invalid(
            &format!("append_for with {what}"),
            cache.append_for(gpu, *layer, ids, kv, kv),
            "ids",
            needles,
        )?;
        expect_invalid(
            &format!("decode_layer_for with {what}"),
            cache.decode_layer_for(gpu, *layer, ids, q, out),
            "ids",
            needles,
        )?;
        if lengths(&cache)? != before {
            return Err(format!(
                "{what}: the refused calls changed a sequence's length"
            ));
        }
        correct(&mut cache, what)?;
    }
    // Tensors of the wrong length for two sequences: none of the step runs (no append).
    let pair = [ready, half];
    let short_q = q2.slice(0..q_width());
    let short_kv = kv2.slice(0..kv_width());
    let before = lengths(&cache)?;
    expect_invalid(
        "attend_for with a short q",
        cache.attend_for(gpu, 0, &pair, &short_q, &kv2, &kv2, &mut out2),
        "q",
        &[],
    )?;
    expect_invalid(
        "attend_for with short keys",
        cache.attend_for(gpu, 0, &pair, &q2, &short_kv, &kv2, &mut out2),
        "keys",
        &[],
    )?;
    expect_invalid(
        "attend_for with short values",
        cache.attend_for(gpu, 0, &pair, &q2, &kv2, &short_kv, &mut out2),
        "values",
        &[],
    )?;
    expect_invalid(
        "attend_for with a short out",
        cache.attend_for(gpu, 0, &pair, &q2, &kv2, &kv2, &mut out1),
        "out",
        &[],
    )?;
    expect_invalid(
        "append_for with short keys",
        cache.append_for(gpu, 0, &pair, &short_kv, &kv2),
        "keys",
        &[],
    )?;
    expect_invalid(
        "decode_layer_for with a short q",
        cache.decode_layer_for(gpu, 0, &pair, &short_q, &mut out2),
        "q",
        &[],
    )?;
    // The all-sequences forms refuse a layer where one live sequence is not prefilled.
    expect_invalid(
        "attend over every sequence in a layer one was not prefilled in",
        cache.attend(gpu, 1, &q2, &kv2, &kv2, &mut out2),
        "layer",
        &["not prefilled".into()],
    )?;
    if lengths(&cache)? != before {
        return Err("refused tensors changed a sequence's length".into());
    }
    correct(&mut cache, "tensors of the wrong length")?;
    // A sequence that is full is refused; the others go on.
    let mut full_after = 0;
    loop {
        match cache.append_for(gpu, 1, &[ready], &kv1, &kv1) {
            Ok(()) => full_after += 1,
            Err(Error::CapacityExhausted { .. }) => break,
            Err(other) => return Err(format!("appending until full: {other}")),
        }
        if full_after > MAX_GENERATED {
            return Err("append_for never ran out of room".into());
        }
    }
    let tokens = [token(99, 0, 1)];
    let (q, k, v, mut out) = upload(gpu, &tokens.iter().collect::<Vec<_>>())?;
    cache
        .attend_for(gpu, 0, &[half], &q, &k, &v, &mut out)
        .map_err(|e| format!("a step of another sequence after one ran full: {e}"))?;
    stream.synchronize().map_err(s)?;
    eprintln!(
        "bad ids and tensors refused; {} correct calls between them",
        step
    );
    Ok(())
}
