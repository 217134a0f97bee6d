//! Token streams and the windows the trainer reads from them.

use rayon::prelude::*;

use super::corpus::Document;
use super::tokenizer::Tokenizer;
use crate::rng::SplitMix64;
use crate::train::error::{Result, TrainError as Error};

/// All documents of one split encoded and concatenated, each followed by EOS (and preceded by
/// BOS when the model asks for it, `add_bos_token`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenStream {
    /// Token ids of every document in order, each followed by the EOS id.
    pub tokens: Vec<u32>,
    /// Number of documents encoded (equals the number of EOS ids appended).
    pub docs: usize,
}

impl TokenStream {
    /// Encodes documents in parallel; the stream keeps the documents' order.
    pub fn encode(docs: &[Document], tok: &Tokenizer) -> Result<TokenStream> {
        let encoded = docs
            .par_iter()
            .map(|d| tok.encode(&d.text))
            .collect::<Result<Vec<_>>>()?;
        let sp = tok.specials();
        let bos = sp.bos.filter(|_| sp.add_bos);
        let len = encoded
            .iter()
            .map(|e| e.len() + 1 + bos.is_some() as usize)
            .sum();
        let mut tokens = Vec::with_capacity(len);
        for ids in encoded {
            tokens.extend(bos);
            tokens.extend(ids);
            tokens.push(tok.eos_id());
        }
        Ok(TokenStream {
            tokens,
            docs: docs.len(),
        })
    }
}

/// Salt so that batch offsets do not share a stream with other uses of the user's seed.
const BATCH_SALT: u64 = 0xba7c_4e50_ff5e_7000;

/// `batch` windows of `seq + 1` tokens at uniformly random offsets, as `(inputs, targets)`,
/// each `[batch * seq]` row-major, `targets` being `inputs` shifted by one token. The offsets
/// depend only on `(seed, step)`, so step `s` sees the same batch in a resumed run.
pub fn train_batch(
    stream: &TokenStream,
    seed: u64,
    step: u64,
    batch: usize,
    seq: usize,
) -> Result<(Vec<u32>, Vec<u32>)> {
    check_positive("batch", batch)?;
    check_positive("seq", seq)?;
    let n = stream.tokens.len();
    if n < seq + 1 {
        return Err(Error::Data(format!(
            "the training stream has {n} tokens, fewer than seq + 1 = {}: use more text or a \
             shorter sequence",
            seq + 1
        )));
    }
    let mut rng = SplitMix64::from_parts(&[BATCH_SALT, seed, step]);
    let mut inputs = Vec::with_capacity(batch * seq);
    let mut targets = Vec::with_capacity(batch * seq);
    for _ in 0..batch {
        let offset = rng.below((n - seq) as u64) as usize;
        let window = &stream.tokens[offset..offset + seq + 1];
        inputs.extend_from_slice(&window[..seq]);
        targets.extend_from_slice(&window[1..]);
    }
    Ok((inputs, targets))
}

/// Validation windows as `(inputs, targets)`: window `k` has inputs `tokens[k*seq..(k+1)*seq]`
/// and targets shifted by one, so the targets of all windows are disjoint and together cover
/// tokens `1..=W*seq` of the stream, each predicted once. Every window has exactly `seq`
/// tokens, and the remainder (fewer than `seq` tokens) is dropped, except when the stream is
/// too short for one full window: then the one window is the whole stream (`len - 1`
/// predictions). Empty when the stream has fewer than 2 tokens (or `seq` is 0).
pub fn val_windows(stream: &TokenStream, seq: usize) -> Vec<(Vec<u32>, Vec<u32>)> {
    let t = &stream.tokens;
    if seq == 0 || t.len() < 2 {
        return Vec::new();
    }
    let full = (t.len() - 1) / seq;
    if full == 0 {
        return vec![(t[..t.len() - 1].to_vec(), t[1..].to_vec())];
    }
    (0..full)
        .map(|k| {
            let w = &t[k * seq..(k + 1) * seq + 1];
            (w[..seq].to_vec(), w[1..].to_vec())
        })
        .collect()
}

fn check_positive(name: &'static str, value: usize) -> Result<()> {
    if value == 0 {
        return Err(Error::InvalidOption {
            name,
            value: "0".to_string(),
            reason: "must be at least 1",
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stream(n: u32) -> TokenStream {
        TokenStream {
            tokens: (0..n).collect(),
            docs: 1,
        }
    }

    #[test]
    fn batches_are_shifted_windows() {
        let s = stream(100);
        let (x, y) = train_batch(&s, 1, 7, 4, 10).unwrap();
        assert_eq!((x.len(), y.len()), (40, 40));
        for b in 0..4 {
            let (xb, yb) = (&x[b * 10..][..10], &y[b * 10..][..10]);
            for i in 0..10 {
                // Consecutive tokens in the stream: windows are contiguous.
                assert_eq!(yb[i], xb[i] + 1);
                if i > 0 {
                    assert_eq!(xb[i], xb[i - 1] + 1);
                }
            }
        }
    }

    #[test]
    fn batches_depend_on_seed_and_step_only() {
        let s = stream(1000);
        let a = train_batch(&s, 1, 7, 8, 16).unwrap();
        assert_eq!(a, train_batch(&s, 1, 7, 8, 16).unwrap());
        assert_ne!(a, train_batch(&s, 1, 8, 8, 16).unwrap());
        assert_ne!(a, train_batch(&s, 2, 7, 8, 16).unwrap());
    }

    #[test]
    fn every_offset_is_reachable() {
        // seq + 1 == len - 1: two possible offsets, both must show up, and no other.
        let s = stream(12);
        let mut firsts = std::collections::BTreeSet::new();
        for step in 0..200 {
            firsts.insert(train_batch(&s, 0, step, 1, 10).unwrap().0[0]);
        }
        assert_eq!(firsts.into_iter().collect::<Vec<_>>(), vec![0, 1]);
        assert!(train_batch(&stream(11), 0, 0, 1, 10).is_ok());
    }

    #[test]
    fn bad_batch_arguments() {
        let s = stream(10);
        assert!(matches!(
            train_batch(&s, 0, 0, 1, 10),
            Err(Error::Data(m)) if m.contains("10 tokens")
        ));
        assert!(matches!(
            train_batch(&s, 0, 0, 0, 4),
            Err(Error::InvalidOption { name: "batch", .. })
        ));
        assert!(matches!(
            train_batch(&s, 0, 0, 1, 0),
            Err(Error::InvalidOption { name: "seq", .. })
        ));
    }

    #[test]
    fn val_windows_cover_the_stream_once() {
        let w = val_windows(&stream(23), 5);
        assert_eq!(w.len(), 4);
        let targets: Vec<u32> = w.iter().flat_map(|(_, y)| y.clone()).collect();
        assert_eq!(targets, (1..=20).collect::<Vec<_>>());
        for (x, y) in &w {
            assert_eq!(x.len(), 5);
            assert!(x.iter().zip(y).all(|(a, b)| a + 1 == *b));
        }
        assert_eq!(val_windows(&stream(21), 5).len(), 4);
    }

    #[test]
    fn short_val_stream() {
        assert_eq!(
            val_windows(&stream(4), 5),
            vec![(vec![0, 1, 2], vec![1, 2, 3])]
        );
        assert!(val_windows(&stream(1), 5).is_empty());
        assert!(val_windows(&stream(10), 0).is_empty());
    }
}
