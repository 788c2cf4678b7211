//! Training data for state tuning: reading JSONL or plain text, tokenising,
//! building [`Example`]s of at most `ctx` tokens, and a seeded, resumable
//! batch loader.
//!
//! Accepted inputs:
//! - JSONL, one object per line: `{"text": …}` (loss on every token) or
//!   `{"prompt": …, "response": …}` (loss on the response tokens only;
//!   `"input"/"output"` and `"question"/"answer"` are accepted as aliases).
//! - Plain text (any other file): tokenised as one stream and split into
//!   windows of `ctx` tokens (each window predicts its `ctx` next tokens).
//!
//! Each example starts from the tuned initial state, so examples are never
//! packed together (a packed second example would start from the first one's
//! final state, not from the tuned state). Batches are padded instead: the
//! padding token is 0 with mask 0, appended at the end, where causality keeps
//! it from changing any real position.
use std::path::Path;

use super::state::Example;
use crate::error::{Error, Result};
use crate::rng::Rng;

/// Text ↔ token ids.
pub trait Tokenize: Send + Sync {
    /// Token ids of `text`.
    fn encode(&self, text: &str) -> Result<Vec<u32>>;
    /// Text of `tokens` (lossy where tokens split a UTF-8 character).
    fn decode(&self, tokens: &[u32]) -> String;
}

/// The byte-level tokenizer of vocab-256 models: token = byte value.
#[derive(Clone, Copy, Debug, Default)]
pub struct ByteTokenizer;

impl Tokenize for ByteTokenizer {
    fn encode(&self, text: &str) -> Result<Vec<u32>> {
        Ok(text.bytes().map(u32::from).collect())
    }
    fn decode(&self, tokens: &[u32]) -> String {
        let b: Vec<u8> = tokens.iter().map(|&t| t.min(255) as u8).collect();
        String::from_utf8_lossy(&b).into_owned()
    }
}

/// The project's tokenizers (world, Hugging Face, bytes).
impl Tokenize for crate::tokenizer::Tokenizer {
    fn encode(&self, text: &str) -> Result<Vec<u32>> {
        crate::tokenizer::Tokenizer::encode(self, text)
    }
    fn decode(&self, tokens: &[u32]) -> String {
        match crate::tokenizer::Tokenizer::decode(self, tokens) {
            Ok(b) => String::from_utf8_lossy(&b).into_owned(),
            Err(e) => format!("<{e}>"),
        }
    }
}

/// One tokenised record before it is cut to `ctx`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Record {
    /// Loss on every next-token prediction.
    Text(Vec<u32>),
    /// Loss on the response tokens only.
    Pair {
        /// Prompt tokens.
        prompt: Vec<u32>,
        /// Response tokens.
        response: Vec<u32>,
    },
}

/// A prompt/response pair kept for task metrics (exact match of the greedy
/// response).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Task {
    /// Prompt tokens.
    pub prompt: Vec<u32>,
    /// Response tokens.
    pub response: Vec<u32>,
}

/// A tokenised data set: training examples plus the prompt/response pairs
/// (if any) for exact-match accuracy.
#[derive(Default)]
pub struct Dataset {
    /// Training examples.
    pub examples: Vec<Example>,
    /// Prompt/response pairs for exact-match accuracy.
    pub tasks: Vec<Task>,
    /// Number of positions with a non-zero mask, over all examples.
    pub n_target_tokens: usize,
}

impl Dataset {
    /// Builds examples of at most `ctx` positions from records. A text record
    /// longer than `ctx + 1` tokens becomes several windows; a pair keeps its
    /// prompt's last tokens and its response's first tokens when too long
    /// (at least one response token is kept).
    pub fn from_records(records: &[Record], ctx: usize) -> Result<Dataset> {
        if ctx == 0 {
            return Err(Error::Tune("ctx must be at least 1".into()));
        }
        let mut ds = Dataset::default();
        for rec in records {
            match rec {
                Record::Text(toks) => {
                    let mut start = 0;
                    while start + 1 < toks.len() {
                        let end = (start + ctx + 1).min(toks.len());
                        let seq = &toks[start..end];
                        ds.push(example(seq, 0));
                        start += ctx;
                    }
                }
                Record::Pair { prompt, response } => {
                    if response.is_empty() {
                        continue;
                    }
                    let (p, r) = fit_pair(prompt, response, ctx);
                    if p.is_empty() && r.len() < 2 {
                        continue;
                    }
                    let seq: Vec<u32> = p.iter().chain(r).copied().collect();
                    // Targets seq[1..]; position i predicts seq[i+1], which is a
                    // response token when i + 1 >= p.len().
                    let first = p.len().saturating_sub(1);
                    ds.push(example(&seq, first));
                    if !p.is_empty() {
                        ds.tasks.push(Task {
                            prompt: p.to_vec(),
                            response: r.to_vec(),
                        });
                    }
                }
            }
        }
        Ok(ds)
    }

    fn push(&mut self, e: Example) {
        self.n_target_tokens += e.mask.iter().filter(|&&m| m > 0.0).count();
        self.examples.push(e);
    }
}

/// An example from a token sequence: positions `0..len-1` predict the next
/// token; the mask is 1 from position `first` on.
fn example(seq: &[u32], first: usize) -> Example {
    let n = seq.len() - 1;
    Example {
        tokens: seq[..n].to_vec(),
        targets: seq[1..].to_vec(),
        mask: (0..n).map(|i| if i >= first { 1.0 } else { 0.0 }).collect(),
        soft: None,
    }
}

/// Cuts a prompt/response pair to fit `ctx` positions (`ctx + 1` tokens).
fn fit_pair<'a>(prompt: &'a [u32], response: &'a [u32], ctx: usize) -> (&'a [u32], &'a [u32]) {
    let budget = ctx + 1;
    if prompt.len() + response.len() <= budget {
        return (prompt, response);
    }
    // Keep at most half the budget for the prompt tail, the rest for the response.
    let keep_p = prompt.len().min(budget / 2).min(budget - 1);
    let keep_r = response.len().min(budget - keep_p);
    let keep_p = prompt.len().min(budget - keep_r);
    (&prompt[prompt.len() - keep_p..], &response[..keep_r])
}

/// Parses a JSONL line into a record (see the module docs for the keys).
fn parse_json_record(line: &str, tok: &dyn Tokenize) -> Result<Option<Record>> {
    let v: serde_json::Value =
        serde_json::from_str(line).map_err(|e| Error::Tune(format!("bad JSON: {e}")))?;
    let get = |k: &str| v.get(k).and_then(|x| x.as_str());
    if let Some(t) = get("text") {
        return Ok(Some(Record::Text(tok.encode(t)?)));
    }
    for (pk, rk) in [
        ("prompt", "response"),
        ("input", "output"),
        ("question", "answer"),
    ] {
        if let (Some(p), Some(r)) = (get(pk), get(rk)) {
            return Ok(Some(Record::Pair {
                prompt: tok.encode(p)?,
                response: tok.encode(r)?,
            }));
        }
    }
    Err(Error::Tune(
        "expected an object with \"text\" or \"prompt\"+\"response\" (or input/output, question/answer)"
            .into(),
    ))
}

/// Reads records from a file: JSONL when the name ends in `.jsonl`/`.json`
/// or the first non-empty line parses as a JSON object; plain text otherwise.
pub fn read_records(path: &Path, tok: &dyn Tokenize) -> Result<Vec<Record>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
    let first = text.lines().find(|l| !l.trim().is_empty()).unwrap_or("");
    let is_jsonl = ext == "jsonl"
        || ext == "json"
        || (first.trim_start().starts_with('{')
            && serde_json::from_str::<serde_json::Value>(first).is_ok());
    if !is_jsonl {
        return Ok(vec![Record::Text(tok.encode(&text)?)]);
    }
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let rec = parse_json_record(line, tok)
            .map_err(|e| Error::Tune(format!("{}:{}: {e}", path.display(), i + 1)))?;
        out.extend(rec);
    }
    if out.is_empty() {
        return Err(Error::Tune(format!("{}: no records", path.display())));
    }
    Ok(out)
}

/// Reads a data file and builds its examples (see [`Dataset::from_records`]).
pub fn load_dataset(path: &Path, tok: &dyn Tokenize, ctx: usize) -> Result<Dataset> {
    let recs = read_records(path, tok)?;
    let ds = Dataset::from_records(&recs, ctx)?;
    if ds.examples.is_empty() {
        return Err(Error::Tune(format!(
            "{}: no usable examples (every record is shorter than 2 tokens)",
            path.display()
        )));
    }
    Ok(ds)
}

/// Splits records into (train, valid) after a seeded shuffle, `frac` of them
/// (at least one when there are two or more) going to validation.
/// A single text record (a plain-text file) is split by position instead:
/// its last `frac` of tokens become the validation text.
/// `frac` outside [0, 1] (or NaN) is clamped (NaN = 0): callers should
/// refuse such values; this never panics on them.
pub fn split_records(mut records: Vec<Record>, frac: f64, seed: u64) -> (Vec<Record>, Vec<Record>) {
    let frac = if frac.is_nan() {
        0.0
    } else {
        frac.clamp(0.0, 1.0)
    };
    if let [Record::Text(t)] = records.as_slice() {
        let cut = t.len() - ((t.len() as f64) * frac).round() as usize;
        return (
            vec![Record::Text(t[..cut].to_vec())],
            vec![Record::Text(t[cut..].to_vec())],
        );
    }
    shuffle(&mut records, &mut Rng::new(seed ^ 0x5B1D));
    let n = records.len();
    let mut n_valid = ((n as f64) * frac).round() as usize;
    if n >= 2 {
        n_valid = n_valid.clamp(1, n - 1);
    } else {
        n_valid = 0;
    }
    let valid = records.split_off(n - n_valid);
    (records, valid)
}

/// Fisher–Yates shuffle.
pub fn shuffle<T>(v: &mut [T], rng: &mut Rng) {
    for i in (1..v.len()).rev() {
        let j = rng.below(i as u64 + 1) as usize;
        v.swap(i, j);
    }
}

/// Where a [`Loader`] is: epoch and position in that epoch's order. Saved in
/// checkpoints so a resumed run sees exactly the same batches.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LoaderPos {
    /// Epochs completed.
    pub epoch: u64,
    /// Position in the current epoch.
    pub pos: u64,
}

/// Draws batches from a data set in a seeded order that is reshuffled each
/// epoch. The order of epoch `e` depends only on `(seed, e)`, so a loader is
/// fully described by its [`LoaderPos`].
#[derive(Clone, Debug)]
pub struct Loader {
    n: usize,
    seed: u64,
    order: Vec<usize>,
    at: LoaderPos,
}

impl Loader {
    /// A loader over `n` examples, at the start of epoch 0.
    pub fn new(n: usize, seed: u64) -> Loader {
        Loader::at(n, seed, LoaderPos::default())
    }

    /// A loader over `n` examples, at `at`.
    pub fn at(n: usize, seed: u64, at: LoaderPos) -> Loader {
        let mut l = Loader {
            n,
            seed,
            order: Vec::new(),
            at,
        };
        l.order = l.epoch_order(at.epoch);
        l
    }

    fn epoch_order(&self, epoch: u64) -> Vec<usize> {
        let mut o: Vec<usize> = (0..self.n).collect();
        let mut rng = Rng::new(self.seed ^ epoch.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0xDA7A);
        shuffle(&mut o, &mut rng);
        o
    }

    /// Current position.
    pub fn pos(&self) -> LoaderPos {
        self.at
    }

    /// Indices of the next `batch` examples (wrapping into the next epoch).
    pub fn next_batch(&mut self, batch: usize) -> Vec<usize> {
        let mut out = Vec::with_capacity(batch);
        if self.n == 0 {
            return out;
        }
        while out.len() < batch {
            if self.at.pos as usize >= self.n {
                self.at = LoaderPos {
                    epoch: self.at.epoch + 1,
                    pos: 0,
                };
                self.order = self.epoch_order(self.at.epoch);
            }
            out.push(self.order[self.at.pos as usize]);
            self.at.pos += 1;
        }
        out
    }
}

/// Pads examples to the length of the longest (token 0, mask 0 at the end).
pub fn pad_batch(examples: &[&Example]) -> Vec<Example> {
    let len = examples.iter().map(|e| e.tokens.len()).max().unwrap_or(0);
    examples
        .iter()
        .map(|e| {
            let mut e = Example {
                tokens: e.tokens.clone(),
                targets: e.targets.clone(),
                mask: e.mask.clone(),
                soft: e.soft.clone(),
            };
            let pad = len - e.tokens.len();
            e.tokens.extend(std::iter::repeat_n(0, pad));
            e.targets.extend(std::iter::repeat_n(0, pad));
            e.mask.extend(std::iter::repeat_n(0.0, pad));
            if let Some(p) = e.soft.as_mut() {
                // Soft targets `[T, V]`: pad with zero rows (masked anyway).
                let t = e.tokens.len() - pad;
                if t > 0 && p.len() % t == 0 {
                    let v = p.len() / t;
                    p.resize(e.tokens.len() * v, 0.0);
                }
            }
            e
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_windows_cover_the_stream() {
        let toks: Vec<u32> = (0..10).collect();
        let ds = Dataset::from_records(&[Record::Text(toks)], 4).unwrap();
        assert_eq!(ds.examples.len(), 3);
        assert_eq!(ds.examples[0].tokens, vec![0, 1, 2, 3]);
        assert_eq!(ds.examples[0].targets, vec![1, 2, 3, 4]);
        assert_eq!(ds.examples[2].tokens, vec![8]);
        assert_eq!(ds.examples[2].targets, vec![9]);
        assert_eq!(ds.n_target_tokens, 9);
    }

    #[test]
    fn pair_masks_only_the_response() {
        let rec = Record::Pair {
            prompt: vec![1, 2, 3],
            response: vec![7, 8],
        };
        let ds = Dataset::from_records(&[rec], 16).unwrap();
        let e = &ds.examples[0];
        assert_eq!(e.tokens, vec![1, 2, 3, 7]);
        assert_eq!(e.targets, vec![2, 3, 7, 8]);
        assert_eq!(e.mask, vec![0.0, 0.0, 1.0, 1.0]);
        assert_eq!(ds.tasks.len(), 1);
    }

    #[test]
    fn long_pairs_are_cut() {
        let rec = Record::Pair {
            prompt: (0..20).collect(),
            response: (100..120).collect(),
        };
        let ds = Dataset::from_records(&[rec], 8).unwrap();
        let e = &ds.examples[0];
        assert_eq!(e.tokens.len(), 8);
        assert!(e.mask.iter().any(|&m| m > 0.0));
        assert_eq!(e.targets[e.targets.len() - 1], 104);
    }

    #[test]
    fn jsonl_and_plain_text() {
        let dir = std::env::temp_dir().join(format!("rwkv-tune-data-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let j = dir.join("d.jsonl");
        std::fs::write(
            &j,
            "{\"prompt\":\"ab\",\"response\":\"cd\"}\n\n{\"text\":\"xyz\"}\n",
        )
        .unwrap();
        let recs = read_records(&j, &ByteTokenizer).unwrap();
        assert_eq!(recs.len(), 2);
        let t = dir.join("d.txt");
        std::fs::write(&t, "hello").unwrap();
        let recs = read_records(&t, &ByteTokenizer).unwrap();
        assert_eq!(
            recs,
            vec![Record::Text(b"hello".iter().map(|&b| b as u32).collect())]
        );
        std::fs::write(&j, "{\"nope\":1}\n").unwrap();
        let err = read_records(&j, &ByteTokenizer).unwrap_err().to_string();
        assert!(err.contains("d.jsonl:1"), "{err}");
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn loader_is_resumable_and_covers_each_epoch() {
        let mut a = Loader::new(7, 3);
        let first: Vec<usize> = (0..3).flat_map(|_| a.next_batch(2)).collect();
        let pos = a.pos();
        let rest_a: Vec<usize> = (0..5).flat_map(|_| a.next_batch(2)).collect();
        let mut b = Loader::at(7, 3, pos);
        let rest_b: Vec<usize> = (0..5).flat_map(|_| b.next_batch(2)).collect();
        assert_eq!(rest_a, rest_b);
        let mut epoch0: Vec<usize> = first.iter().chain(&rest_a).take(7).copied().collect();
        epoch0.sort();
        assert_eq!(epoch0, (0..7).collect::<Vec<_>>());
    }

    #[test]
    fn padding_appends_masked_zeros() {
        let a = example(&[1, 2, 3], 0);
        let b = example(&[4, 5], 0);
        let p = pad_batch(&[&a, &b]);
        assert_eq!(p[1].tokens, vec![4, 0]);
        assert_eq!(p[1].mask, vec![1.0, 0.0]);
    }
}
