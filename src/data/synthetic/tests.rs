//! Exactness of the synthetic language: probabilities computed by `log_prob` (parse + sum of
//! logs + marginalization) are checked against quantities computed separately from the tables.

use super::*;

/// Three words, two topics of two words each: documents can be enumerated.
const TINY: Config = Config {
    lexicon: 3,
    topics: 2,
    pool: 2,
    starts: 2,
    max_successors: 2,
    eos_divisor: 1,
    end_weight: 1,
    continue_weight: 1,
};

/// Every text of `n` words over the lexicon, with any choice of sentence breaks.
fn all_texts(lang: &SyntheticLanguage, n: usize) -> Vec<String> {
    let l = lang.words.len();
    let mut out = Vec::new();
    for code in 0..l.pow(n as u32) {
        let words: Vec<u32> = (0..n)
            .map(|j| ((code / l.pow(j as u32)) % l) as u32)
            .collect();
        for breaks in 0..1usize << (n - 1) {
            let mut sentences = vec![vec![words[0]]];
            for (j, &w) in words.iter().enumerate().skip(1) {
                if breaks >> (j - 1) & 1 == 1 {
                    sentences.push(Vec::new());
                }
                sentences.last_mut().unwrap().push(w);
            }
            out.push(lang.render(&sentences));
        }
    }
    out
}

/// P(the document has exactly n words) for n = 1..=max, by a forward pass over the process
/// (topic, last word), independent of parsing and of `log_prob`.
fn length_distribution(lang: &SyntheticLanguage, max: usize) -> Vec<f64> {
    let c = &lang.config;
    let stop = (c.end_weight + c.continue_weight) as f64;
    let (p_end, p_cont) = (c.end_weight as f64 / stop, c.continue_weight as f64 / stop);
    let k = lang.topics.len() as f64;
    let p = |d: &Dist, w: u32| {
        d.words.iter().find(|x| x.0 == w).map_or(0, |x| x.1) as f64 / d.total as f64
    };
    let l = lang.words.len();
    let mut done = vec![0.0; max + 1];
    for topic in &lang.topics {
        let mut alpha: Vec<f64> = (0..l).map(|w| p(&topic.start, w as u32) / k).collect();
        for slot in done.iter_mut().skip(1) {
            let mut next = vec![0.0; l];
            for (w, &a) in alpha.iter().enumerate() {
                let Some(d) = &topic.next[w] else { continue };
                let eos = a * d.eos as f64 / d.total as f64;
                *slot += eos * p_end;
                for (v, x) in next.iter_mut().enumerate() {
                    *x += a * p(d, v as u32) + eos * p_cont * p(&topic.start, v as u32);
                }
            }
            alpha = next;
        }
    }
    done
}

#[test]
fn enumerated_probabilities_match_the_process() {
    for seed in 0..4 {
        let lang = SyntheticLanguage::with_config(seed, TINY);
        let lengths = length_distribution(&lang, 200);
        assert!(
            (lengths.iter().sum::<f64>() - 1.0).abs() < 1e-9,
            "{lengths:?}"
        );
        for (n, &expected) in lengths.iter().enumerate().take(7).skip(1) {
            let texts = all_texts(&lang, n);
            let total: f64 = texts
                .iter()
                .filter_map(|t| lang.log_prob(t))
                .map(f64::exp)
                .sum();
            assert!(
                (total - expected).abs() < 1e-12,
                "seed {seed}, {n} words: sum {total} vs {expected}"
            );
        }
    }
}

#[test]
fn sampling_frequencies_match_log_prob() {
    let lang = SyntheticLanguage::with_config(1, TINY);
    let n = 40_000u64;
    let mut counts: HashMap<String, u64> = HashMap::new();
    for i in 0..n {
        *counts.entry(lang.document(i).text).or_default() += 1;
    }
    let mut checked = 0;
    for (text, &count) in &counts {
        let p = lang
            .log_prob(text)
            .expect("generated text is in the language")
            .exp();
        let expected = n as f64 * p;
        if expected > 50.0 {
            let sd = (expected * (1.0 - p)).sqrt();
            assert!(
                (count as f64 - expected).abs() < 5.0 * sd,
                "{text:?}: seen {count}, expected {expected:.1}"
            );
            checked += 1;
        }
    }
    assert!(checked >= 10, "only {checked} frequent documents");
}

#[test]
fn documents_are_deterministic_and_independent() {
    let a = SyntheticLanguage::new(5);
    let b = SyntheticLanguage::new(5);
    assert_eq!(a.document(17), b.document(17));
    assert_eq!(a.document(17).source, "synthetic:17");
    assert_ne!(a.document(17).text, a.document(18).text);
    assert_ne!(
        a.document(17).text,
        SyntheticLanguage::new(6).document(17).text
    );
    assert_eq!(a.words().len(), DEFAULT_CONFIG.lexicon);
    assert!(a
        .words()
        .iter()
        .all(|w| !w.is_empty() && w.bytes().all(|b| b.is_ascii_lowercase())));
}

#[test]
fn mutations_leave_the_language_or_lose_probability() {
    let lang = SyntheticLanguage::new(3);
    let (mut substitutions, mut not_lower) = (0, 0);
    for i in 0..200 {
        let text = lang.document(i).text;
        let lp = lang.log_prob(&text).unwrap();
        assert!(lp.is_finite() && lp < 0.0);
        let malformed = [
            text.trim_end_matches('.').to_string(),
            text.to_lowercase(),
            text.replacen(' ', "  ", 1),
            format!("{text} "),
            format!("{text}\n"),
            text.to_uppercase(),
            String::new(),
        ];
        for m in malformed.iter().filter(|m| **m != text) {
            assert_eq!(lang.log_prob(m), None, "{m:?}");
        }
        let (_, sentences) = lang.generate(i);
        for (s, sentence) in sentences.iter().enumerate() {
            for j in 0..sentence.len() {
                let mut mutated = sentences.clone();
                mutated[s][j] = (sentence[j] + 1) % lang.words.len() as u32;
                substitutions += 1;
                if lang
                    .log_prob(&lang.render(&mutated))
                    .is_some_and(|m| m >= lp)
                {
                    not_lower += 1;
                }
            }
        }
    }
    assert!(
        not_lower * 20 < substitutions,
        "{not_lower} of {substitutions} substitutions did not lower the probability"
    );
}

/// H(doc | topic) from the tables: expected visits to each state times its entropy.
fn conditional_entropy(lang: &SyntheticLanguage) -> (f64, f64) {
    let c = &lang.config;
    let stop = (c.end_weight + c.continue_weight) as f64;
    let p_end = c.end_weight as f64 / stop;
    let sentences = 1.0 / p_end;
    let h_stop = -p_end * p_end.ln() - (1.0 - p_end) * (1.0 - p_end).ln();
    let (mut h, mut words) = (0.0, 0.0);
    for topic in &lang.topics {
        let l = lang.words.len();
        let mut base = vec![0.0; l];
        for &(w, weight) in &topic.start.words {
            base[w as usize] = sentences * weight as f64 / topic.start.total as f64;
        }
        let mut visits = base.clone();
        for _ in 0..2000 {
            let mut next = base.clone();
            for (w, &v) in visits.iter().enumerate() {
                if let Some(d) = &topic.next[w] {
                    for &(u, weight) in &d.words {
                        next[u as usize] += v * weight as f64 / d.total as f64;
                    }
                }
            }
            visits = next;
        }
        let h_words: f64 = (0..l)
            .filter_map(|w| topic.next[w].as_ref().map(|d| visits[w] * d.entropy()))
            .sum();
        h += sentences * (topic.start.entropy() + h_stop) + h_words;
        words += visits.iter().sum::<f64>();
    }
    let k = lang.topics.len() as f64;
    (h / k, words / k)
}

#[test]
fn sample_entropy_matches_the_tables() {
    let lang = SyntheticLanguage::new(0);
    let (h_cond, words_per_doc) = conditional_entropy(&lang);
    let n = 4000;
    let (mut cond, mut cond_sq, mut marg, mut words) = (0.0, 0.0, 0.0, 0.0);
    for i in 0..n {
        let (z, sentences) = lang.generate(i);
        let lc = -lang.log_prob_given_topic(z, &sentences);
        cond += lc;
        cond_sq += lc * lc;
        marg -= lang.log_prob(&lang.render(&sentences)).unwrap();
        words += sentences.iter().map(|s| s.len() as f64).sum::<f64>();
    }
    let n = n as f64;
    let (cond, marg, words) = (cond / n, marg / n, words / n);
    let se = ((cond_sq / n - cond * cond) / n).sqrt();
    eprintln!(
        "H(doc|topic) = {h_cond:.3} nats, sample {cond:.3} +- {se:.3}; -log P(doc) sample mean \
         {marg:.3}; words/doc {words_per_doc:.2} (sample {words:.2}); \
         {:.4} nats/word ({:.4} with the topic known)",
        marg / words_per_doc,
        h_cond / words_per_doc
    );
    assert!((cond - h_cond).abs() < 4.0 * se, "{cond} vs {h_cond}");
    let ln_k = (lang.topics.len() as f64).ln();
    assert!(marg > h_cond - 4.0 * se && marg < h_cond + ln_k + 4.0 * se);
    // The per-document topic posterior is a real quantity: not free, not ln K either.
    assert!(marg - cond > 0.01 && marg - cond < ln_k);
}

/// Cross-entropy per word on held-out documents of a count model with add-0.01 smoothing that
/// predicts each word (or end of sentence) from `context(previous word)` only.
fn baseline(lang: &SyntheticLanguage, context: impl Fn(Option<u32>) -> usize) -> f64 {
    let l = lang.words.len();
    let eos = l;
    let mut counts: HashMap<usize, Vec<f64>> = HashMap::new();
    let (mut sentences_seen, mut docs_seen) = (0.0, 0.0);
    let events = |sentences: &[Vec<u32>]| {
        let mut ev = Vec::new();
        for s in sentences {
            let mut prev = None;
            for &w in s {
                ev.push((context(prev), w as usize));
                prev = Some(w);
            }
            ev.push((context(prev), eos));
        }
        ev
    };
    for i in 0..6000 {
        let (_, sentences) = lang.generate(i);
        for (ctx, out) in events(&sentences) {
            counts.entry(ctx).or_insert_with(|| vec![0.01; l + 1])[out] += 1.0;
        }
        sentences_seen += sentences.len() as f64;
        docs_seen += 1.0;
    }
    let p_end = docs_seen / sentences_seen;
    let (mut nll, mut words) = (0.0, 0.0);
    for i in 0..2000 {
        let (_, sentences) = lang.generate(1_000_000 + i);
        for (ctx, out) in events(&sentences) {
            let row = &counts[&ctx];
            nll -= (row[out] / row.iter().sum::<f64>()).ln();
        }
        let s = sentences.len() as f64;
        nll -= p_end.ln() + (s - 1.0) * (1.0 - p_end).ln();
        words += sentences.iter().map(|s| s.len() as f64).sum::<f64>();
    }
    nll / words
}

#[test]
fn topic_inference_beats_bigrams_which_beat_unigrams() {
    let lang = SyntheticLanguage::new(0);
    let (mut truth, mut words) = (0.0, 0.0);
    for i in 0..2000 {
        let doc = lang.document(1_000_000 + i);
        truth -= lang.log_prob(&doc.text).unwrap();
        words += lang.parse(&doc.text).unwrap().concat().len() as f64;
    }
    let truth = truth / words;
    let l = lang.words.len();
    let bigram = baseline(&lang, |prev| prev.map_or(l, |w| w as usize));
    let unigram = baseline(&lang, |prev| usize::from(prev.is_none()));
    eprintln!("nats/word: true {truth:.3}, bigram {bigram:.3}, unigram {unigram:.3}");
    assert!(bigram > truth + 0.1, "bigram {bigram} vs true {truth}");
    assert!(
        unigram > bigram + 1.0,
        "unigram {unigram} vs bigram {bigram}"
    );
}
