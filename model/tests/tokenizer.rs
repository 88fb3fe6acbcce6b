//! The tokenizer and chat template of the built-in SmolLM2-135M-Instruct GGUF (fetched by
//! tools/setup.sh; a missing file fails these tests with that advice), on the CPU.
use shadowkv_model::{
    builtin_model_path, ChatMessage, ChatTemplate, GgufFile, MetadataValue, Tokenizer,
};

fn builtin_file() -> GgufFile {
    let path = builtin_model_path().unwrap_or_else(|e| panic!("{e}"));
    GgufFile::open(&path).unwrap_or_else(|e| panic!("{e}"))
}

fn builtin_tokenizer() -> Tokenizer {
    Tokenizer::from_gguf(&builtin_file()).unwrap_or_else(|e| panic!("{e}"))
}

/// SmolLM2's prompt for one user message with the assistant's turn opened: the string
/// transformers' `apply_chat_template(..., add_generation_prompt=True)` gives (see
/// tests/data/tokenizer_reference.py). No system message, so the template adds its default.
const CHAT_PROMPT: &str = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n";

#[test]
fn decode_inverts_encode() {
    let tokenizer = builtin_tokenizer();
    let texts = [
        "",
        "Hello, world! The quick brown fox jumps over the lazy dog.",
        "12345 and 3.14159 and -42",
        "a  b   c    d",
        "   leading and trailing   ",
        "line one\nline two\r\n\n\nline five\n",
        "\tindented\twith\ttabs\t\t",
        "emoji: 👋🏽 🦀 🇫🇷 ❤️",
        "CJK: 你好，世界。東京タワー 한국어",
        "accents: Ça va? Ñandú, Øresund, Zürich, naïve, Ελληνικά, русский",
        "specials: <|im_start|>user\nhi<|im_end|>\n<|endoftext|>",
        "not quite special: <|im_start| and <im_end|>",
        "I'm sure they'll say it's fine, we've done it.",
    ];
    for text in texts {
        let ids = tokenizer.encode(text).unwrap();
        assert_eq!(tokenizer.decode(&ids).unwrap(), text, "ids {ids:?}");
    }
}

#[test]
fn digits_split_into_single_tokens() {
    let tokenizer = builtin_tokenizer();
    let ids = tokenizer.encode("12345").unwrap();
    let pieces: Vec<String> = ids
        .iter()
        .map(|&id| tokenizer.decode(&[id]).unwrap())
        .collect();
    assert_eq!(pieces, ["1", "2", "3", "4", "5"]);
}

#[test]
fn known_ids() {
    // From model/tests/data/tokenizer_reference.py, where transformers' tokenizer built from this
    // GGUF, the Python `tokenizers` package with SmolLM2's tokenizer.json pre-tokenizer, and a
    // pure-Python GPT-2 BPE all give these ids.
    let cases: [(&str, &[u32]); 6] = [
        ("Hello, world!", &[19556, 28, 905, 17]),
        (
            "The year 2024 had 366 days.",
            &[
                504, 713, 216, 34, 32, 34, 36, 761, 216, 35, 38, 38, 2009, 30,
            ],
        ),
        (
            "  indented\n\tline\n\n  end",
            &[216, 641, 6574, 198, 197, 1311, 8866, 1112],
        ),
        (
            "Café naïve — 東京 🦀",
            &[
                51, 1939, 2756, 15486, 46494, 1841, 17097, 247, 126, 16736, 122, 15107, 116, 218,
            ],
        ),
        (
            "I'm sure they'll say it's fine.",
            &[57, 5248, 2090, 502, 3060, 1643, 357, 506, 4979, 30],
        ),
        (
            CHAT_PROMPT,
            &[
                1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 3511, 308, 34519, 28, 7018,
                411, 407, 19712, 8182, 2, 198, 1, 4093, 198, 1780, 314, 260, 3575, 282, 4649, 47,
                2, 198, 1, 520, 9531, 198,
            ],
        ),
    ];
    let tokenizer = builtin_tokenizer();
    for (text, expected) in cases {
        assert_eq!(tokenizer.encode(text).unwrap(), expected, "{text:?}");
    }
}

#[test]
fn special_tokens_and_metadata() {
    let tokenizer = builtin_tokenizer();
    assert_eq!(tokenizer.vocab_size(), 49152);
    assert_eq!(tokenizer.encode("<|im_start|>").unwrap(), [1]);
    assert_eq!(tokenizer.token_id("<|im_start|>"), Some(1));
    assert_eq!(tokenizer.token_text(2).as_deref(), Some("<|im_end|>"));
    assert_eq!(tokenizer.bos_id(), Some(1));
    assert!(
        !tokenizer.add_bos(),
        "SmolLM2's GGUF says add_bos_token = false"
    );
    // EOS is <|im_end|> (2); <|endoftext|> (0) also ends a document.
    assert!(tokenizer.is_end_of_generation(2));
    assert!(tokenizer.is_end_of_generation(0));
    assert!(!tokenizer.is_end_of_generation(1));
    assert!(!tokenizer.is_end_of_generation(19556));
    let error = tokenizer.decode(&[49152]).unwrap_err();
    assert!(error.reason.contains("49152"), "{error}");
}

#[test]
fn chat_template_renders_chatml() {
    let file = builtin_file();
    let template = ChatTemplate::from_gguf(&file)
        .unwrap()
        .expect("SmolLM2's GGUF has a chat template");
    let messages = [ChatMessage::new("user", "What is the capital of France?")];
    assert_eq!(template.render(&messages, true).unwrap(), CHAT_PROMPT);
    let with_system = [
        ChatMessage::new("system", "Be brief."),
        ChatMessage::new("user", "Hi"),
    ];
    assert_eq!(
        template.render(&with_system, false).unwrap(),
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
    );
}

#[test]
fn chat_template_globals_and_python_methods() {
    let template = ChatTemplate::new(
        "inline",
        "{{ bos_token }}{% for m in messages %}{{ m['content'].strip() | upper }}{% endfor %}{% if add_generation_prompt %}{{ eos_token }}{% endif %}",
        "<s>".into(),
        "</s>".into(),
    )
    .unwrap();
    let messages = [ChatMessage::new("user", "  hello  ")];
    assert_eq!(template.render(&messages, true).unwrap(), "<s>HELLO</s>");
    let raising = ChatTemplate::new(
        "inline",
        "{% if messages[0].role != 'system' %}{{ raise_exception('a system message is required') }}{% endif %}",
        String::new(),
        String::new(),
    )
    .unwrap();
    let error = raising.render(&messages, false).unwrap_err();
    assert!(
        error.reason.contains("a system message is required"),
        "{error}"
    );
    let broken = ChatTemplate::new("inline", "{% for %}", String::new(), String::new());
    assert!(broken.is_err());
}

/// Replaces (or adds) a metadata value of the file.
fn set_metadata(file: &mut GgufFile, key: &str, value: MetadataValue) {
    file.metadata.retain(|(k, _)| k != key);
    file.metadata.push((key.to_owned(), value));
}

#[test]
fn unsupported_tokenizers_are_errors_naming_the_value() {
    let mut file = builtin_file();
    set_metadata(
        &mut file,
        "tokenizer.ggml.model",
        MetadataValue::String("bert".into()),
    );
    let error = Tokenizer::from_gguf(&file).err().expect("an error");
    assert!(error.reason.contains("`bert`"), "{error}");
    assert!(
        error.reason.contains("gpt2") && error.reason.contains("llama"),
        "{error}"
    );
    assert!(error.file.ends_with("SmolLM2-135M-Instruct.Q4_1.gguf"));
    // A SentencePiece vocabulary needs its scores (this BPE file has none).
    set_metadata(
        &mut file,
        "tokenizer.ggml.model",
        MetadataValue::String("llama".into()),
    );
    let error = Tokenizer::from_gguf(&file).err().expect("an error");
    assert!(error.reason.contains("tokenizer.ggml.scores"), "{error}");

    set_metadata(
        &mut file,
        "tokenizer.ggml.model",
        MetadataValue::String("gpt2".into()),
    );
    set_metadata(
        &mut file,
        "tokenizer.ggml.pre",
        MetadataValue::String("falcon".into()),
    );
    let error = Tokenizer::from_gguf(&file).err().expect("an error");
    assert!(error.reason.contains("`falcon`"), "{error}");
    assert!(error.reason.contains("smollm"), "{error}");

    set_metadata(&mut file, "tokenizer.ggml.pre", MetadataValue::U32(7));
    let error = Tokenizer::from_gguf(&file).err().expect("an error");
    assert!(error.reason.contains("not a string"), "{error}");

    file.metadata.retain(|(k, _)| k != "tokenizer.ggml.merges");
    set_metadata(
        &mut file,
        "tokenizer.ggml.pre",
        MetadataValue::String("smollm".into()),
    );
    let error = Tokenizer::from_gguf(&file).err().expect("an error");
    assert!(error.reason.contains("tokenizer.ggml.merges"), "{error}");
}

#[test]
fn other_pre_tokenizers_build_and_round_trip() {
    let mut file = builtin_file();
    let text = "It's 2024!  Costs $1234.50\n\n\tnaïve 東京 🦀 <|im_end|>";
    for pre in ["gpt2", "default", "llama-bpe", "qwen2", "chatglm-bpe"] {
        set_metadata(
            &mut file,
            "tokenizer.ggml.pre",
            MetadataValue::String(pre.into()),
        );
        let tokenizer = Tokenizer::from_gguf(&file).unwrap_or_else(|e| panic!("{pre}: {e}"));
        let ids = tokenizer.encode(text).unwrap();
        assert_eq!(tokenizer.decode(&ids).unwrap(), text, "{pre}");
        assert_eq!(ids.last(), Some(&2), "{pre}: <|im_end|> is one id");
    }
}

#[test]
fn stream_matches_decode_across_split_characters() {
    let tokenizer = builtin_tokenizer();
    let text = "Café — 東京 🦀!\nDone.";
    let ids = tokenizer.encode(text).unwrap();
    // 東, 京 and 🦀 are each spread over several byte-level tokens.
    assert!(ids
        .iter()
        .any(|&id| tokenizer.decode(&[id]).unwrap().contains('\u{FFFD}')));
    let mut stream = tokenizer.stream();
    let mut streamed = String::new();
    for &id in &ids {
        if let Some(piece) = stream.push(id).unwrap() {
            assert!(
                !piece.contains('\u{FFFD}'),
                "{piece:?} holds a broken character"
            );
            streamed.push_str(&piece);
        }
    }
    streamed.push_str(&stream.finish().unwrap());
    assert_eq!(streamed, tokenizer.decode(&ids).unwrap());
    assert_eq!(streamed, text);

    // A stream cut inside a character hands the rest over as U+FFFD at the end.
    let crab = tokenizer.encode("🦀").unwrap();
    let mut stream = tokenizer.stream();
    assert_eq!(stream.push(crab[0]).unwrap(), None);
    assert_eq!(stream.finish().unwrap(), "\u{FFFD}");
}

#[test]
fn tokenizer_json_loads() {
    // A tiny byte-level BPE whose post-processor adds <s>: that is its BOS.
    let json = r#"{
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": [
            {"id": 0, "content": "<s>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true},
            {"id": 1, "content": "<|endoftext|>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true}
        ],
        "normalizer": null,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {"<s>": {"id": "<s>", "ids": [0], "tokens": ["<s>"]}}
        },
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {
            "type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
            "vocab": {"<s>": 0, "<|endoftext|>": 1, "a": 2, "b": 3, "Ġ": 4, "ab": 5, "Ġab": 6},
            "merges": ["a b", "Ġ ab"]
        }
    }"#;
    let dir = std::env::temp_dir().join(format!("shadowkv-tokenizer-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("tokenizer.json");
    std::fs::write(&path, json).unwrap();
    let tokenizer = Tokenizer::from_tokenizer_json(&path);
    std::fs::remove_dir_all(&dir).unwrap();
    let tokenizer = tokenizer.unwrap();
    assert_eq!(tokenizer.encode("ab ab<|endoftext|>").unwrap(), [5, 6, 1]);
    assert_eq!(tokenizer.decode(&[5, 6, 1]).unwrap(), "ab ab<|endoftext|>");
    assert_eq!(tokenizer.bos_id(), Some(0));
    assert!(tokenizer.add_bos());
    assert!(tokenizer.is_end_of_generation(1));
    assert_eq!(tokenizer.vocab_size(), 7);

    let missing = Tokenizer::from_tokenizer_json(&dir.join("absent.json"));
    assert!(missing.is_err());
}

#[test]
fn a_chat_template_that_never_ends_runs_out_of_fuel() {
    let hostile =
        "{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}";
    let template =
        shadowkv_model::ChatTemplate::new("hostile.gguf", hostile, String::new(), String::new())
            .unwrap();
    let started = std::time::Instant::now();
    let error = template
        .render(&[shadowkv_model::ChatMessage::new("user", "hi")], true)
        .unwrap_err();
    assert!(
        started.elapsed().as_secs() < 20,
        "took {:?}",
        started.elapsed()
    );
    assert!(error.to_string().contains("hostile.gguf"), "{error}");
}
