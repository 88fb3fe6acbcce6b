//! The model crate's errors keep their cause: a parameter or GPU failure's `source()` is the
//! `shadowkv::Error` itself, not its text. No model file or GPU needed.
use std::error::Error as _;

use shadowkv_model::cpu::shadowkv::validate;
use shadowkv_model::{Error, ModelConfig, ModelFileError, ShadowKvParams};

#[test]
fn bad_parameters_keep_the_shadowkv_error_as_source() {
    let config = ModelConfig::named("smollm2-135m").expect("a named shape");
    let params = ShadowKvParams {
        rank: 200,
        ..ShadowKvParams::default()
    };
    let error = validate(&params, &config).expect_err("rank 200 is not a multiple of 16");
    assert!(matches!(error, Error::Parameters(_)), "{error:?}");
    let source = error.source().expect("the parameters' error as source");
    let inner = source
        .downcast_ref::<shadowkv::Error>()
        .expect("the source is a shadowkv::Error");
    assert!(
        matches!(inner, shadowkv::Error::InvalidArgument { .. }),
        "{inner:?}"
    );
    // The message still says what failed.
    assert!(error.to_string().contains(&inner.to_string()), "{error}");
    assert!(error.to_string().contains("rank 200"), "{error}");
}

#[test]
fn gpu_errors_keep_the_shadowkv_error_as_source() {
    let error = Error::Gpu {
        what: "attending over the full KV cache",
        source: shadowkv::error::invalid("q", "has 3 elements", "4 ([batch, heads, d])"),
    };
    let inner = error
        .source()
        .and_then(|s| s.downcast_ref::<shadowkv::Error>())
        .expect("the source is a shadowkv::Error");
    assert!(matches!(
        inner,
        shadowkv::Error::InvalidArgument { argument: "q", .. }
    ));
    let text = error.to_string();
    assert!(
        text.starts_with("attending over the full KV cache: "),
        "{text}"
    );
    assert!(text.contains("has 3 elements"), "{text}");
}

#[test]
fn file_errors_stay_model_file_errors() {
    let error = ModelConfig::named("no-such-shape").expect_err("an unknown shape");
    let expected = ModelFileError {
        file: "model shape `no-such-shape`".into(),
        tensor: None,
        reason: error.reason.clone(),
    };
    assert_eq!(error, expected);
    // Through the crate's error, transparently.
    let wrapped = Error::from(error);
    assert!(matches!(&wrapped, Error::File(e) if *e == expected));
    assert_eq!(wrapped.to_string(), expected.to_string());
}
