//! Text to token ids and back, and chat prompts: byte-level BPE built from a GGUF file's own
//! vocabulary and merges (or loaded from a Hugging Face `tokenizer.json`) with the `tokenizers`
//! crate, SentencePiece vocabularies (`tokenizer.ggml.model = llama`: Gemma, Phi-3, Llama 2)
//! with [`crate::sentencepiece`], and the file's jinja chat template rendered with `minijinja`.
use std::path::Path;

use minijinja::syntax::SyntaxConfig;
use minijinja::{context, Environment, ErrorKind, Value};
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::normalizers::unicode::NFC;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::{AddedToken, SplitDelimiterBehavior};

use crate::error::ModelFileError;
use crate::gguf::{GgufFile, MetadataValue};
use crate::sentencepiece::SentencePiece;

/// Reading a model file fails only with a problem of the file.
type Result<T, E = ModelFileError> = std::result::Result<T, E>;

/// `tokenizer.ggml.model` values this module builds.
const SUPPORTED_MODELS: &str = "gpt2 (byte-level BPE) and llama (SentencePiece)";
/// `tokenizer.ggml.pre` values this module builds.
const SUPPORTED_PRE: &str = "smollm, gpt2, default, llama-bpe, llama3, qwen2, chatglm-bpe";

/// Llama 3's split pattern (llama.cpp `LLAMA_VOCAB_PRE_TYPE_LLAMA3`, HF tokenizer.json).
const LLAMA3_PATTERN: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Qwen2's split pattern: Llama 3's with single digits.
const QWEN2_PATTERN: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// GGUF `tokenizer.ggml.token_type` values that mark special (added) tokens.
const TOKEN_TYPE_CONTROL: i64 = 3;
const TOKEN_TYPE_USER_DEFINED: i64 = 4;

/// Token texts that end a chat turn or a document in the common model families.
const END_OF_GENERATION_TOKENS: [&str; 6] = [
    "<|im_end|>",
    "<|eot_id|>",
    "<|end_of_text|>",
    "<|endoftext|>",
    "<end_of_turn>",
    "<|end|>",
];

fn file_error(file: &str, reason: String) -> ModelFileError {
    ModelFileError {
        file: file.to_owned(),
        tensor: None,
        reason,
    }
}

/// How a tokenizer splits text.
enum Model {
    /// Byte-level BPE (the `tokenizers` crate), or any Hugging Face `tokenizer.json`.
    Hf(Box<tokenizers::Tokenizer>),
    SentencePiece(Box<SentencePiece>),
}

/// A tokenizer: encodes text (special tokens written in it included) to ids and back.
pub struct Tokenizer {
    inner: Model,
    /// The model or tokenizer.json file, named in errors.
    source: String,
    vocab_size: usize,
    bos_id: Option<u32>,
    add_bos: bool,
    /// Ids after which generation stops, sorted.
    end_ids: Vec<u32>,
}

impl Tokenizer {
    /// Builds the tokenizer described by a GGUF file's `tokenizer.ggml.*` metadata.
    pub fn from_gguf(file: &GgufFile) -> Result<Tokenizer> {
        let fail = |reason: String| file_error(&file.name, reason);
        let model = metadata_str(file, "tokenizer.ggml.model")?;
        if model == "llama" {
            return Tokenizer::sentencepiece_from_gguf(file);
        }
        if model != "gpt2" {
            return Err(fail(format!(
                "tokenizer.ggml.model is `{model}`, which this tokenizer does not build; supported: {SUPPORTED_MODELS}"
            )));
        }
        // Absent in old conversions, which llama.cpp then treats as `default`.
        let pre = match file.metadata("tokenizer.ggml.pre") {
            None => "default",
            Some(_) => metadata_str(file, "tokenizer.ggml.pre")?,
        };
        let pre_tokenizer = pre_tokenizer_for(pre).map_err(&fail)?;

        let tokens = string_array(file, "tokenizer.ggml.tokens")?;
        let merges = string_array(file, "tokenizer.ggml.merges")?;
        let token_types = match file.metadata("tokenizer.ggml.token_type") {
            None => Vec::new(),
            Some(value) => integer_array(file, "tokenizer.ggml.token_type", value)?,
        };

        let vocab: Vocab = tokens
            .iter()
            .enumerate()
            .map(|(id, token)| (token.to_string(), id as u32))
            .collect();
        let merges = merges
            .iter()
            .map(|merge| {
                split_merge(merge).ok_or_else(|| {
                    fail(format!(
                        "tokenizer.ggml.merges has `{merge}`, not two tokens separated by a space"
                    ))
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            // Llama 3 takes a pre-token that is a whole vocabulary entry as is (llama.cpp too).
            .ignore_merges(matches!(pre, "llama-bpe" | "llama3"))
            .build()
            .map_err(|e| fail(format!("its BPE vocabulary and merges do not build: {e}")))?;

        let mut inner = tokenizers::Tokenizer::new(bpe);
        // Qwen2's own tokenizer normalises to NFC before splitting.
        if pre == "qwen2" {
            inner.with_normalizer(Some(NFC));
        }
        inner.with_pre_tokenizer(Some(pre_tokenizer));
        inner.with_decoder(Some(ByteLevel::default()));
        // Control and user-defined tokens are matched literally in the text, before splitting.
        let specials: Vec<AddedToken> = tokens
            .iter()
            .zip(&token_types)
            .filter(|(_, &kind)| kind == TOKEN_TYPE_CONTROL || kind == TOKEN_TYPE_USER_DEFINED)
            .map(|(token, _)| AddedToken::from(token.to_string(), true))
            .collect();
        inner.add_special_tokens(&specials);

        let bos_id = token_id(file, "tokenizer.ggml.bos_token_id", tokens.len())?;
        let add_bos = match file.metadata("tokenizer.ggml.add_bos_token") {
            Some(MetadataValue::Bool(add)) => *add,
            Some(other) => {
                return Err(fail(format!(
                    "tokenizer.ggml.add_bos_token is {other:?}, not a bool"
                )))
            }
            // llama.cpp's default for Llama 3 vocabularies, which need `<|begin_of_text|>`.
            None => matches!(pre, "llama-bpe" | "llama3"),
        };
        let end_ids = end_ids_of(file, tokens.len(), |name| inner.token_to_id(name))?;
        Ok(Tokenizer {
            inner: Model::Hf(Box::new(inner)),
            source: file.name.clone(),
            vocab_size: tokens.len(),
            bos_id,
            add_bos,
            end_ids,
        })
    }

    /// A SentencePiece vocabulary (`tokenizer.ggml.model = llama`): tokens, scores, token
    /// types, `tokenizer.ggml.add_space_prefix` (llama.cpp's default: on) and the BOS and
    /// unknown ids.
    fn sentencepiece_from_gguf(file: &GgufFile) -> Result<Tokenizer> {
        let fail = |reason: String| file_error(&file.name, reason);
        let tokens: Vec<String> = string_array(file, "tokenizer.ggml.tokens")?
            .into_iter()
            .map(str::to_owned)
            .collect();
        let scores = match file.metadata("tokenizer.ggml.scores") {
            Some(MetadataValue::Array(items)) => items
                .iter()
                .map(|item| item.as_f64().map(|v| v as f32))
                .collect::<Option<Vec<f32>>>()
                .ok_or_else(|| fail("tokenizer.ggml.scores is not an array of numbers".into()))?,
            Some(_) => return Err(fail("tokenizer.ggml.scores is not an array".into())),
            None => {
                return Err(fail(
                    "has no tokenizer.ggml.scores (SentencePiece needs them)".into(),
                ))
            }
        };
        let token_types = match file.metadata("tokenizer.ggml.token_type") {
            None => Vec::new(),
            Some(value) => integer_array(file, "tokenizer.ggml.token_type", value)?,
        };
        if scores.len() != tokens.len()
            || !(token_types.is_empty() || token_types.len() == tokens.len())
        {
            return Err(fail(format!(
                "has {} tokens, {} scores and {} token types; expected one of each per token",
                tokens.len(),
                scores.len(),
                token_types.len()
            )));
        }
        let flag = |key: &str, default: bool| -> Result<bool> {
            match file.metadata(key) {
                None => Ok(default),
                Some(MetadataValue::Bool(value)) => Ok(*value),
                Some(other) => Err(fail(format!("{key} is {other:?}, not a bool"))),
            }
        };
        let bos_id = token_id(file, "tokenizer.ggml.bos_token_id", tokens.len())?;
        let unknown_id = token_id(file, "tokenizer.ggml.unknown_token_id", tokens.len())?;
        let add_bos = flag("tokenizer.ggml.add_bos_token", true)?;
        let add_space_prefix = flag("tokenizer.ggml.add_space_prefix", true)?;
        let vocabulary =
            SentencePiece::new(tokens, scores, token_types, add_space_prefix, unknown_id);
        let end_ids = end_ids_of(file, vocabulary.vocab_size(), |name| {
            vocabulary.token_id(name)
        })?;
        Ok(Tokenizer {
            vocab_size: vocabulary.vocab_size(),
            inner: Model::SentencePiece(Box::new(vocabulary)),
            source: file.name.clone(),
            bos_id,
            add_bos,
            end_ids,
        })
    }

    /// Loads a Hugging Face `tokenizer.json`. Its post-processor tells the BOS token: the first
    /// id it adds to an empty text, if any.
    pub fn from_tokenizer_json(path: &Path) -> Result<Tokenizer> {
        let source = path.display().to_string();
        let inner = tokenizers::Tokenizer::from_file(path)
            .map_err(|e| file_error(&source, format!("is not a usable tokenizer.json: {e}")))?;
        let bos_id = inner
            .encode("", true)
            .map_err(|e| file_error(&source, format!("cannot add its special tokens: {e}")))?
            .get_ids()
            .first()
            .copied();
        let mut end_ids: Vec<u32> = END_OF_GENERATION_TOKENS
            .iter()
            .filter_map(|name| inner.token_to_id(name))
            .collect();
        end_ids.sort_unstable();
        end_ids.dedup();
        Ok(Tokenizer {
            vocab_size: inner.get_vocab_size(true),
            inner: Model::Hf(Box::new(inner)),
            source,
            bos_id,
            add_bos: bos_id.is_some(),
            end_ids,
        })
    }

    /// The ids of `text`, with special tokens written in it as their single ids. Adds no BOS:
    /// see [`Tokenizer::add_bos`].
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        match &self.inner {
            Model::Hf(inner) => {
                let encoding = inner
                    .encode(text, false)
                    .map_err(|e| self.error(format!("cannot encode text: {e}")))?;
                Ok(encoding.get_ids().to_vec())
            }
            Model::SentencePiece(vocabulary) => Ok(vocabulary.encode(text)),
        }
    }

    /// The text of `ids`, special tokens as their text. Incomplete UTF-8 becomes U+FFFD.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        if let Some(&bad) = ids.iter().find(|&&id| id as usize >= self.vocab_size) {
            return Err(self.error(format!(
                "token id {bad} is outside the vocabulary ({} tokens)",
                self.vocab_size
            )));
        }
        match &self.inner {
            Model::Hf(inner) => inner
                .decode(ids, false)
                .map_err(|e| self.error(format!("cannot decode token ids: {e}"))),
            Model::SentencePiece(vocabulary) => {
                let bytes = vocabulary
                    .decode(ids)
                    .ok_or_else(|| self.error("a token id is outside the vocabulary".into()))?;
                Ok(String::from_utf8_lossy(&bytes).into_owned())
            }
        }
    }

    /// A decoder that turns generated ids into text as they come.
    pub fn stream(&self) -> TokenStream<'_> {
        TokenStream {
            tokenizer: self,
            ids: Vec::new(),
            prefix: String::new(),
            prefix_index: 0,
        }
    }

    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    pub fn bos_id(&self) -> Option<u32> {
        self.bos_id
    }

    /// Whether a prompt should start with [`Tokenizer::bos_id`].
    pub fn add_bos(&self) -> bool {
        self.add_bos && self.bos_id.is_some()
    }

    /// Whether generating `id` ends the answer (EOS, end of turn).
    pub fn is_end_of_generation(&self, id: u32) -> bool {
        self.end_ids.binary_search(&id).is_ok()
    }

    /// The end-of-generation ids, sorted.
    pub fn end_of_generation_ids(&self) -> &[u32] {
        &self.end_ids
    }

    /// The vocabulary entry of `id` as stored (byte-level BPE writes a space as `Ġ`,
    /// SentencePiece as `▁`).
    pub fn token_text(&self, id: u32) -> Option<String> {
        match &self.inner {
            Model::Hf(inner) => inner.id_to_token(id),
            Model::SentencePiece(vocabulary) => vocabulary.token_text(id),
        }
    }

    /// The id of the vocabulary entry `token`, such as `<|im_start|>`.
    pub fn token_id(&self, token: &str) -> Option<u32> {
        match &self.inner {
            Model::Hf(inner) => inner.token_to_id(token),
            Model::SentencePiece(vocabulary) => vocabulary.token_id(token),
        }
    }

    fn error(&self, reason: String) -> ModelFileError {
        file_error(&self.source, reason)
    }
}

/// Decodes generated ids one at a time, yielding text once it is complete UTF-8: a character
/// split across tokens comes out with its last token. Decodes from the last emitted token
/// rather than from each token alone, since decoders may depend on neighbouring tokens.
pub struct TokenStream<'a> {
    tokenizer: &'a Tokenizer,
    /// The ids of the last emitted text (context for the decoder), then those not yet emitted.
    ids: Vec<u32>,
    /// The text of `ids[..prefix_index]`, already emitted.
    prefix: String,
    prefix_index: usize,
}

impl TokenStream<'_> {
    /// Adds `id`; returns the text it completes, or `None` while a character is incomplete.
    pub fn push(&mut self, id: u32) -> Result<Option<String>> {
        self.ids.push(id);
        let text = self.tokenizer.decode(&self.ids)?;
        if text.len() <= self.prefix.len() || text.ends_with(char::REPLACEMENT_CHARACTER) {
            return Ok(None);
        }
        let new_text = self.new_text(text)?;
        // Keep the last emitted ids as context for the next decode.
        self.ids.drain(..self.prefix_index);
        self.prefix = self.tokenizer.decode(&self.ids)?;
        self.prefix_index = self.ids.len();
        Ok(Some(new_text))
    }

    /// The text still held back (an incomplete character decodes as U+FFFD); empty if none.
    pub fn finish(self) -> Result<String> {
        let text = self.tokenizer.decode(&self.ids)?;
        self.new_text(text)
    }

    /// The part of `text` (the decode of `ids`) after the emitted prefix.
    fn new_text(&self, mut text: String) -> Result<String> {
        if !text.starts_with(&self.prefix) {
            return Err(self.tokenizer.error(format!(
                "streamed decoding changed already emitted text `{}` to `{text}`",
                self.prefix
            )));
        }
        Ok(text.split_off(self.prefix.len()))
    }
}

/// One message of a chat: `role` is `system`, `user` or `assistant`.
#[derive(Clone, Debug, PartialEq)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

impl ChatMessage {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        ChatMessage {
            role: role.into(),
            content: content.into(),
        }
    }
}

/// A model's jinja chat template (`tokenizer.chat_template`), rendered as Hugging Face's
/// `apply_chat_template` does: `trim_blocks` and `lstrip_blocks` on, Python string methods.
pub struct ChatTemplate {
    env: Environment<'static>,
    source: String,
    bos_token: String,
    eos_token: String,
}

const TEMPLATE_NAME: &str = "chat_template";
/// Instructions a chat template may run per render: real templates use a few thousand.
const TEMPLATE_FUEL: u64 = 5_000_000;

impl ChatTemplate {
    /// The file's chat template, or `None` if it has none.
    pub fn from_gguf(file: &GgufFile) -> Result<Option<ChatTemplate>> {
        if file.metadata("tokenizer.chat_template").is_none() {
            return Ok(None);
        }
        let template = metadata_str(file, "tokenizer.chat_template")?;
        let tokens = match file.metadata("tokenizer.ggml.tokens") {
            Some(_) => string_array(file, "tokenizer.ggml.tokens")?,
            None => Vec::new(),
        };
        let token_named_by = |key: &str| {
            file.metadata(key)
                .and_then(MetadataValue::as_u64)
                .and_then(|id| tokens.get(id as usize))
                .map(|token| token.to_string())
                .unwrap_or_default()
        };
        let bos_token = token_named_by("tokenizer.ggml.bos_token_id");
        let eos_token = token_named_by("tokenizer.ggml.eos_token_id");
        ChatTemplate::new(&file.name, template, bos_token, eos_token).map(Some)
    }

    /// Compiles `template`; `source` names where it came from in errors.
    pub fn new(
        source: &str,
        template: &str,
        bos_token: String,
        eos_token: String,
    ) -> Result<ChatTemplate> {
        let fail = |reason: String| file_error(source, reason);
        let mut env = Environment::new();
        // A template is code from the model file: bound its work, so a hostile one (nested
        // loops over huge ranges) fails instead of running for ever.
        env.set_fuel(Some(TEMPLATE_FUEL));
        let syntax = SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .build()
            .map_err(|e| fail(format!("chat template syntax: {e}")))?;
        env.set_syntax(syntax);
        // Templates call Python's str/dict methods (`.strip()`, `.items()`, ...).
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |message: String| -> std::result::Result<Value, minijinja::Error> {
                Err(minijinja::Error::new(ErrorKind::InvalidOperation, message))
            },
        );
        env.add_template_owned(TEMPLATE_NAME, template.to_owned())
            .map_err(|e| fail(format!("tokenizer.chat_template does not compile: {e:#}")))?;
        Ok(ChatTemplate {
            env,
            source: source.to_owned(),
            bos_token,
            eos_token,
        })
    }

    /// The prompt for `messages`; with `add_generation_prompt`, ends with the assistant's turn
    /// opened.
    pub fn render(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String> {
        let fail = |e: minijinja::Error| {
            file_error(
                &self.source,
                format!("chat template fails to render: {e:#}"),
            )
        };
        let messages: Vec<Value> = messages
            .iter()
            .map(|m| context! { role => m.role.as_str(), content => m.content.as_str() })
            .collect();
        let template = self.env.get_template(TEMPLATE_NAME).map_err(fail)?;
        template
            .render(context! {
                messages => messages,
                add_generation_prompt => add_generation_prompt,
                bos_token => self.bos_token.as_str(),
                eos_token => self.eos_token.as_str(),
            })
            .map_err(fail)
    }
}

/// The ids that end generation: the file's EOS and EOT ids and the vocabulary's entries of
/// [`END_OF_GENERATION_TOKENS`] (`id_of` looks them up), sorted.
fn end_ids_of(
    file: &GgufFile,
    vocab: usize,
    id_of: impl Fn(&str) -> Option<u32>,
) -> Result<Vec<u32>> {
    let mut end_ids = Vec::new();
    for key in ["tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id"] {
        if let Some(value) = file.metadata(key) {
            match value.as_u64() {
                Some(id) if (id as usize) < vocab => end_ids.push(id as u32),
                _ => {
                    return Err(file_error(
                        &file.name,
                        format!(
                            "{key} is {value:?}, not a token id below the vocabulary size {vocab}"
                        ),
                    ))
                }
            }
        }
    }
    end_ids.extend(
        END_OF_GENERATION_TOKENS
            .iter()
            .filter_map(|name| id_of(name)),
    );
    end_ids.sort_unstable();
    end_ids.dedup();
    Ok(end_ids)
}

/// The pre-tokenizer llama.cpp names `pre`, as the model's own tokenizer.json has it.
fn pre_tokenizer_for(pre: &str) -> std::result::Result<PreTokenizerWrapper, String> {
    // GPT-2's pattern, applied by ByteLevel itself when `use_regex` is on.
    let gpt2 = || ByteLevel::new(false, true, true);
    let split_then_bytes = |pattern: &str| -> std::result::Result<PreTokenizerWrapper, String> {
        let split = Split::new(
            SplitPattern::Regex(pattern.to_owned()),
            SplitDelimiterBehavior::Isolated,
            false,
        )
        .map_err(|e| format!("tokenizer.ggml.pre `{pre}`: its pattern does not compile: {e}"))?;
        Ok(PreTokenizerWrapper::Sequence(Sequence::new(vec![
            split.into(),
            ByteLevel::new(false, true, false).into(),
        ])))
    };
    match pre {
        // SmolLM's tokenizer.json: single digits, then GPT-2's pattern.
        "smollm" => Ok(PreTokenizerWrapper::Sequence(Sequence::new(vec![
            Digits::new(true).into(),
            gpt2().into(),
        ]))),
        "gpt2" | "default" => Ok(gpt2().into()),
        "llama-bpe" | "llama3" => split_then_bytes(LLAMA3_PATTERN),
        "qwen2" => split_then_bytes(QWEN2_PATTERN),
        // GLM-4 splits as Llama 3 does (llama.cpp's CHATGLM4 pattern), but keeps its merges.
        "chatglm-bpe" => split_then_bytes(LLAMA3_PATTERN),
        other => Err(format!(
            "tokenizer.ggml.pre is `{other}`, whose pre-tokenizer this tokenizer does not build; supported: {SUPPORTED_PRE}"
        )),
    }
}

/// `"a b"` → `("a", "b")`: the split is at the first space after the first character, as in
/// llama.cpp, so a merge whose left token is a space still parses.
fn split_merge(merge: &str) -> Option<(String, String)> {
    let first_len = merge.chars().next()?.len_utf8();
    let at = first_len + merge[first_len..].find(' ')?;
    Some((merge[..at].to_owned(), merge[at + 1..].to_owned()))
}

/// The token id under `key`, if the file has one: an id below `vocab_size`.
fn token_id(file: &GgufFile, key: &str, vocab_size: usize) -> Result<Option<u32>> {
    match file.metadata(key) {
        None => Ok(None),
        Some(value) => match value.as_u64() {
            Some(id) if (id as usize) < vocab_size => Ok(Some(id as u32)),
            _ => Err(file_error(
                &file.name,
                format!(
                    "{key} is {value:?}, not a token id below the vocabulary size {vocab_size}"
                ),
            )),
        },
    }
}

fn metadata_str<'f>(file: &'f GgufFile, key: &str) -> Result<&'f str> {
    match file.metadata(key) {
        None => Err(file_error(&file.name, format!("has no {key}"))),
        Some(value) => value
            .as_str()
            .ok_or_else(|| file_error(&file.name, format!("{key} is {value:?}, not a string"))),
    }
}

fn string_array<'f>(file: &'f GgufFile, key: &str) -> Result<Vec<&'f str>> {
    let not_strings = || file_error(&file.name, format!("{key} is not an array of strings"));
    match file.metadata(key) {
        None => Err(file_error(&file.name, format!("has no {key}"))),
        Some(MetadataValue::Array(items)) => items
            .iter()
            .map(|item| item.as_str().ok_or_else(not_strings))
            .collect(),
        Some(_) => Err(not_strings()),
    }
}

fn integer_array(file: &GgufFile, key: &str, value: &MetadataValue) -> Result<Vec<i64>> {
    let not_integers = || file_error(&file.name, format!("{key} is not an array of integers"));
    let MetadataValue::Array(items) = value else {
        return Err(not_integers());
    };
    items
        .iter()
        .map(|item| match *item {
            MetadataValue::I8(v) => Ok(v as i64),
            MetadataValue::I16(v) => Ok(v as i64),
            MetadataValue::I32(v) => Ok(v as i64),
            MetadataValue::I64(v) => Ok(v),
            _ => item
                .as_u64()
                .and_then(|v| i64::try_from(v).ok())
                .ok_or_else(not_integers),
        })
        .collect()
}
