//! Deterministic RULER-style task generators: from a task, a context length in the model's
//! tokens, a needle depth and a seed, the same prompt every time.
//!
//! Needle tasks hide `One of the special magic numbers for KEY is: VALUE.` sentences in a
//! haystack of RULER's noise sentences; variable tracking hides a chain of assignments;
//! common- and frequent-words extraction fill the context with a word list. The random
//! content (keys, values, distractors) depends on the seed alone, so only the amount of filler
//! changes with the length, which [`generate`] fits to the target through the caller's token
//! count of the finished prompt.
use rand::seq::SliceRandom;
use rand::{rngs::StdRng, Rng, SeedableRng};

use super::words::{ADJECTIVES, NOISE, NOUNS};
use super::EvalError;

/// A RULER-style task.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Task {
    /// One needle with a 7-digit number.
    NiahNumber,
    /// One needle with a word.
    NiahWord,
    /// One needle with a UUID-like key.
    NiahUuid,
    /// One needle among distractor needles of other keys.
    MultiKey,
    /// Four values under one key, all asked for.
    MultiValue,
    /// Four keys, all asked for.
    MultiQuery,
    /// A chain of variable assignments: every variable holding the value.
    VariableTracking,
    /// The ten most common words of a list.
    CommonWords,
    /// The three most frequent words of a coded text.
    FrequentWords,
}

impl Task {
    /// Every task, in report order.
    pub const ALL: [Task; 9] = [
        Task::NiahNumber,
        Task::NiahWord,
        Task::NiahUuid,
        Task::MultiKey,
        Task::MultiValue,
        Task::MultiQuery,
        Task::VariableTracking,
        Task::CommonWords,
        Task::FrequentWords,
    ];

    /// The task's name on the command line and in reports.
    pub fn name(self) -> &'static str {
        match self {
            Task::NiahNumber => "niah-number",
            Task::NiahWord => "niah-word",
            Task::NiahUuid => "niah-uuid",
            Task::MultiKey => "multikey",
            Task::MultiValue => "multivalue",
            Task::MultiQuery => "multiquery",
            Task::VariableTracking => "vt",
            Task::CommonWords => "cwe",
            Task::FrequentWords => "fwe",
        }
    }

    /// The task called `name`, or an error listing the valid names.
    pub fn parse(name: &str) -> Result<Task, EvalError> {
        Task::ALL
            .into_iter()
            .find(|t| t.name() == name.trim())
            .ok_or_else(|| EvalError::UnknownTask {
                name: name.to_owned(),
                valid: Task::ALL.map(Task::name).join(", "),
            })
    }

    /// A comma-separated list of task names.
    pub fn parse_list(names: &str) -> Result<Vec<Task>, EvalError> {
        let mut tasks = Vec::new();
        for name in names.split(',').filter(|n| !n.trim().is_empty()) {
            let task = Task::parse(name)?;
            if !tasks.contains(&task) {
                tasks.push(task);
            }
        }
        Ok(tasks)
    }

    /// Whether the task hides its answer at a depth (the needle tasks); the others spread it
    /// over the whole context and are generated once per length.
    pub fn uses_depth(self) -> bool {
        matches!(
            self,
            Task::NiahNumber
                | Task::NiahWord
                | Task::NiahUuid
                | Task::MultiKey
                | Task::MultiValue
                | Task::MultiQuery
        )
    }

    /// Most tokens the answer may take (RULER's limits, shortened where the answer is short).
    pub fn max_new_tokens(self) -> usize {
        match self {
            Task::NiahNumber | Task::NiahWord | Task::MultiKey => 24,
            Task::NiahUuid => 40,
            Task::MultiValue | Task::MultiQuery => 64,
            Task::VariableTracking => 40,
            Task::CommonWords => 120,
            Task::FrequentWords => 50,
        }
    }
}

/// One generated prompt: the user message's parts, the start of the answer the model
/// continues, and the answers the scorer looks for.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    pub task: Task,
    /// The context length asked for, in the model's tokens (the prompt fits within it).
    pub target_tokens: usize,
    /// Where the (first) needle sits, 0 (start) to 1 (end); `None` for depth-less tasks.
    pub depth: Option<f64>,
    pub seed: u64,
    pub instruction: String,
    /// The haystack with its needles, or the word list.
    pub context: String,
    pub question: String,
    /// Given as the start of the model's answer, which continues it.
    pub answer_prefix: String,
    /// What a right answer names: every one of them for full credit.
    pub answers: Vec<String>,
    /// Byte offsets in `context` of the needles that carry the answers.
    pub needle_offsets: Vec<usize>,
    /// Filler units (haystack sentences or list words) the fit settled on.
    pub filler_units: usize,
}

impl Sample {
    /// The user message: instruction, context, question.
    pub fn user_message(&self) -> String {
        format!(
            "{}\n\n{}\n\n{}",
            self.instruction, self.context, self.question
        )
    }
}

/// A needle sentence: its text, its depth, and whether it carries an answer.
#[derive(Clone, Debug)]
struct Needle {
    text: String,
    depth: f64,
    real: bool,
}

/// What fills the context.
#[derive(Clone, Debug)]
enum Body {
    /// Noise sentences with needles at their depths.
    Haystack(Vec<Needle>),
    /// A numbered list: each common word `COMMON_REPEATS` times, each uncommon word three.
    CommonWords {
        common: Vec<String>,
        uncommon: Vec<String>,
    },
    /// Coded words with Zipf frequencies (exponent 2) over a vocabulary.
    FrequentWords { vocabulary_seed: u64 },
}

/// Everything about a sample but the amount of filler.
#[derive(Clone, Debug)]
struct Spec {
    task: Task,
    depth: Option<f64>,
    seed: u64,
    instruction: String,
    question: String,
    answer_prefix: String,
    answers: Vec<String>,
    body: Body,
}

/// Times each common word appears in the common-words list.
const COMMON_REPEATS: usize = 10;
/// Common words asked for.
const COMMON_WORDS: usize = 10;
/// Needles of the multi-key, multi-value and multi-query tasks.
const MULTI_NEEDLES: usize = 4;
/// Assignments after the first in variable tracking.
const VARIABLE_HOPS: usize = 4;
/// The smallest coded text of frequent-words extraction (its top three are then distinct).
const MIN_CODED_WORDS: usize = 64;

/// `count` distinct `adjective-noun` keys.
fn keys(rng: &mut StdRng, count: usize) -> Vec<String> {
    let mut keys: Vec<String> = Vec::with_capacity(count);
    while keys.len() < count {
        let key = format!(
            "{}-{}",
            ADJECTIVES[rng.gen_range(0..ADJECTIVES.len())],
            NOUNS[rng.gen_range(0..NOUNS.len())]
        );
        if !keys.contains(&key) {
            keys.push(key);
        }
    }
    keys
}

/// `count` distinct 7-digit numbers.
fn numbers(rng: &mut StdRng, count: usize) -> Vec<String> {
    let mut values: Vec<String> = Vec::with_capacity(count);
    while values.len() < count {
        let value = rng.gen_range(1_000_000u32..10_000_000).to_string();
        if !values.contains(&value) {
            values.push(value);
        }
    }
    values
}

/// A UUID-like key: 8-4-4-4-12 lowercase hex digits.
fn uuid(rng: &mut StdRng) -> String {
    let mut hex = |n: usize| -> String {
        (0..n)
            .map(|_| char::from_digit(rng.gen_range(0..16), 16).unwrap_or('0'))
            .collect()
    };
    format!("{}-{}-{}-{}-{}", hex(8), hex(4), hex(4), hex(4), hex(12))
}

/// A needle sentence.
fn needle_text(kind: &str, key: &str, value: &str) -> String {
    format!("One of the special magic {kind} for {key} is: {value}.")
}

/// The needle tasks' instruction.
fn needle_instruction(kind: &str) -> String {
    format!(
        "Some special magic {kind} are hidden within the following text. Make sure to memorize \
         it. I will quiz you about the {kind} afterwards."
    )
}

/// Names keys as `a, b, c, and d`.
fn key_list(keys: &[String]) -> String {
    match keys {
        [] => String::new(),
        [one] => one.clone(),
        [init @ .., last] => format!("{}, and {last}", init.join(", ")),
    }
}

impl Spec {
    fn new(task: Task, depth: f64, seed: u64) -> Spec {
        // The content depends on the task and the seed; the depth only places it.
        let mut rng =
            StdRng::seed_from_u64(seed ^ (task as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15));
        let depth = task.uses_depth().then_some(depth);
        let needle_depth = depth.unwrap_or(0.5);
        let spread = |rng: &mut StdRng| rng.gen_range(0.0..1.0);
        let single = |kind: &str, singular: &str, key: &str, value: String| {
            (
                needle_instruction(kind),
                format!(
                    "What is the special magic {singular} for {key} mentioned in the provided \
                     text?"
                ),
                format!("The special magic {singular} for {key} mentioned in the provided text is"),
                vec![value],
            )
        };
        let (instruction, question, answer_prefix, answers, body) =
            match task {
                Task::NiahNumber | Task::NiahWord | Task::NiahUuid | Task::MultiKey => {
                    let count = if task == Task::MultiKey {
                        MULTI_NEEDLES
                    } else {
                        1
                    };
                    let keys = keys(&mut rng, count);
                    let (kind, singular, values) = match task {
                        Task::NiahWord => {
                            let word = loop {
                                let word = NOUNS[rng.gen_range(0..NOUNS.len())];
                                if !keys[0].ends_with(word) {
                                    break word;
                                }
                            };
                            ("words", "word", vec![word.to_owned()])
                        }
                        Task::NiahUuid => ("uuids", "uuid", vec![uuid(&mut rng)]),
                        _ => ("numbers", "number", numbers(&mut rng, count)),
                    };
                    let mut needles = vec![Needle {
                        text: needle_text(kind, &keys[0], &values[0]),
                        depth: needle_depth,
                        real: true,
                    }];
                    for (key, value) in keys.iter().zip(&values).skip(1) {
                        needles.push(Needle {
                            text: needle_text(kind, key, value),
                            depth: spread(&mut rng),
                            real: false,
                        });
                    }
                    let (i, q, p, a) = single(kind, singular, &keys[0], values[0].clone());
                    (i, q, p, a, Body::Haystack(needles))
                }
                Task::MultiValue | Task::MultiQuery => {
                    let key_count = if task == Task::MultiQuery {
                        MULTI_NEEDLES
                    } else {
                        1
                    };
                    let keys = keys(&mut rng, key_count);
                    let values = numbers(&mut rng, MULTI_NEEDLES);
                    let needles: Vec<Needle> = values
                        .iter()
                        .enumerate()
                        .map(|(i, value)| Needle {
                            text: needle_text("numbers", &keys[i % key_count], value),
                            depth: if i == 0 {
                                needle_depth
                            } else {
                                spread(&mut rng)
                            },
                            real: true,
                        })
                        .collect();
                    let asked = key_list(&keys);
                    (
                        needle_instruction("numbers"),
                        format!(
                            "What are all the special magic numbers for {asked} mentioned in the \
                         provided text?"
                        ),
                        format!(
                            "The special magic numbers for {asked} mentioned in the provided text \
                         are"
                        ),
                        values,
                        Body::Haystack(needles),
                    )
                }
                Task::VariableTracking => {
                    let names: Vec<String> = {
                        let mut names: Vec<String> = Vec::new();
                        while names.len() <= VARIABLE_HOPS {
                            let name: String =
                                (0..5).map(|_| rng.gen_range(b'A'..=b'Z') as char).collect();
                            if !names.contains(&name) {
                                names.push(name);
                            }
                        }
                        names
                    };
                    let value = rng.gen_range(10_000u32..100_000).to_string();
                    let needles = names
                        .iter()
                        .enumerate()
                        .map(|(i, name)| Needle {
                            text: if i == 0 {
                                format!("VAR {name} = {value}.")
                            } else {
                                format!("VAR {name} = VAR {}.", names[i - 1])
                            },
                            depth: (i as f64 + 0.5) / names.len() as f64,
                            real: true,
                        })
                        .collect();
                    (
                        "Memorize and track the chain(s) of variable assignment hidden in the \
                     following text."
                            .to_owned(),
                        format!(
                            "Question: Find all variables that are assigned the value {value} in \
                         the text above."
                        ),
                        format!(
                            "Answer: According to the chain(s) of variable assignment in the text \
                         above, {} variables are assigned the value {value}, they are:",
                            names.len()
                        ),
                        names,
                        Body::Haystack(needles),
                    )
                }
                Task::CommonWords => {
                    let mut all: Vec<String> = ADJECTIVES
                        .iter()
                        .flat_map(|a| NOUNS.iter().map(move |n| format!("{a}-{n}")))
                        .collect();
                    all.shuffle(&mut rng);
                    let uncommon = all.split_off(COMMON_WORDS);
                    (
                    "Below is a numbered list of words. In these words, some appear more often \
                     than others. Memorize the ones that appear most often."
                        .to_owned(),
                    format!(
                        "Question: What are the {COMMON_WORDS} most common words in the above \
                         list?"
                    ),
                    format!(
                        "Answer: The top {COMMON_WORDS} words that appear most often in the list \
                         are:"
                    ),
                    all.clone(),
                    Body::CommonWords { common: all, uncommon },
                )
                }
                Task::FrequentWords => {
                    let vocabulary_seed = rng.gen();
                    let top = coded_vocabulary(vocabulary_seed, 3);
                    (
                    "Read the following coded text and track the frequency of each coded word. \
                     Find the three most frequently appeared coded words."
                        .to_owned(),
                    "Question: Do not provide any explanation. Please ignore the dots '....'. \
                     What are the three most frequently appeared words in the above coded text?"
                        .to_owned(),
                    "Answer: According to the coded text above, the three most frequently \
                     appeared words are:"
                        .to_owned(),
                    top,
                    Body::FrequentWords { vocabulary_seed },
                )
                }
            };
        Spec {
            task,
            depth,
            seed,
            instruction,
            question,
            answer_prefix,
            answers,
            body,
        }
    }

    /// The fewest filler units the body takes.
    fn min_units(&self) -> usize {
        match self.body {
            Body::Haystack(_) => 1,
            Body::CommonWords { .. } => 1,
            Body::FrequentWords { .. } => MIN_CODED_WORDS,
        }
    }

    /// The most filler units the body has material for.
    fn max_units(&self) -> usize {
        match &self.body {
            Body::CommonWords { uncommon, .. } => uncommon.len(),
            _ => usize::MAX / 2,
        }
    }

    /// The sample with `units` filler units.
    fn sample(&self, units: usize, target_tokens: usize) -> Sample {
        let (context, needle_offsets) = match &self.body {
            Body::Haystack(needles) => haystack(needles, units),
            Body::CommonWords { common, uncommon } => (
                common_words(common, &uncommon[..units], self.seed),
                Vec::new(),
            ),
            Body::FrequentWords { vocabulary_seed } => {
                (coded_text(*vocabulary_seed, units, self.seed), Vec::new())
            }
        };
        Sample {
            task: self.task,
            target_tokens,
            depth: self.depth,
            seed: self.seed,
            instruction: self.instruction.clone(),
            context,
            question: self.question.clone(),
            answer_prefix: self.answer_prefix.clone(),
            answers: self.answers.clone(),
            needle_offsets,
            filler_units: units,
        }
    }
}

/// `sentences` noise sentences with the needles inserted before sentence
/// `round(depth * sentences)`; the byte offsets of the real ones, in the needles' order.
fn haystack(needles: &[Needle], sentences: usize) -> (String, Vec<usize>) {
    let noise: Vec<&str> = NOISE.split_inclusive(". ").map(str::trim).collect();
    let mut order: Vec<(usize, usize)> = needles
        .iter()
        .enumerate()
        .map(|(i, n)| {
            (
                ((n.depth.clamp(0.0, 1.0)) * sentences as f64).round() as usize,
                i,
            )
        })
        .collect();
    order.sort_unstable();
    let mut text = String::new();
    let mut offsets = vec![None; needles.len()];
    let mut next = order.iter().peekable();
    for s in 0..=sentences {
        while let Some(&&(at, i)) = next.peek() {
            if at > s {
                break;
            }
            if !text.is_empty() {
                text.push(' ');
            }
            offsets[i] = Some(text.len());
            text.push_str(&needles[i].text);
            next.next();
        }
        if s < sentences {
            if !text.is_empty() {
                text.push(' ');
            }
            text.push_str(noise[s % noise.len()]);
        }
    }
    let real = needles
        .iter()
        .zip(offsets)
        .filter_map(|(needle, offset)| offset.filter(|_| needle.real))
        .collect();
    (text, real)
}

/// The numbered list: each common word `COMMON_REPEATS` times, each uncommon one three times,
/// shuffled by `seed` and the list's length.
fn common_words(common: &[String], uncommon: &[String], seed: u64) -> String {
    let mut words: Vec<&str> = Vec::new();
    for word in common {
        words.extend(std::iter::repeat_n(word.as_str(), COMMON_REPEATS));
    }
    for word in uncommon {
        words.extend(std::iter::repeat_n(word.as_str(), 3));
    }
    let order_seed = seed.wrapping_add(words.len() as u64);
    words.shuffle(&mut StdRng::seed_from_u64(order_seed));
    words
        .iter()
        .enumerate()
        .map(|(i, w)| format!("{}. {w}", i + 1))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The first `count` coded words (five lowercase letters, distinct) of `seed`'s vocabulary:
/// a longer vocabulary starts with a shorter one.
fn coded_vocabulary(seed: u64, count: usize) -> Vec<String> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut words: Vec<String> = Vec::with_capacity(count);
    while words.len() < count {
        let word: String = (0..5).map(|_| rng.gen_range(b'a'..=b'z') as char).collect();
        if !words.contains(&word) {
            words.push(word);
        }
    }
    words
}

/// About `total` coded words with Zipf frequencies (exponent 2: rank `i` appears
/// `floor(total / (i+1)^2 / H)` times), shuffled, in lines of 16 separated by `....`.
fn coded_text(vocabulary_seed: u64, total: usize, seed: u64) -> String {
    let size = (total / 8).max(16);
    let harmonic: f64 = (1..=size).map(|i| 1.0 / (i * i) as f64).sum();
    let vocabulary = coded_vocabulary(vocabulary_seed, size);
    let mut words: Vec<&str> = Vec::with_capacity(total);
    for (i, word) in vocabulary.iter().enumerate() {
        let count = (total as f64 / ((i + 1) * (i + 1)) as f64 / harmonic).floor() as usize;
        words.extend(std::iter::repeat_n(word.as_str(), count.max(1)));
    }
    words.shuffle(&mut StdRng::seed_from_u64(seed.wrapping_add(total as u64)));
    words
        .chunks(16)
        .map(|line| line.join(" "))
        .collect::<Vec<_>>()
        .join(" .... ")
}

/// Generates `task`'s prompt for `target_tokens` tokens with its (first) needle at `depth`
/// (0 to 1; ignored by depth-less tasks) from `seed`. `measure` counts a sample's tokens as
/// the model will see it (chat template and all); the prompt gets the most filler that keeps
/// it within `target_tokens`.
pub fn generate(
    task: Task,
    target_tokens: usize,
    depth: f64,
    seed: u64,
    measure: &mut dyn FnMut(&Sample) -> Result<usize, EvalError>,
) -> Result<Sample, EvalError> {
    if !(0.0..=1.0).contains(&depth) {
        return Err(EvalError::BadDepth(depth * 100.0));
    }
    let spec = Spec::new(task, depth, seed);
    let (min, max) = (spec.min_units(), spec.max_units());
    let base = measure(&spec.sample(min, target_tokens))?;
    if base > target_tokens {
        return Err(EvalError::ContextTooShort {
            task: task.name(),
            needed: base,
            length: target_tokens,
        });
    }
    // Bracket the answer: `low` fits, `high` does not; interpolate between them.
    let (mut low, mut low_tokens) = (min, base);
    let probe = (min + 64).min(max);
    let probe_tokens = measure(&spec.sample(probe, target_tokens))?;
    let mut per_unit =
        (probe_tokens.saturating_sub(base) as f64 / (probe - min).max(1) as f64).max(0.05);
    let mut high = max + 1;
    if probe_tokens <= target_tokens {
        (low, low_tokens) = (probe, probe_tokens);
    } else {
        high = probe;
    }
    for round in 0..48 {
        if high - low <= 1 {
            break;
        }
        // Mostly the secant's guess; every fourth round the midpoint, so it always closes in.
        let guess = if round % 4 == 3 && high <= max {
            low + (high - low) / 2
        } else {
            low + ((target_tokens - low_tokens) as f64 / per_unit).round() as usize
        };
        let guess = guess.clamp(low + 1, high - 1);
        let tokens = measure(&spec.sample(guess, target_tokens))?;
        if tokens > low_tokens {
            per_unit = (tokens - low_tokens) as f64 / (guess - low) as f64;
        }
        if tokens <= target_tokens {
            (low, low_tokens) = (guess, tokens);
            // Close enough: less than a unit's tokens left.
            if ((target_tokens - tokens) as f64) < per_unit {
                break;
            }
        } else {
            high = guess;
        }
    }
    Ok(spec.sample(low, target_tokens))
}
