//! Opening a model: a GGUF file, or a Hugging Face folder (`config.json`, `*.safetensors`,
//! `tokenizer.json`, the chat template from `tokenizer_config.json`).
use std::path::Path;

use crate::config::ModelConfig;
use crate::error::ModelFileError;
use crate::gguf::GgufFile;
use crate::tokenizer::{ChatTemplate, Tokenizer};
use crate::weights::{SafetensorsFiles, WeightFile};

/// Reading a model file fails only with a problem of the file.
type Result<T, E = ModelFileError> = std::result::Result<T, E>;

/// Everything a run needs from the model's files; the weights are read when loaded.
pub struct ModelSource {
    pub config: ModelConfig,
    pub weights: WeightFile,
    pub tokenizer: Tokenizer,
    pub chat_template: Option<ChatTemplate>,
}

impl ModelSource {
    /// `path` is a `.gguf` file or a Hugging Face checkpoint folder.
    pub fn open(path: &Path) -> Result<ModelSource> {
        if path.is_dir() {
            return Self::open_hf(path);
        }
        let file = GgufFile::open(path)?;
        let config = ModelConfig::from_gguf(&file)?;
        let tokenizer = Tokenizer::from_gguf(&file)?;
        let chat_template = ChatTemplate::from_gguf(&file)?;
        Ok(ModelSource {
            config,
            weights: WeightFile::Gguf(file),
            tokenizer,
            chat_template,
        })
    }

    fn open_hf(dir: &Path) -> Result<ModelSource> {
        let config = ModelConfig::from_hf_config(&dir.join("config.json"))?;
        let tokenizer = Tokenizer::from_tokenizer_json(&dir.join("tokenizer.json"))?;
        let config_path = dir.join("tokenizer_config.json");
        let chat_template = match std::fs::read_to_string(&config_path) {
            Err(_) => None,
            Ok(text) => {
                let name = config_path.display().to_string();
                let json: serde_json::Value =
                    serde_json::from_str(&text).map_err(|e| ModelFileError {
                        file: name.clone(),
                        tensor: None,
                        reason: format!("is not valid JSON: {e}"),
                    })?;
                // Special tokens are either plain strings or {"content": ...} objects.
                let token = |key: &str| {
                    json.get(key)
                        .and_then(|v| {
                            v.as_str()
                                .or_else(|| v.get("content").and_then(|c| c.as_str()))
                        })
                        .unwrap_or_default()
                        .to_owned()
                };
                match json.get("chat_template").and_then(|v| v.as_str()) {
                    None => None,
                    Some(template) => Some(ChatTemplate::new(
                        &name,
                        template,
                        token("bos_token"),
                        token("eos_token"),
                    )?),
                }
            }
        };
        Ok(ModelSource {
            config,
            weights: WeightFile::Safetensors(SafetensorsFiles::open(dir)?),
            tokenizer,
            chat_template,
        })
    }

    /// The token ids of a prompt: rendered through the chat template as one user message
    /// when `chat` is set (and the model has one), with BOS first when the tokenizer asks.
    pub fn prompt_tokens(&self, prompt: &str, chat: bool) -> Result<Vec<u32>> {
        let text = match (&self.chat_template, chat) {
            (Some(template), true) => {
                template.render(&[crate::tokenizer::ChatMessage::new("user", prompt)], true)?
            }
            _ => prompt.to_owned(),
        };
        let mut tokens = Vec::new();
        if let (true, Some(bos)) = (self.tokenizer.add_bos(), self.tokenizer.bos_id()) {
            tokens.push(bos);
        }
        tokens.extend(self.tokenizer.encode(&text)?);
        // A template that already starts with BOS (Llama 3) must not get a second one.
        if tokens.len() >= 2 && tokens[0] == tokens[1] && Some(tokens[0]) == self.tokenizer.bos_id()
        {
            tokens.remove(0);
        }
        Ok(tokens)
    }
}
