//! Tokenizers: the RWKV "world" vocabulary ([`world`]), the byte-level
//! tokenizer of small models ([`bytes`]), and any Hugging Face
//! `tokenizer.json` ([`hf`]), behind one [`Tokenizer`] enum; plus
//! [`StreamDecoder`], which turns generated tokens into printable text as soon
//! as it is complete UTF-8.
pub mod bytes;
pub mod hf;
pub mod world;

use std::path::Path;

pub use bytes::ByteTokenizer;
pub use hf::HfTokenizer;
pub use world::WorldTokenizer;

use crate::error::{Error, Result};

/// One of the supported tokenizers.
#[derive(Debug)]
pub enum Tokenizer {
    /// RWKV world vocabulary (`rwkv_vocab_v20230424.txt`), greedy longest match.
    World(WorldTokenizer),
    /// One token per byte (vocab 256).
    Bytes(ByteTokenizer),
    /// A Hugging Face `tokenizer.json`.
    Hf(Box<HfTokenizer>),
}

impl Tokenizer {
    /// Parses a command-line spec: `world:PATH`, `hf:PATH` or `bytes`.
    pub fn from_spec(spec: &str) -> Result<Tokenizer> {
        if spec == "bytes" {
            return Ok(Tokenizer::Bytes(ByteTokenizer));
        }
        if let Some(p) = spec.strip_prefix("world:") {
            return Ok(Tokenizer::World(WorldTokenizer::from_file(Path::new(p))?));
        }
        if let Some(p) = spec.strip_prefix("hf:") {
            return Ok(Tokenizer::Hf(Box::new(HfTokenizer::from_file(Path::new(
                p,
            ))?)));
        }
        Err(Error::Tokenizer(format!(
            "unknown tokenizer spec `{spec}` (use world:PATH, hf:PATH or bytes)"
        )))
    }

    /// Encodes text.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        match self {
            Tokenizer::World(t) => Ok(t.encode(text.as_bytes())),
            Tokenizer::Bytes(t) => Ok(t.encode(text.as_bytes())),
            Tokenizer::Hf(t) => t.encode(text),
        }
    }

    /// Decodes ids to bytes (which need not be valid UTF-8 for the world and
    /// byte tokenizers).
    pub fn decode(&self, ids: &[u32]) -> Result<Vec<u8>> {
        match self {
            Tokenizer::World(t) => t.decode(ids),
            Tokenizer::Bytes(t) => t.decode(ids),
            Tokenizer::Hf(t) => Ok(t.decode(ids)?.into_bytes()),
        }
    }

    /// Number of ids the tokenizer can produce (largest id + 1).
    pub fn vocab_size(&self) -> usize {
        match self {
            Tokenizer::World(t) => t.vocab_size(),
            Tokenizer::Bytes(_) => 256,
            Tokenizer::Hf(t) => t.vocab_size(),
        }
    }
}

/// Incremental decoding for streaming output: feed tokens one at a time and
/// get back the text that became complete (UTF-8 sequences split across
/// tokens are held back until they are whole; invalid bytes become U+FFFD).
#[derive(Debug, Default)]
pub struct StreamDecoder {
    pending: Vec<u8>,
    /// For HF tokenizers: all ids so far and the length of text already emitted.
    ids: Vec<u32>,
    emitted: usize,
}

impl StreamDecoder {
    /// A fresh decoder.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds one token; returns the newly completed text (possibly empty).
    pub fn push(&mut self, tok: &Tokenizer, id: u32) -> Result<String> {
        if let Tokenizer::Hf(t) = tok {
            self.ids.push(id);
            let text = t.decode(&self.ids)?;
            if text.ends_with('\u{FFFD}') || text.len() < self.emitted {
                return Ok(String::new());
            }
            let out = text.get(self.emitted..).unwrap_or("").to_string();
            self.emitted = text.len();
            return Ok(out);
        }
        let b = tok.decode(&[id])?;
        self.pending.extend_from_slice(&b);
        Ok(self.drain(false))
    }

    /// Returns whatever is still held back (incomplete sequences become U+FFFD).
    pub fn finish(&mut self) -> String {
        self.drain(true)
    }

    fn drain(&mut self, all: bool) -> String {
        let mut out = String::new();
        loop {
            match std::str::from_utf8(&self.pending) {
                Ok(s) => {
                    out.push_str(s);
                    self.pending.clear();
                    return out;
                }
                Err(e) => {
                    let ok = e.valid_up_to();
                    out.push_str(std::str::from_utf8(&self.pending[..ok]).unwrap_or_default());
                    match e.error_len() {
                        Some(bad) => {
                            out.push('\u{FFFD}');
                            self.pending.drain(..ok + bad);
                        }
                        None => {
                            self.pending.drain(..ok);
                            if all {
                                out.push('\u{FFFD}');
                                self.pending.clear();
                            }
                            return out;
                        }
                    }
                }
            }
        }
    }
}
