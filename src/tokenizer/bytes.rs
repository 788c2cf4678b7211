//! The byte-level tokenizer of small models such as the 834K test model:
//! token id = byte value, vocab 256.
use crate::error::{Error, Result};

/// Token = byte.
#[derive(Clone, Copy, Debug, Default)]
pub struct ByteTokenizer;

impl ByteTokenizer {
    /// One id per byte.
    pub fn encode(&self, bytes: &[u8]) -> Vec<u32> {
        bytes.iter().map(|&b| b as u32).collect()
    }

    /// Ids back to bytes; an id above 255 is an error.
    pub fn decode(&self, ids: &[u32]) -> Result<Vec<u8>> {
        ids.iter()
            .map(|&i| {
                u8::try_from(i).map_err(|_| {
                    Error::Tokenizer(format!("id {i} is not a byte (byte tokenizer, vocab 256)"))
                })
            })
            .collect()
    }
}
