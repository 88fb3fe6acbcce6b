//! A RULER-style accuracy evaluation: deterministic task generators ([`tasks`]), exact-match
//! scorers ([`score`]), ShadowKV's per-layer hit rates and attention recall
//! ([`diagnostics`]) and the reports people and machines read ([`report`]). The `shadowkv
//! eval` command runs the prompts through full attention and each ShadowKV setting.
pub mod diagnostics;
pub mod report;
pub mod score;
pub mod tasks;
mod words;

pub use diagnostics::{step_hit_rates, step_recalls, Summary};
pub use report::{Mode, Outcome, Report};
pub use score::score;
pub use tasks::{generate, Sample, Task};

use crate::error::ModelFileError;
use crate::source::ModelSource;
use crate::tokenizer::{ChatMessage, ChatTemplate};

/// What an evaluation cannot run with.
#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    #[error("unknown task {name:?}: expected one of {valid}")]
    UnknownTask { name: String, valid: String },
    #[error(
        "context length {length} tokens is longer than the model supports ({limit} tokens): \
         expected lengths up to {limit}"
    )]
    ContextTooLong { length: usize, limit: usize },
    #[error(
        "task {task} needs at least {needed} tokens of context with this model, but the \
         context length is {length}: expected a longer length"
    )]
    ContextTooShort {
        task: &'static str,
        needed: usize,
        length: usize,
    },
    #[error(
        "sparse budget {budget} tokens is not smaller than the context ({length} tokens, the \
         longest asked for): expected budgets below the context length"
    )]
    BudgetTooLarge { budget: usize, length: usize },
    #[error("needle depth {0}% is outside 0 to 100%")]
    BadDepth(f64),
    #[error(transparent)]
    Model(#[from] crate::Error),
    #[error(transparent)]
    File(#[from] ModelFileError),
}

/// Rejects context lengths past the model's (`limit`, 0 for unknown) and budgets that no
/// context length exceeds. (A budget that only some lengths exceed runs at those lengths; the
/// shorter prompts skip it.)
pub fn check_grid(lengths: &[usize], limit: usize, budgets: &[usize]) -> Result<(), EvalError> {
    for &length in lengths {
        if limit > 0 && length > limit {
            return Err(EvalError::ContextTooLong { length, limit });
        }
    }
    let longest = lengths.iter().copied().max().unwrap_or(0);
    if let Some(&budget) = budgets.iter().find(|&&b| b >= longest) {
        return Err(EvalError::BudgetTooLarge {
            budget,
            length: longest,
        });
    }
    Ok(())
}

/// The prompt's text: the user message through the chat template with the assistant's turn
/// opened, when there is a template, else the plain message; then the answer's first words,
/// which the model continues.
pub fn prompt_text(sample: &Sample, template: Option<&ChatTemplate>) -> Result<String, EvalError> {
    let user = sample.user_message();
    Ok(match template {
        Some(template) => format!(
            "{}{}",
            template.render(&[ChatMessage::new("user", user)], true)?,
            sample.answer_prefix
        ),
        None => format!("{user}\n\n{}", sample.answer_prefix),
    })
}

/// The prompt's token ids for `source`'s model (BOS first when its tokenizer asks), through
/// its chat template when `chat` is set.
pub fn prompt_tokens(
    source: &ModelSource,
    sample: &Sample,
    chat: bool,
) -> Result<Vec<u32>, EvalError> {
    let template = source.chat_template.as_ref().filter(|_| chat);
    Ok(source.prompt_tokens(&prompt_text(sample, template)?, false)?)
}
