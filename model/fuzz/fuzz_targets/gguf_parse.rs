//! `GgufFile::parse` on arbitrary bytes; when a file parses, everything built from it: every
//! tensor dequantised, the model shape, the tokenizer (encoding and decoding a short text) and
//! the chat template (rendering one message). Errors are fine; panics, aborts, out-of-memory
//! and hangs are bugs in `shadowkv-model`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use shadowkv_model::{ChatMessage, ChatTemplate, GgufFile, ModelConfig, Tokenizer};

/// Tensors above this many elements are not dequantised, so that the target itself never
/// allocates much (the parser already bounds a tensor by the bytes of the file).
const MAX_ELEMENTS: u64 = 4 << 20;

fuzz_target!(|data: &[u8]| {
    let Ok(file) = GgufFile::parse("fuzz.gguf".into(), data.to_vec()) else {
        return;
    };
    for tensor in &file.tensors {
        assert!(tensor.bytes <= data.len() as u64, "{tensor:?}");
        if tensor.elements() > MAX_ELEMENTS {
            continue;
        }
        let values = file
            .dequantize(&tensor.name)
            .expect("a tensor of the directory dequantises");
        // Names need not be unique: `dequantize` reads the first tensor of that name.
        let first = file.tensor(&tensor.name).expect("listed tensor");
        assert_eq!(values.len() as u64, first.elements(), "{first:?}");
    }

    if let Ok(config) = ModelConfig::from_gguf(&file) {
        assert!(config.heads % config.kv_heads == 0 && config.head_dim % 2 == 0);
        let _ = (config.group(), config.q_dim(), config.kv_dim());
        let _ = config.parameters();
        let rotary_dim = config.rotary_layout().rotary_dim as usize;
        assert!(rotary_dim <= config.head_dim && rotary_dim % 2 == 0);
        assert_eq!(config.inverse_frequencies().len(), rotary_dim / 2);
    }

    if let Ok(tokenizer) = Tokenizer::from_gguf(&file) {
        if let Ok(ids) = tokenizer.encode("Hello wörld 123 <|im_start|>user\n¡hi!<|im_end|>") {
            let _ = tokenizer.decode(&ids);
            let mut stream = tokenizer.stream();
            for &id in &ids {
                if stream.push(id).is_err() {
                    break;
                }
            }
        }
        if let Some(bos) = tokenizer.bos_id() {
            let _ = tokenizer.token_text(bos);
        }
    }

    if let Ok(Some(template)) = ChatTemplate::from_gguf(&file) {
        let _ = template.render(&[ChatMessage::new("user", "Hi")], true);
    }
});
