//! The embedded default corpus: a small stochastic language whose exact probability is known.
//!
//! # The process
//! A lexicon of pronounceable lowercase words is built from syllables. There are a few latent
//! topics; each owns a random pool of lexicon words (pools overlap), a distribution over
//! sentence-initial words, and for every pool word a distribution over a few successors (Zipf
//! weights `60/r`) plus an end-of-sentence outcome. A document:
//! 1. draws a topic uniformly;
//! 2. writes a sentence: a start word, then successors until end-of-sentence;
//! 3. after each sentence ends the document with probability `end / (end + continue)` (a
//!    geometric number of sentences), else goes back to 2.
//!
//! The text is the sentences, each with its first letter capitalized and a final `.`, joined
//! by single spaces. That rendering is injective, so [`SyntheticLanguage::log_prob`] parses text
//! back to the one word sequence and sums the logs of the process's choices, marginalized over
//! the topic. All sampling uses integer weights and [`SplitMix64`], so the corpus is
//! bit-identical everywhere; only `log_prob` uses floating point.
//!
//! Why this shape: the successor tables give a strong local structure a small model learns
//! quickly, the topic gives long-range structure (which pool, which transitions) that only a
//! model reading earlier sentences can exploit, and the document length is part of the
//! probability, so predicting EOS is accounted for exactly.

use std::collections::HashMap;

use super::batches::TokenStream;
use super::corpus::{Corpus, Document};
use super::tokenizer::Tokenizer;
use crate::rng::SplitMix64;
use crate::train::error::{Result, TrainError as Error};

/// Sizes and weights of a language. The default is what [`SyntheticLanguage::new`] uses; tests
/// use tiny ones whose outcomes can be enumerated.
#[derive(Debug, Clone)]
struct Config {
    lexicon: usize,
    topics: usize,
    /// Words per topic pool.
    pool: usize,
    /// Distinct sentence-initial words per topic.
    starts: usize,
    /// Each pool word has between 1 and this many successors.
    max_successors: usize,
    /// End-of-sentence weight = ceil(sum of successor weights / eos_divisor).
    eos_divisor: u32,
    end_weight: u32,
    continue_weight: u32,
}

const DEFAULT_CONFIG: Config = Config {
    lexicon: 200,
    topics: 4,
    pool: 64,
    starts: 8,
    max_successors: 5,
    eos_divisor: 7,
    end_weight: 1,
    continue_weight: 4,
};

const ZIPF_NUMERATOR: u32 = 60;
const LEXICON_SALT: u64 = 0x1e81_c0a5_0000_0001;
const DOC_SALT: u64 = 0xd0c5_0000_0000_0002;
/// Validation documents use indices from here on, so they never meet training indices and do
/// not change when the number of training documents does.
const VAL_BASE: u64 = 1 << 63;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    Word(u32),
    Eos,
}

/// A distribution over words and end-of-sentence with integer weights.
#[derive(Debug, Clone)]
struct Dist {
    words: Vec<(u32, u32)>,
    eos: u32,
    total: u32,
}

impl Dist {
    fn new(words: Vec<(u32, u32)>, eos: u32) -> Dist {
        let total = words.iter().map(|w| w.1).sum::<u32>() + eos;
        Dist { words, eos, total }
    }

    fn zipf(words: impl IntoIterator<Item = u32>) -> Vec<(u32, u32)> {
        words
            .into_iter()
            .enumerate()
            .map(|(r, w)| (w, ZIPF_NUMERATOR / (r as u32 + 1)))
            .collect()
    }

    fn sample(&self, rng: &mut SplitMix64) -> Step {
        let mut r = rng.below(self.total as u64) as u32;
        for &(w, weight) in &self.words {
            if r < weight {
                return Step::Word(w);
            }
            r -= weight;
        }
        Step::Eos
    }

    fn log_p(&self, step: Step) -> f64 {
        let weight = match step {
            Step::Eos => self.eos,
            Step::Word(w) => self.words.iter().find(|x| x.0 == w).map_or(0, |x| x.1),
        };
        (weight as f64 / self.total as f64).ln()
    }

    #[cfg(test)]
    fn entropy(&self) -> f64 {
        let weights = self.words.iter().map(|w| w.1).chain([self.eos]);
        weights
            .filter(|&w| w > 0)
            .map(|w| {
                let p = w as f64 / self.total as f64;
                -p * p.ln()
            })
            .sum()
    }
}

#[derive(Debug, Clone)]
struct Topic {
    start: Dist,
    /// Indexed by word id; `None` for words outside the topic's pool.
    next: Vec<Option<Dist>>,
}

/// A seeded instance of the language described in the [module docs](self).
#[derive(Debug, Clone)]
pub struct SyntheticLanguage {
    seed: u64,
    config: Config,
    words: Vec<String>,
    index: HashMap<String, u32>,
    topics: Vec<Topic>,
}

impl SyntheticLanguage {
    /// The language for `seed`: lexicon and topics depend only on the seed, so equal seeds give
    /// identical corpora on every platform.
    pub fn new(seed: u64) -> Self {
        Self::with_config(seed, DEFAULT_CONFIG)
    }

    fn with_config(seed: u64, config: Config) -> Self {
        let mut rng = SplitMix64::from_parts(&[LEXICON_SALT, seed]);
        let words = make_lexicon(&mut rng, config.lexicon);
        let index = words
            .iter()
            .enumerate()
            .map(|(i, w)| (w.clone(), i as u32))
            .collect();
        let topics = (0..config.topics)
            .map(|_| make_topic(&mut rng, &config))
            .collect();
        SyntheticLanguage {
            seed,
            config,
            words,
            index,
            topics,
        }
    }

    /// The lexicon, indexed by word id.
    pub fn words(&self) -> &[String] {
        &self.words
    }

    /// The document with index `i`: deterministic in `(seed, i)`, independent of other indices.
    pub fn document(&self, i: u64) -> Document {
        let (_, sentences) = self.generate(i);
        Document {
            text: self.render(&sentences),
            source: format!("synthetic:{i}"),
        }
    }

    /// Exact natural-log probability of `text` under the generating process, marginalized over
    /// the topic; `None` if the process cannot produce it (including any deviation from the
    /// rendering: spacing, capitalization, punctuation, unknown words).
    pub fn log_prob(&self, text: &str) -> Option<f64> {
        let sentences = self.parse(text)?;
        let per_topic: Vec<f64> = (0..self.topics.len())
            .map(|z| self.log_prob_given_topic(z, &sentences))
            .collect();
        let max = per_topic.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        if max == f64::NEG_INFINITY {
            return None;
        }
        let sum: f64 = per_topic.iter().map(|lp| (lp - max).exp()).sum();
        Some(max + sum.ln() - (self.topics.len() as f64).ln())
    }

    /// The topic and the sentences (word ids) of document `i`.
    fn generate(&self, i: u64) -> (usize, Vec<Vec<u32>>) {
        let mut rng = SplitMix64::from_parts(&[DOC_SALT, self.seed, i]);
        let z = rng.below(self.topics.len() as u64) as usize;
        let topic = &self.topics[z];
        let mut sentences = Vec::new();
        loop {
            let mut sentence = Vec::new();
            let mut step = topic.start.sample(&mut rng);
            while let Step::Word(w) = step {
                sentence.push(w);
                step = topic.next[w as usize]
                    .as_ref()
                    .expect("successors are drawn from the topic's pool")
                    .sample(&mut rng);
            }
            sentences.push(sentence);
            let c = &self.config;
            if rng.below((c.end_weight + c.continue_weight) as u64) < c.end_weight as u64 {
                return (z, sentences);
            }
        }
    }

    fn render(&self, sentences: &[Vec<u32>]) -> String {
        let mut text = String::new();
        for sentence in sentences {
            if !text.is_empty() {
                text.push(' ');
            }
            for (j, &w) in sentence.iter().enumerate() {
                let word = &self.words[w as usize];
                if j == 0 {
                    text.push_str(&capitalize(word));
                } else {
                    text.push(' ');
                    text.push_str(word);
                }
            }
            text.push('.');
        }
        text
    }

    /// The unique word sequence whose rendering is `text`, if any.
    fn parse(&self, text: &str) -> Option<Vec<Vec<u32>>> {
        let mut sentences = Vec::new();
        let mut current: Vec<u32> = Vec::new();
        for token in text.split(' ') {
            let (word, ends) = match token.strip_suffix('.') {
                Some(w) => (w, true),
                None => (token, false),
            };
            let lower = if current.is_empty() {
                decapitalize(word)?
            } else {
                word.to_string()
            };
            current.push(*self.index.get(&lower)?);
            if ends {
                sentences.push(std::mem::take(&mut current));
            }
        }
        if !current.is_empty() || sentences.is_empty() {
            return None;
        }
        // Belt and braces: only the canonical rendering belongs to the language.
        (self.render(&sentences) == text).then_some(sentences)
    }

    fn log_prob_given_topic(&self, z: usize, sentences: &[Vec<u32>]) -> f64 {
        let topic = &self.topics[z];
        let c = &self.config;
        let stop = (c.end_weight + c.continue_weight) as f64;
        let mut lp = (c.end_weight as f64 / stop).ln()
            + (sentences.len() - 1) as f64 * (c.continue_weight as f64 / stop).ln();
        for sentence in sentences {
            lp += topic.start.log_p(Step::Word(sentence[0]));
            let steps = sentence[1..]
                .iter()
                .map(|&w| Step::Word(w))
                .chain([Step::Eos]);
            for (&prev, step) in sentence.iter().zip(steps) {
                match &topic.next[prev as usize] {
                    Some(dist) => lp += dist.log_p(step),
                    None => return f64::NEG_INFINITY,
                }
            }
        }
        lp
    }
}

impl Corpus {
    /// `train_docs` and `val_docs` documents of `SyntheticLanguage::new(seed)`. Training uses
    /// indices `0..train_docs`, validation `2^63..2^63 + val_docs`: disjoint, and the
    /// validation set does not change with the size of the training set.
    /// Either count may be 0 (unlike [`Corpus::load`], nothing here guarantees two non-empty
    /// sides; [`super::train_batch`] reports an empty stream).
    pub fn synthetic(seed: u64, train_docs: usize, val_docs: usize) -> Corpus {
        let lang = SyntheticLanguage::new(seed);
        Corpus {
            train: (0..train_docs as u64).map(|i| lang.document(i)).collect(),
            val: (0..val_docs as u64)
                .map(|j| lang.document(VAL_BASE + j))
                .collect(),
        }
    }
}

/// The best achievable validation loss, in nats per token, of a model of the validation stream
/// ([`TokenStream::encode`] of `val`: each document's tokens followed by EOS):
///
/// `floor = (sum over val documents of -ln P(doc)) / (number of tokens in that stream)`.
///
/// Why this bounds the loss: the documents are independent and a tokenization is a function of
/// the text, so the stream's true probability is the product of the `P(doc)` (the EOS after a
/// document carries no extra information: `P(doc)` already includes the process's decision to
/// end there). By Gibbs' inequality no model can assign the stream, on average, a higher
/// probability, so no model's mean cross-entropy per token of the stream can be lower in
/// expectation. (A model that spreads mass over non-canonical tokenizations only does worse.)
/// The floor is the expectation's sample estimate on this validation set.
///
/// A windowed evaluation ([`super::val_windows`]) cannot quite reach it: each window starts with
/// no context (the first tokens of a window cannot know the topic, or which word they
/// continue), the first token of each window is not predicted, and the dropped tail changes the
/// mix slightly. The gap shrinks as the context grows relative to the document length.
pub fn entropy_floor(lang: &SyntheticLanguage, val: &[Document], tok: &Tokenizer) -> Result<f64> {
    let mut info = 0.0;
    for doc in val {
        let lp = lang.log_prob(&doc.text).ok_or_else(|| {
            Error::Data(format!(
                "{}: document is not in the synthetic language of seed {}",
                doc.source, lang.seed
            ))
        })?;
        info -= lp;
    }
    let stream = TokenStream::encode(val, tok)?;
    if stream.tokens.is_empty() {
        return Err(Error::Data(
            "entropy floor: no validation documents".to_string(),
        ));
    }
    Ok(info / stream.tokens.len() as f64)
}

fn capitalize(word: &str) -> String {
    let mut chars = word.chars();
    match chars.next() {
        Some(first) => first.to_ascii_uppercase().to_string() + chars.as_str(),
        None => String::new(),
    }
}

/// The lowercase form of a capitalized word; `None` if the first letter is not uppercase.
fn decapitalize(word: &str) -> Option<String> {
    let mut chars = word.chars();
    let first = chars.next()?;
    first
        .is_ascii_uppercase()
        .then(|| first.to_ascii_lowercase().to_string() + chars.as_str())
}

fn make_lexicon(rng: &mut SplitMix64, size: usize) -> Vec<String> {
    const ONSETS: [&str; 16] = [
        "b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "sh", "th",
    ];
    const VOWELS: [&str; 6] = ["a", "e", "i", "o", "u", "ai"];
    const CODAS: [&str; 6] = ["", "", "", "n", "r", "s"];
    let pick = |rng: &mut SplitMix64, xs: &[&'static str]| xs[rng.below(xs.len() as u64) as usize];
    let mut words = Vec::with_capacity(size);
    let mut seen = std::collections::HashSet::new();
    while words.len() < size {
        let syllables = 1 + rng.below(3);
        let mut word = String::new();
        for _ in 0..syllables {
            word.push_str(pick(rng, &ONSETS));
            word.push_str(pick(rng, &VOWELS));
            word.push_str(pick(rng, &CODAS));
        }
        if seen.insert(word.clone()) {
            words.push(word);
        }
    }
    words
}

fn make_topic(rng: &mut SplitMix64, c: &Config) -> Topic {
    let pool: Vec<u32> = rng
        .choose(c.lexicon, c.pool)
        .into_iter()
        .map(|i| i as u32)
        .collect();
    let start_words = rng
        .choose(pool.len(), c.starts)
        .into_iter()
        .map(|j| pool[j]);
    let start = Dist::new(Dist::zipf(start_words), 0);
    let mut next = vec![None; c.lexicon];
    for &w in &pool {
        let m = 1 + rng.below(c.max_successors as u64) as usize;
        let successors = rng.choose(pool.len(), m).into_iter().map(|j| pool[j]);
        let weights = Dist::zipf(successors);
        let sum: u32 = weights.iter().map(|x| x.1).sum();
        next[w as usize] = Some(Dist::new(weights, sum.div_ceil(c.eos_divisor)));
    }
    Topic { start, next }
}

#[cfg(test)]
mod tests;
