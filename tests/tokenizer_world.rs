//! The RWKV world tokenizer: known ids from the Python reference
//! (`TRIE_TOKENIZER`), round trips on random text and bytes, agreement with
//! the independent `rwkv-tokenizer` crate, CRLF files and malformed lines.
//! The vocabulary comes from the `rwkv-tokenizer` crate's sources in the cargo
//! registry (or `RWKV_VOCAB=path`); the tests skip with a message without it.
use std::path::PathBuf;

use rwkv_tune::model::init::SplitMix64;
use rwkv_tune::tokenizer::{StreamDecoder, Tokenizer, WorldTokenizer};

fn vocab_path() -> Option<PathBuf> {
    if let Ok(p) = std::env::var("RWKV_VOCAB") {
        return Some(PathBuf::from(p));
    }
    let home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))?;
    let src = home.join("registry").join("src");
    let mut found: Vec<PathBuf> = std::fs::read_dir(&src)
        .ok()?
        .flatten()
        .flat_map(|reg| {
            std::fs::read_dir(reg.path())
                .into_iter()
                .flatten()
                .flatten()
        })
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with("rwkv-tokenizer-")
        })
        .map(|e| e.path().join("assets").join("rwkv_vocab_v20230424.txt"))
        .filter(|p| p.is_file())
        .collect();
    found.sort();
    found.pop()
}

fn load() -> Option<(PathBuf, WorldTokenizer)> {
    match vocab_path() {
        Some(p) => {
            let t = WorldTokenizer::from_file(&p).expect("parse the vocabulary");
            Some((p, t))
        }
        None => {
            eprintln!("SKIP: rwkv_vocab_v20230424.txt not found (set RWKV_VOCAB)");
            None
        }
    }
}

#[test]
fn known_ids() {
    let Some((_, t)) = load() else { return };
    assert_eq!(t.vocab_size(), 65530);
    let cases: &[(&str, &[u32])] = &[
        ("Hello", &[33155]),
        ("Hello world", &[33155, 40213]),
        ("\n\n", &[261]),
        (
            "The Eiffel tower is in the city of",
            &[6699, 304, 25740, 109, 39990, 4600, 4596, 22590, 30449, 4706],
        ),
        (
            "今天是美好的一天。",
            &[
                10381, 11639, 13091, 15597, 11685, 14734, 10250, 11639, 10080,
            ],
        ),
        (
            "\n\nUser: hi\n\nAssistant:",
            &[261, 24281, 59, 4571, 261, 5585, 41693, 59],
        ),
    ];
    for (text, ids) in cases {
        assert_eq!(t.encode_str(text), *ids, "encode {text:?}");
        assert_eq!(t.decode(ids).unwrap(), text.as_bytes(), "decode {ids:?}");
    }
    // Single bytes: ids 1..=256.
    assert_eq!(t.token_bytes(1), Some(&[0u8][..]));
    assert_eq!(t.token_bytes(256), Some(&[0xffu8][..]));
    assert!(t.decode(&[70000]).is_err());
    assert_eq!(t.decode(&[0]).unwrap(), Vec::<u8>::new());
}

fn random_text(r: &mut SplitMix64, n: usize) -> String {
    const PIECES: &[&str] = &[
        " the",
        " and",
        "ing",
        "tion",
        " ",
        "\n",
        "\n\n",
        "今天",
        "是",
        "é",
        "ü",
        "😀",
        "a",
        "b",
        "Z",
        "0",
        "42",
        ",",
        ".",
        "User:",
        " Assistant",
        "\t",
        "Привет",
        "  ",
        "\u{0}",
    ];
    let mut s = String::new();
    for _ in 0..n {
        if r.uniform() < 0.3 {
            let c = char::from_u32(r.next_u64() as u32 % 0x3000).unwrap_or('?');
            s.push(c);
        } else {
            s.push_str(PIECES[r.next_u64() as usize % PIECES.len()]);
        }
    }
    s
}

#[test]
fn round_trips_and_agrees_with_rwkv_tokenizer_crate() {
    let Some((path, t)) = load() else { return };
    let other = rwkv_tokenizer::WorldTokenizer::new(Some(path.to_str().unwrap())).unwrap();
    let mut r = SplitMix64::new(1234);
    for i in 0..300 {
        let s = random_text(&mut r, 1 + i % 60);
        let ids = t.encode_str(&s);
        assert_eq!(t.decode(&ids).unwrap(), s.as_bytes(), "round trip {s:?}");
        let theirs: Vec<u32> = other.encode(&s).into_iter().map(u32::from).collect();
        assert_eq!(ids, theirs, "differs from rwkv-tokenizer on {s:?}");
    }
    // Arbitrary bytes (not UTF-8) round-trip too.
    for n in [1usize, 7, 100, 1000] {
        let b: Vec<u8> = (0..n).map(|_| r.next_u64() as u8).collect();
        assert_eq!(t.decode(&t.encode(&b)).unwrap(), b);
    }
}

#[test]
fn crlf_file_and_spec() {
    let Some((path, t)) = load() else { return };
    let text = std::fs::read_to_string(&path).unwrap();
    let crlf = text.replace('\n', "\r\n");
    let t2 = WorldTokenizer::from_vocab_bytes(crlf.as_bytes()).unwrap();
    let s = "The Eiffel tower is in the city of Paris.\r\n今天是美好的一天。";
    assert_eq!(t.encode_str(s), t2.encode_str(s));
    let tk = Tokenizer::from_spec(&format!("world:{}", path.display())).unwrap();
    assert_eq!(tk.encode("Hello world").unwrap(), vec![33155, 40213]);
}

#[test]
fn encoding_is_linear() {
    let Some((_, t)) = load() else { return };
    // 128-space token repeated, and a long run of one byte: both fast.
    let long = " ".repeat(1 << 20);
    let start = std::time::Instant::now();
    let ids = t.encode_str(&long);
    assert_eq!(ids.len(), (1 << 20) / 128);
    assert!(ids.iter().all(|&i| i == 65529));
    let mixed = "The quick brown fox, 今天是美好的一天。 ".repeat(20000);
    let ids = t.encode_str(&mixed);
    assert_eq!(t.decode(&ids).unwrap(), mixed.as_bytes());
    assert!(start.elapsed().as_secs_f64() < 5.0);
}

#[test]
fn literals_and_malformed_lines() {
    let vocab = "1 '\\x00' 1\n2 'a' 1\n3 b'\\xe4' 1\n4 b'\\xbd' 1\n5 b'\\xa0' 1\n\
                 6 'ab' 2\n7 '\\'q\\\\' 3\n8 \"it's\" 4\n9 '\\n\\t' 2\n10 '你' 3\n11 '\\u00e9' 2\n";
    let t = WorldTokenizer::from_vocab_bytes(vocab.as_bytes()).unwrap();
    assert_eq!(t.token_bytes(7), Some(&b"'q\\"[..]));
    assert_eq!(t.token_bytes(8), Some(&b"it's"[..]));
    assert_eq!(t.token_bytes(9), Some(&b"\n\t"[..]));
    assert_eq!(t.token_bytes(11), Some("é".as_bytes()));
    assert_eq!(t.encode("aab你".as_bytes()), vec![2, 6, 10]);
    // A byte split across tokens: the stream decoder waits for the whole char.
    let tk = Tokenizer::World(t);
    let mut d = StreamDecoder::new();
    assert_eq!(d.push(&tk, 3).unwrap(), "");
    assert_eq!(d.push(&tk, 4).unwrap(), "");
    assert_eq!(d.push(&tk, 5).unwrap(), "你");
    assert_eq!(d.push(&tk, 3).unwrap(), "");
    assert_eq!(d.push(&tk, 2).unwrap(), "\u{FFFD}a");
    assert_eq!(d.finish(), "");

    for bad in [
        "1 'a' 2\n",
        "x 'a' 1\n",
        "1 'a 1\n",
        "1 'a'\n",
        "1 'a' 1\n2 'a' 1\n",
    ] {
        let e = WorldTokenizer::from_vocab_bytes(bad.as_bytes());
        assert!(e.is_err(), "{bad:?} should be rejected");
    }
    let e = WorldTokenizer::from_vocab_bytes(b"1 'a' 1\n2 'b' 5\n").unwrap_err();
    assert!(e.to_string().contains("line 2"), "{e}");
}
