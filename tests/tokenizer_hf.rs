//! Hugging Face `tokenizer.json` through the `tokenizers` crate (a tiny
//! word-level tokenizer written by the test), the byte tokenizer, and the
//! `Tokenizer::from_spec` front end.
use rwkv_tune::tokenizer::{StreamDecoder, Tokenizer};

const TINY_JSON: &str = r#"{
  "version": "1.0",
  "truncation": null,
  "padding": null,
  "added_tokens": [],
  "normalizer": null,
  "pre_tokenizer": {"type": "Whitespace"},
  "post_processor": null,
  "decoder": null,
  "model": {
    "type": "WordLevel",
    "vocab": {"[UNK]": 0, "hello": 1, "world": 2, "goose": 3, "!": 4},
    "unk_token": "[UNK]"
  }
}"#;

#[test]
fn hf_tokenizer_json() {
    let dir = std::env::temp_dir().join(format!("rwkv-tune-hf-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join("tokenizer.json");
    std::fs::write(&p, TINY_JSON).unwrap();
    let t = Tokenizer::from_spec(&format!("hf:{}", p.display())).unwrap();
    assert_eq!(t.vocab_size(), 5);
    assert_eq!(t.encode("hello goose world !").unwrap(), vec![1, 3, 2, 4]);
    assert_eq!(t.encode("hello duck").unwrap(), vec![1, 0]);
    assert_eq!(t.decode(&[1, 3]).unwrap(), b"hello goose");
    let mut d = StreamDecoder::new();
    let mut s = String::new();
    for id in [1, 3, 2] {
        s.push_str(&d.push(&t, id).unwrap());
    }
    s.push_str(&d.finish());
    assert_eq!(s, "hello goose world");
    std::fs::remove_dir_all(&dir).ok();

    assert!(Tokenizer::from_spec("hf:/nonexistent/tokenizer.json").is_err());
    assert!(Tokenizer::from_spec("spm:x").is_err());
    let bad = rwkv_tune::tokenizer::HfTokenizer::from_bytes(b"{not json");
    assert!(bad.is_err());
}

#[test]
fn byte_tokenizer() {
    let t = Tokenizer::from_spec("bytes").unwrap();
    assert_eq!(t.vocab_size(), 256);
    let s = "héllo 今天";
    let ids = t.encode(s).unwrap();
    assert_eq!(ids.len(), s.len());
    assert_eq!(t.decode(&ids).unwrap(), s.as_bytes());
    assert!(t.decode(&[256]).is_err());
    // Streaming prints characters once their bytes are complete.
    let mut d = StreamDecoder::new();
    let outs: Vec<String> = ids.iter().map(|&i| d.push(&t, i).unwrap()).collect();
    assert_eq!(outs.concat(), s);
    assert_eq!(outs[1], ""); // first byte of 'é'
    assert_eq!(outs[2], "é");
}
