//! Exact-match scoring (RULER's `string_match_all`, with word boundaries): the share of the
//! expected answers the model's answer names, each matched whole and case-insensitively.
//! Single-answer tasks score 0 or 1; multi-value, multi-query, variable tracking and the word
//! tasks give partial credit.

/// Whether `answer` occurs in `text` as a whole token: not preceded or followed by a letter
/// or digit (so `1234567` is not found in `12345678`, nor `goat` in `goats`). Both lowercased.
fn contains_whole(text: &str, answer: &str) -> bool {
    if answer.is_empty() {
        return false;
    }
    let is_word = |c: Option<char>| c.is_some_and(char::is_alphanumeric);
    text.match_indices(answer).any(|(at, _)| {
        let before = text[..at].chars().next_back();
        let after = text[at + answer.len()..].chars().next();
        !is_word(before) && !is_word(after)
    })
}

/// The share (0 to 1) of `answers` that `prediction` names.
pub fn score(answers: &[String], prediction: &str) -> f64 {
    if answers.is_empty() {
        return 0.0;
    }
    let prediction = prediction.to_lowercase();
    let found = answers
        .iter()
        .filter(|a| contains_whole(&prediction, &a.trim().to_lowercase()))
        .count();
    found as f64 / answers.len() as f64
}
