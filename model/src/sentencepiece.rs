//! SentencePiece tokenization as llama.cpp does it for GGUF vocabularies of
//! `tokenizer.ggml.model = llama` (Llama 2, Phi-3, Gemma): control and user-defined tokens
//! are matched literally first; the rest of the text has its spaces written as `▁` (with one
//! put in front when `add_space_prefix` is set), is split into characters, and adjacent
//! pieces are merged while their concatenation is a vocabulary entry, highest score first
//! (the leftmost pair on ties). A character outside the vocabulary falls back to its UTF-8
//! bytes as `<0xXX>` tokens.
use std::cmp::Ordering;
use std::collections::{BinaryHeap, HashMap};

/// GGUF `tokenizer.ggml.token_type` values.
const TYPE_UNKNOWN: i64 = 2;
const TYPE_CONTROL: i64 = 3;
const TYPE_USER_DEFINED: i64 = 4;
const TYPE_BYTE: i64 = 6;

/// SentencePiece's visible space.
const SPACE: char = '\u{2581}';

/// A SentencePiece vocabulary: token texts, scores and types.
#[derive(Clone, Debug)]
pub struct SentencePiece {
    tokens: Vec<String>,
    scores: Vec<f32>,
    types: Vec<i64>,
    ids: HashMap<String, u32>,
    /// The `<0xXX>` token of each byte, where the vocabulary has it.
    byte_tokens: [Option<u32>; 256],
    /// Control and user-defined tokens, longest first: matched literally in the text.
    specials: Vec<(String, u32)>,
    add_space_prefix: bool,
    unknown: Option<u32>,
}

/// A candidate merge of two adjacent pieces.
#[derive(Debug, PartialEq)]
struct Bigram {
    left: usize,
    right: usize,
    score: f32,
    /// Bytes of the merged text (to skip a stale candidate whose pieces have changed).
    size: usize,
}

impl Eq for Bigram {}

impl Ord for Bigram {
    /// The heap pops the highest score, and of equal scores the leftmost pair.
    fn cmp(&self, other: &Self) -> Ordering {
        self.score
            .total_cmp(&other.score)
            .then(other.left.cmp(&self.left))
    }
}

impl PartialOrd for Bigram {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

/// One piece of the text being merged: a byte range, linked to its neighbours.
#[derive(Clone, Copy, Debug)]
struct Piece {
    start: usize,
    len: usize,
    prev: Option<usize>,
    next: Option<usize>,
}

impl SentencePiece {
    /// The vocabulary of `tokens` with their `scores` and `types` (GGUF token types; missing
    /// entries count as normal). `unknown` is the id used for a byte without a byte token.
    pub fn new(
        tokens: Vec<String>,
        scores: Vec<f32>,
        types: Vec<i64>,
        add_space_prefix: bool,
        unknown: Option<u32>,
    ) -> SentencePiece {
        let ids: HashMap<String, u32> = tokens
            .iter()
            .enumerate()
            .map(|(id, token)| (token.clone(), id as u32))
            .collect();
        let mut byte_tokens = [None; 256];
        for (byte, slot) in byte_tokens.iter_mut().enumerate() {
            *slot = ids.get(&format!("<0x{byte:02X}>")).copied();
        }
        let mut specials: Vec<(String, u32)> = tokens
            .iter()
            .zip(&types)
            .enumerate()
            .filter(|(_, (token, &kind))| {
                !token.is_empty() && (kind == TYPE_CONTROL || kind == TYPE_USER_DEFINED)
            })
            .map(|(id, (token, _))| (token.clone(), id as u32))
            .collect();
        specials.sort_by(|a, b| b.0.len().cmp(&a.0.len()).then(a.1.cmp(&b.1)));
        SentencePiece {
            tokens,
            scores,
            types,
            ids,
            byte_tokens,
            specials,
            add_space_prefix,
            unknown,
        }
    }

    pub fn vocab_size(&self) -> usize {
        self.tokens.len()
    }

    /// The id of vocabulary entry `token`.
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.ids.get(token).copied()
    }

    /// The vocabulary entry of `id` as stored (a space is `▁`).
    pub fn token_text(&self, id: u32) -> Option<String> {
        self.tokens.get(id as usize).cloned()
    }

    /// The ids of `text`: special tokens written in it as their single ids, the text between
    /// them merged by score. A space prefix goes before each run of text that starts the text
    /// or follows a special token, when the vocabulary asks for it.
    pub fn encode(&self, text: &str) -> Vec<u32> {
        let mut ids = Vec::new();
        let mut rest = text;
        let mut after_special = true;
        while !rest.is_empty() {
            let (plain_len, special) = self.next_special(rest);
            if plain_len > 0 {
                let mut plain = String::new();
                if self.add_space_prefix && after_special {
                    plain.push(' ');
                }
                plain.push_str(&rest[..plain_len]);
                self.encode_plain(&plain.replace(' ', &SPACE.to_string()), &mut ids);
                after_special = false;
            }
            rest = &rest[plain_len..];
            if let Some((token, id)) = special {
                ids.push(id);
                rest = &rest[token.len()..];
                after_special = true;
            }
        }
        ids
    }

    /// The length of `text`'s plain part before its first special token, and that token
    /// (the longest one starting there).
    fn next_special<'s>(&'s self, text: &str) -> (usize, Option<(&'s str, u32)>) {
        for (at, _) in text.char_indices() {
            if let Some((token, id)) = self
                .specials
                .iter()
                .find(|(token, _)| text[at..].starts_with(token.as_str()))
            {
                return (at, Some((token, *id)));
            }
        }
        (text.len(), None)
    }

    /// Merges `text` (spaces already `▁`) and appends its ids.
    fn encode_plain(&self, text: &str, ids: &mut Vec<u32>) {
        let mut pieces: Vec<Piece> = text
            .char_indices()
            .map(|(start, c)| Piece {
                start,
                len: c.len_utf8(),
                prev: None,
                next: None,
            })
            .collect();
        let count = pieces.len();
        for (i, piece) in pieces.iter_mut().enumerate() {
            piece.prev = i.checked_sub(1);
            piece.next = (i + 1 < count).then_some(i + 1);
        }
        let mut queue = BinaryHeap::new();
        let candidate = |pieces: &[Piece], left: Option<usize>, right: Option<usize>| {
            let (left, right) = (left?, right?);
            let (start, end) = (pieces[left].start, pieces[right].start + pieces[right].len);
            let id = *self.ids.get(&text[start..end])?;
            Some(Bigram {
                left,
                right,
                score: self.scores.get(id as usize).copied().unwrap_or(0.0),
                size: end - start,
            })
        };
        for i in 1..count {
            queue.extend(candidate(&pieces, Some(i - 1), Some(i)));
        }
        while let Some(bigram) = queue.pop() {
            let (left, right) = (pieces[bigram.left], pieces[bigram.right]);
            if left.len == 0 || right.len == 0 || left.len + right.len != bigram.size {
                continue;
            }
            pieces[bigram.left].len += right.len;
            pieces[bigram.right].len = 0;
            pieces[bigram.left].next = right.next;
            if let Some(next) = right.next {
                pieces[next].prev = Some(bigram.left);
            }
            queue.extend(candidate(&pieces, left.prev, Some(bigram.left)));
            queue.extend(candidate(&pieces, Some(bigram.left), right.next));
        }
        let mut at = (count > 0).then_some(0);
        while let Some(i) = at {
            let piece = pieces[i];
            let piece_text = &text[piece.start..piece.start + piece.len];
            match self.ids.get(piece_text) {
                Some(&id) => ids.push(id),
                None => ids.extend(
                    piece_text
                        .bytes()
                        .filter_map(|b| self.byte_tokens[b as usize].or(self.unknown)),
                ),
            }
            at = piece.next;
        }
    }

    /// The bytes of `ids`: `▁` as a space, byte tokens as their byte, special tokens as their
    /// text. `None` if an id is outside the vocabulary.
    pub fn decode(&self, ids: &[u32]) -> Option<Vec<u8>> {
        let mut bytes = Vec::new();
        for &id in ids {
            let token = self.tokens.get(id as usize)?;
            let kind = self.types.get(id as usize).copied().unwrap_or(1);
            match kind {
                TYPE_BYTE => match byte_of(token) {
                    Some(byte) => bytes.push(byte),
                    None => bytes.extend(token.as_bytes()),
                },
                TYPE_CONTROL | TYPE_USER_DEFINED | TYPE_UNKNOWN => bytes.extend(token.as_bytes()),
                _ => bytes.extend(token.replace(SPACE, " ").as_bytes()),
            }
        }
        Some(bytes)
    }
}

/// The byte of a `<0xXX>` token.
fn byte_of(token: &str) -> Option<u8> {
    let hex = token.strip_prefix("<0x")?.strip_suffix('>')?;
    u8::from_str_radix(hex, 16).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tiny vocabulary: specials, bytes for `é`'s UTF-8, pieces with scores.
    fn vocab(add_space_prefix: bool) -> SentencePiece {
        let entries: [(&str, f32, i64); 14] = [
            ("<unk>", 0.0, TYPE_UNKNOWN),
            ("<s>", 0.0, TYPE_CONTROL),
            ("<turn>", 0.0, TYPE_USER_DEFINED),
            ("<0xC3>", 0.0, TYPE_BYTE),
            ("<0xA9>", 0.0, TYPE_BYTE),
            ("▁", -5.0, 1),
            ("a", -1.0, 1),
            ("b", -1.0, 1),
            ("c", -1.0, 1),
            ("ab", -2.0, 1),
            ("bc", -1.5, 1),
            ("▁a", -3.0, 1),
            ("▁abc", -0.5, 1),
            ("abc", -4.0, 1),
        ];
        SentencePiece::new(
            entries.iter().map(|e| e.0.to_owned()).collect(),
            entries.iter().map(|e| e.1).collect(),
            entries.iter().map(|e| e.2).collect(),
            add_space_prefix,
            Some(0),
        )
    }

    #[test]
    fn merges_by_score_then_leftmost() {
        let v = vocab(false);
        // "bc" (-1.5) beats "ab" (-2.0): a + bc, and "abc" is not reached from a + bc.
        assert_eq!(v.encode("abc"), [13]);
        // b c -> bc first; then a+bc = abc (-4) is the only pair left.
        assert_eq!(v.encode("abcab"), [13, 9]);
        // Ties go left: "abab" -> ab ab.
        assert_eq!(v.encode("abab"), [9, 9]);
    }

    #[test]
    fn spaces_prefix_specials_and_byte_fallback() {
        let v = vocab(false);
        // A space becomes ▁ and merges: ▁ a -> ▁a (-3), then b c -> bc, ▁a+bc = ▁abc.
        assert_eq!(v.encode(" abc"), [12]);
        // `é` is not in the vocabulary: its two UTF-8 bytes.
        assert_eq!(v.encode("é"), [3, 4]);
        assert_eq!(v.encode("a<turn>b<s>"), [6, 2, 7, 1]);
        let prefixed = vocab(true);
        assert_eq!(prefixed.encode("abc"), [12]);
        // The prefix also goes after a special token.
        assert_eq!(prefixed.encode("<s>abc"), [1, 12]);
    }

    #[test]
    fn decode_restores_the_text() {
        let v = vocab(false);
        for text in [" abc é", "a<turn>b", "abcab ba"] {
            let ids = v.encode(text);
            assert_eq!(String::from_utf8(v.decode(&ids).unwrap()).unwrap(), text);
        }
        assert_eq!(v.decode(&[99]), None);
    }
}
