//! The self-contained state-tuning demo: a small RWKV-7 built
//! deterministically from a seed (no download) and a synthetic task it cannot
//! do before tuning, plus the paths of the real tiny model and
//! tinyshakespeare when the shared data directory (`../shared`) exists.
//!
//! The synthetic task ("punctuation persona"): the prompt is `Q: ` followed by
//! a few random lowercase words and ends in `?`, `!` or `.`; the response is
//! fixed by that last character — ` Yes.` after `?`, ` Wow!` after `!`,
//! ` Ok.` after `.` — followed by a newline. A random model scores 0% exact
//! match; a tuned initial state has to make every layer steer the output,
//! with nothing but the per-layer WKV states.
use std::path::PathBuf;

use super::data::{Dataset, Record, Tokenize};
use crate::error::Result;
use crate::model::{Config, Weights};
use crate::rng::Rng;

/// Seed of the demo model's weights.
pub const DEMO_MODEL_SEED: u64 = 2504_05097;

/// The demo model's shape: byte-level (vocab 256), 2 layers, width 128, two
/// heads of size 64.
pub fn demo_config() -> Config {
    Config::with_defaults(2, 128, 64, 256)
}

/// The demo model: seeded random weights with realistic magnitudes.
pub fn demo_weights(seed: u64) -> Result<Weights> {
    Weights::random(&demo_config(), seed)
}

/// The three prompt endings and their responses.
pub const PERSONA: [(char, &str); 3] = [('?', " Yes.\n"), ('!', " Wow!\n"), ('.', " Ok.\n")];

/// One synthetic prompt/response pair as text.
pub fn synthetic_pair(rng: &mut Rng) -> (String, String) {
    let n_words = 1 + rng.below(3) as usize;
    let mut p = String::from("Q:");
    for _ in 0..n_words {
        p.push(' ');
        let len = 2 + rng.below(5) as usize;
        for _ in 0..len {
            p.push((b'a' + rng.below(26) as u8) as char);
        }
    }
    let (end, resp) = PERSONA[rng.below(PERSONA.len() as u64) as usize];
    p.push(end);
    (p, resp.to_string())
}

/// `n` synthetic records, tokenised with `tok`.
pub fn synthetic_records(n: usize, seed: u64, tok: &dyn Tokenize) -> Result<Vec<Record>> {
    let mut rng = Rng::new(seed);
    (0..n)
        .map(|_| {
            let (p, r) = synthetic_pair(&mut rng);
            Ok(Record::Pair {
                prompt: tok.encode(&p)?,
                response: tok.encode(&r)?,
            })
        })
        .collect()
}

/// Train and validation sets of the synthetic task (disjoint seeds).
pub fn synthetic_datasets(
    n_train: usize,
    n_valid: usize,
    seed: u64,
    tok: &dyn Tokenize,
) -> Result<(Dataset, Dataset)> {
    let train = Dataset::from_records(&synthetic_records(n_train, seed, tok)?, 64)?;
    let valid = Dataset::from_records(
        &synthetic_records(n_valid, seed ^ 0xFEED_FACE_CAFE_BEEF, tok)?,
        64,
    )?;
    Ok((train, valid))
}

/// The shared data directory next to the crate (`../shared`), if present.
pub fn shared_dir() -> Option<PathBuf> {
    let d = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join("shared");
    d.is_dir().then_some(d)
}

/// The real tiny model (rwkv7-tiny-834k, byte-level) and tinyshakespeare,
/// when `../shared` has them.
pub fn shakespeare_paths() -> Option<(PathBuf, PathBuf)> {
    let d = shared_dir()?;
    let m = d.join("fixtures/rwkv7-tiny-834k/rwkv7-tiny-834k.safetensors");
    let t = d.join("datasets/tinyshakespeare.txt");
    (m.is_file() && t.is_file()).then_some((m, t))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tune::data::ByteTokenizer;

    #[test]
    fn synthetic_task_is_deterministic_and_well_formed() {
        let a = synthetic_records(20, 1, &ByteTokenizer).unwrap();
        let b = synthetic_records(20, 1, &ByteTokenizer).unwrap();
        assert_eq!(a, b);
        for r in &a {
            let Record::Pair { prompt, response } = r else {
                panic!("not a pair")
            };
            let end = *prompt.last().unwrap() as u8 as char;
            let want = PERSONA.iter().find(|p| p.0 == end).unwrap().1;
            assert_eq!(ByteTokenizer.decode(response), want);
        }
    }
}
