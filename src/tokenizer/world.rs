//! The RWKV "world" tokenizer (`rwkv_vocab_v20230424.txt`).
//!
//! File format: one token per line, `ID REPR LEN`, where `REPR` is a Python
//! `str` literal (encoded as UTF-8) or `bytes` literal (`b'\x80'`) and `LEN`
//! is the byte length. CRLF line ends are accepted. Id 0 is not in the file
//! (it is the end-of-text token and decodes to nothing).
//!
//! Encoding is greedy longest match over bytes using a byte trie: at every
//! position take the longest vocabulary entry that is a prefix of the rest.
//! Every single byte is in the vocabulary, so encoding never fails; the work
//! per input byte is bounded by the longest token (128 bytes), i.e. linear.
use std::path::Path;

use crate::error::{Error, Result};

#[derive(Clone, Debug, Default)]
struct Node {
    /// Token ending here (0 = none).
    token: u32,
    /// Children sorted by byte: (byte, node index).
    children: Vec<(u8, u32)>,
}

/// The world tokenizer.
#[derive(Clone, Debug)]
pub struct WorldTokenizer {
    /// Bytes of each id (index = id; id 0 and unused ids are empty).
    tokens: Vec<Vec<u8>>,
    /// Trie nodes; node 0 is the root.
    nodes: Vec<Node>,
    /// Node of each one-byte prefix (`u32::MAX` when absent).
    root_children: Vec<u32>,
}

/// Parses a Python string or bytes literal into bytes.
fn parse_literal(s: &str) -> std::result::Result<Vec<u8>, String> {
    let (is_bytes, rest) = match s.strip_prefix('b') {
        Some(r) => (true, r),
        None => (false, s),
    };
    let q = rest.chars().next().ok_or("empty literal")?;
    if q != '\'' && q != '"' {
        return Err(format!("literal does not start with a quote: {s}"));
    }
    if rest.len() < 2 || !rest.ends_with(q) {
        return Err(format!("literal is not closed: {s}"));
    }
    let body = &rest[1..rest.len() - 1];
    let mut out = Vec::with_capacity(body.len());
    let mut it = body.chars().peekable();
    let push_char = |out: &mut Vec<u8>, c: char| {
        let mut buf = [0u8; 4];
        out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
    };
    let hex = |it: &mut std::iter::Peekable<std::str::Chars<'_>>, n: usize| {
        let mut v: u32 = 0;
        for _ in 0..n {
            let d = it
                .next()
                .and_then(|c| c.to_digit(16))
                .ok_or("bad hex escape")?;
            v = v * 16 + d;
        }
        Ok::<u32, String>(v)
    };
    while let Some(c) = it.next() {
        if c != '\\' {
            if is_bytes && !c.is_ascii() {
                return Err(format!("non-ASCII character in bytes literal: {s}"));
            }
            push_char(&mut out, c);
            continue;
        }
        let e = it.next().ok_or("dangling backslash")?;
        let simple = match e {
            '\\' => Some(b'\\'),
            '\'' => Some(b'\''),
            '"' => Some(b'"'),
            'n' => Some(b'\n'),
            't' => Some(b'\t'),
            'r' => Some(b'\r'),
            'a' => Some(0x07),
            'b' => Some(0x08),
            'f' => Some(0x0c),
            'v' => Some(0x0b),
            _ => None,
        };
        if let Some(b) = simple {
            out.push(b);
            continue;
        }
        match e {
            'x' => {
                let v = hex(&mut it, 2)?;
                if is_bytes {
                    out.push(v as u8);
                } else {
                    push_char(&mut out, char::from_u32(v).ok_or("bad \\x escape")?);
                }
            }
            'u' | 'U' if !is_bytes => {
                let v = hex(&mut it, if e == 'u' { 4 } else { 8 })?;
                push_char(&mut out, char::from_u32(v).ok_or("bad unicode escape")?);
            }
            '0'..='7' => {
                let mut v = e.to_digit(8).unwrap_or(0);
                for _ in 0..2 {
                    match it.peek().and_then(|c| c.to_digit(8)) {
                        Some(d) => {
                            v = v * 8 + d;
                            it.next();
                        }
                        None => break,
                    }
                }
                if is_bytes {
                    out.push(v as u8);
                } else {
                    push_char(&mut out, char::from_u32(v).ok_or("bad octal escape")?);
                }
            }
            other => {
                // Python keeps unknown escapes verbatim.
                out.push(b'\\');
                push_char(&mut out, other);
            }
        }
    }
    Ok(out)
}

impl WorldTokenizer {
    /// Loads a vocabulary file.
    pub fn from_file(path: &Path) -> Result<WorldTokenizer> {
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        Self::from_vocab_bytes(&bytes)
            .map_err(|e| Error::Tokenizer(format!("{}: {e}", path.display())))
    }

    /// Parses vocabulary file contents.
    pub fn from_vocab_bytes(data: &[u8]) -> Result<WorldTokenizer> {
        let text = std::str::from_utf8(data)
            .map_err(|e| Error::Tokenizer(format!("vocabulary is not UTF-8: {e}")))?;
        let mut entries: Vec<(u32, Vec<u8>)> = Vec::new();
        for (ln, line) in text.split('\n').enumerate() {
            let line = line.strip_suffix('\r').unwrap_or(line);
            if line.trim().is_empty() {
                continue;
            }
            let bad = |m: String| Error::Tokenizer(format!("line {}: {m}", ln + 1));
            let (id, rest) = line.split_once(' ').ok_or_else(|| bad("no space".into()))?;
            let (lit, len) = rest
                .rsplit_once(' ')
                .ok_or_else(|| bad("no length".into()))?;
            let id: u32 = id.parse().map_err(|_| bad(format!("bad id `{id}`")))?;
            let len: usize = len
                .parse()
                .map_err(|_| bad(format!("bad length `{len}`")))?;
            let bytes = parse_literal(lit).map_err(bad)?;
            if bytes.len() != len {
                return Err(bad(format!(
                    "literal has {} bytes but the line says {len}",
                    bytes.len()
                )));
            }
            if id == 0 || bytes.is_empty() {
                return Err(bad("id 0 and empty tokens are not allowed".into()));
            }
            entries.push((id, bytes));
        }
        Self::from_entries(entries)
    }

    /// Builds the tokenizer from `(id, bytes)` pairs (ids ≥ 1, distinct).
    pub fn from_entries(entries: Vec<(u32, Vec<u8>)>) -> Result<WorldTokenizer> {
        let max_id = entries.iter().map(|e| e.0).max().unwrap_or(0) as usize;
        let mut tokens = vec![Vec::new(); max_id + 1];
        let mut nodes = vec![Node::default()];
        for (id, bytes) in entries {
            if !tokens[id as usize].is_empty() {
                return Err(Error::Tokenizer(format!("id {id} appears twice")));
            }
            let mut cur = 0usize;
            for &b in &bytes {
                let pos = nodes[cur].children.binary_search_by_key(&b, |c| c.0);
                cur = match pos {
                    Ok(i) => nodes[cur].children[i].1 as usize,
                    Err(i) => {
                        let n = nodes.len();
                        nodes.push(Node::default());
                        nodes[cur].children.insert(i, (b, n as u32));
                        n
                    }
                };
            }
            if nodes[cur].token != 0 {
                return Err(Error::Tokenizer(format!(
                    "ids {} and {id} have the same bytes",
                    nodes[cur].token
                )));
            }
            nodes[cur].token = id;
            tokens[id as usize] = bytes;
        }
        let mut root_children = vec![u32::MAX; 256];
        for &(b, n) in &nodes[0].children {
            root_children[b as usize] = n;
        }
        Ok(WorldTokenizer {
            tokens,
            nodes,
            root_children,
        })
    }

    /// Greedy longest-match encoding. Bytes not covered by any token (only
    /// possible with a vocabulary lacking single bytes) are skipped.
    pub fn encode(&self, bytes: &[u8]) -> Vec<u32> {
        let mut out = Vec::with_capacity(bytes.len() / 3 + 1);
        let mut pos = 0;
        while pos < bytes.len() {
            let mut best = (0u32, 1usize);
            let mut cur = self.root_children[bytes[pos] as usize];
            let mut len = 1;
            while cur != u32::MAX {
                let node = &self.nodes[cur as usize];
                if node.token != 0 {
                    best = (node.token, len);
                }
                let Some(&b) = bytes.get(pos + len) else {
                    break;
                };
                cur = match node.children.binary_search_by_key(&b, |c| c.0) {
                    Ok(i) => node.children[i].1,
                    Err(_) => u32::MAX,
                };
                len += 1;
            }
            if best.0 != 0 {
                out.push(best.0);
            }
            pos += best.1;
        }
        out
    }

    /// Encodes a string.
    pub fn encode_str(&self, text: &str) -> Vec<u32> {
        self.encode(text.as_bytes())
    }

    /// Concatenates the bytes of the ids (id 0 decodes to nothing); an id
    /// outside the vocabulary is an error.
    pub fn decode(&self, ids: &[u32]) -> Result<Vec<u8>> {
        let mut out = Vec::new();
        for &id in ids {
            match self.tokens.get(id as usize) {
                Some(b) if !b.is_empty() || id == 0 => out.extend_from_slice(b),
                _ => {
                    return Err(Error::Tokenizer(format!(
                        "id {id} is not in the vocabulary"
                    )))
                }
            }
        }
        Ok(out)
    }

    /// The bytes of one id, if it exists.
    pub fn token_bytes(&self, id: u32) -> Option<&[u8]> {
        self.tokens
            .get(id as usize)
            .map(|b| b.as_slice())
            .filter(|b| !b.is_empty())
    }

    /// Largest id + 1.
    pub fn vocab_size(&self) -> usize {
        self.tokens.len()
    }
}
