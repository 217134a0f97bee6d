//! The data pipeline end to end: loading corpora from disk (and every way that can fail),
//! tokenizer training, round trips and persistence, token streams and the entropy floor.

use std::path::PathBuf;
use std::time::Instant;

use distill_kernels::data::{
    entropy_floor, train_batch, val_windows, Corpus, Document, Documents, Specials,
    SyntheticLanguage, TokenStream, Tokenizer, EOS_TOKEN,
};
use distill_kernels::train::TrainError as Error;

/// A fresh directory under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> TempDir {
        let dir = std::env::temp_dir().join(format!("distill-data-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    fn write(&self, rel: &str, bytes: impl AsRef<[u8]>) -> PathBuf {
        let p = self.0.join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, bytes).unwrap();
        p
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn docs(texts: &[&str]) -> Vec<Document> {
    texts
        .iter()
        .map(|t| Document {
            text: t.to_string(),
            source: "test".to_string(),
        })
        .collect()
}

fn message(e: Error) -> String {
    e.to_string()
}

// ---------------------------------------------------------------- corpus

#[test]
fn single_file_is_split_by_document() {
    let dir = TempDir::new("single");
    let text: String = (0..20)
        .map(|i| format!("doc {i} line one\nline two\n\n\n"))
        .collect();
    let path = dir.write("a.txt", text);
    let c = Corpus::load(&path, 0.25, 1).unwrap();
    assert_eq!((c.train.len(), c.val.len()), (15, 5));
    assert!(c
        .train
        .iter()
        .chain(&c.val)
        .all(|d| d.text.ends_with("\nline two")));
    assert!(c.val.iter().all(|d| d.source == path.display().to_string()));
    // Deterministic per seed, different across seeds, each side in file order.
    assert_eq!(c, Corpus::load(&path, 0.25, 1).unwrap());
    assert_ne!(c.val, Corpus::load(&path, 0.25, 2).unwrap().val);
    let index = |d: &Document| d.text.split(' ').nth(1).unwrap().parse::<u32>().unwrap();
    assert!(c.val.windows(2).all(|w| index(&w[0]) < index(&w[1])));
}

#[test]
fn documents_file_keeps_prose_whole_and_cuts_one_file_at_a_paragraph() {
    let dir = TempDir::new("docs-file");
    let paras: Vec<String> = (0..10)
        .map(|i| format!("Paragraph {i} goes on.\r\nAnd on."))
        .collect();
    let path = dir.write("book.txt", format!("\u{feff}{}\n", paras.join("\r\n\r\n")));
    let c = Corpus::load_with(&path, 0.2, 1, &Documents::File).unwrap();
    assert_eq!((c.train.len(), c.val.len()), (1, 1));
    // Paragraph breaks stay in the text; the cut is the break nearest 80% of the bytes.
    let whole: Vec<String> = paras.iter().map(|p| p.replace("\r\n", "\n")).collect();
    assert_eq!(c.train[0].text, whole[..8].join("\n\n"));
    assert_eq!(c.val[0].text, whole[8..].join("\n\n"));
    // A directory: one document per file, split by file.
    dir.write("more/b.txt", "Second book.\n\nStill the second.");
    let c = Corpus::load_with(&dir.0, 0.5, 1, &Documents::File).unwrap();
    assert_eq!(c.train.len() + c.val.len(), 2);
    assert!(c
        .train
        .iter()
        .chain(&c.val)
        .any(|d| d.text == "Second book.\n\nStill the second."));
    // One line cannot be cut.
    let one = dir.write("one/x.txt", "just one line");
    let e = message(Corpus::load_with(&one, 0.2, 1, &Documents::File).unwrap_err());
    assert!(e.contains("no line break to cut it at"), "{e}");
}

#[test]
fn documents_separator_and_parsing() {
    let dir = TempDir::new("docs-sep");
    let path = dir.write(
        "a.txt",
        "one\n\ntwo\n<|doc|>\nthree\n<|doc|><|doc|>\n  \n<|doc|>four",
    );
    let c = Corpus::load_with(&path, 0.25, 1, &Documents::Separator("<|doc|>".into())).unwrap();
    let mut all: Vec<String> = c
        .train
        .iter()
        .chain(&c.val)
        .map(|d| d.text.clone())
        .collect();
    all.sort();
    assert_eq!(all, ["four", "one\n\ntwo", "three"]);
    assert_eq!("file".parse::<Documents>(), Ok(Documents::File));
    assert_eq!(
        "blank-lines".parse::<Documents>(),
        Ok(Documents::BlankLines)
    );
    assert_eq!(
        "separator:---".parse::<Documents>(),
        Ok(Documents::Separator("---".into()))
    );
    for bad in ["separator:", "lines", ""] {
        assert!(bad
            .parse::<Documents>()
            .unwrap_err()
            .contains("expected file"));
    }
}

#[test]
fn stream_uses_the_models_eos_and_bos() {
    let corpus = Corpus::synthetic(0, 50, 5);
    let trained = Tokenizer::train(&corpus.train, 300).unwrap();
    let json = trained.to_json().unwrap();
    let sp = Specials {
        eos: 7,
        bos: Some(9),
        add_bos: true,
    };
    let tok = Tokenizer::from_json(&json, Some(sp)).unwrap();
    let d = docs(&["ab", "cd"]);
    let s = TokenStream::encode(&d, &tok).unwrap();
    let mut want = vec![9];
    want.extend(tok.encode("ab").unwrap());
    want.extend([7, 9]);
    want.extend(tok.encode("cd").unwrap());
    want.push(7);
    assert_eq!(s.tokens, want);
    let bad = Specials {
        eos: 300,
        bos: None,
        add_bos: false,
    };
    assert!(Tokenizer::from_json(&json, Some(bad))
        .unwrap_err()
        .contains("outside the vocabulary"));
    let no_bos = Specials {
        eos: 1,
        bos: None,
        add_bos: true,
    };
    assert!(Tokenizer::from_json(&json, Some(no_bos)).is_err());
}

#[test]
fn directory_is_split_by_file() {
    let dir = TempDir::new("dir");
    for i in 0..10 {
        dir.write(
            &format!("sub{}/f{i}.txt", i % 3),
            format!("file {i} a\n\nfile {i} b\n"),
        );
    }
    dir.write(".hidden.txt", "secret\n");
    dir.write(".git/config", "secret\n");
    dir.write("sub0/empty.txt", "  \n\n");
    let c = Corpus::load(&dir.0, 0.2, 7).unwrap();
    assert_eq!((c.train.len(), c.val.len()), (16, 4));
    let all: Vec<&Document> = c.train.iter().chain(&c.val).collect();
    assert!(all.iter().all(|d| !d.text.contains("secret")));
    // No file has documents on both sides.
    for d in &c.val {
        assert!(c.train.iter().all(|t| t.source != d.source));
    }
    // Sorted traversal: training documents come in path order.
    let sources: Vec<&String> = c.train.iter().map(|d| &d.source).collect();
    let mut sorted = sources.clone();
    sorted.sort();
    assert_eq!(sources, sorted);
}

#[test]
fn corpus_errors_name_the_culprit() {
    let dir = TempDir::new("errors");
    let missing = dir.0.join("nope.txt");
    let e = message(Corpus::load(&missing, 0.1, 0).unwrap_err());
    assert!(e.contains("nope.txt"), "{e}");

    let empty = dir.write("empty/e.txt", "\n \n");
    let e = message(Corpus::load(&empty, 0.1, 0).unwrap_err());
    assert!(e.contains("e.txt") && e.contains("no text"), "{e}");
    let e = message(Corpus::load(&dir.0.join("empty"), 0.1, 0).unwrap_err());
    assert!(e.contains("empty") && e.contains("no text"), "{e}");
    std::fs::create_dir_all(dir.0.join("void")).unwrap();
    let e = message(Corpus::load(&dir.0.join("void"), 0.1, 0).unwrap_err());
    assert!(e.contains("void"), "{e}");

    let one = dir.write("one.txt", "just one paragraph\nover two lines\n");
    let e = message(Corpus::load(&one, 0.1, 0).unwrap_err());
    assert!(
        e.contains("one.txt") && e.contains("too little text"),
        "{e}"
    );

    let bad = dir.write("bad/latin1.txt", b"caf\xc3\xa9 ok\n\nna\xefve\n");
    dir.write("bad/good.txt", "fine\n\nalso fine\n");
    let e = message(Corpus::load(&dir.0.join("bad"), 0.1, 0).unwrap_err());
    assert!(e.contains("latin1.txt") && e.contains("offset 12"), "{e}");
    let e = message(Corpus::load(&bad, 0.1, 0).unwrap_err());
    assert!(e.contains("offset 12") && e.contains("0xef"), "{e}");

    let e = Corpus::load(&one, 1.5, 0).unwrap_err();
    assert!(matches!(
        e,
        Error::InvalidOption {
            name: "val_fraction",
            ..
        }
    ));
}

#[test]
fn synthetic_corpus_is_disjoint_and_stable() {
    let a = Corpus::synthetic(3, 50, 10);
    let b = Corpus::synthetic(3, 80, 10);
    assert_eq!(a.val, b.val);
    assert_eq!(a.train[..], b.train[..50]);
    assert!(a
        .val
        .iter()
        .all(|v| a.train.iter().all(|t| t.source != v.source)));
    let lang = SyntheticLanguage::new(3);
    assert!(a
        .train
        .iter()
        .chain(&a.val)
        .all(|d| lang.log_prob(&d.text).is_some()));
    assert!(SyntheticLanguage::new(4).log_prob(&a.val[0].text).is_none());
}

// ---------------------------------------------------------------- tokenizer

const ROUND_TRIP: &[&str] = &[
    "",
    "plain ascii text.",
    "  leading and trailing spaces  ",
    "tabs\tand\r\nwindows line ends\n\n\n",
    "naïve café, Straße, Ελληνικά, 日本語のテキスト, emoji 🦀👩‍💻",
    "numbers 12345 and symbols <>&{}[]|~`^ \u{0} \u{7f} \u{feff}",
    "unseen: ŧħıŋğş ∮∯∰",
    "a literal <|endoftext|> inside",
];

#[test]
fn tokenizer_round_trips_any_text() {
    let corpus = Corpus::synthetic(0, 300, 0);
    let tok = Tokenizer::train(&corpus.train, 400).unwrap();
    assert_eq!(tok.vocab_size(), 400);
    assert_eq!(tok.encode(EOS_TOKEN).unwrap(), vec![tok.eos_id()]);
    for text in ROUND_TRIP
        .iter()
        .copied()
        .chain(corpus.train.iter().map(|d| d.text.as_str()))
    {
        let ids = tok.encode(text).unwrap();
        assert!(ids.iter().all(|&t| (t as usize) < tok.vocab_size()));
        assert_eq!(tok.decode(&ids).unwrap(), text);
    }
    // Merges were learned: the training text compresses well below a token per byte.
    let text = &corpus.train[0].text;
    assert!(tok.encode(text).unwrap().len() * 2 < text.len());
    let e = tok.decode(&[1, 400]).unwrap_err();
    assert_eq!(
        e,
        Error::TokenOutOfRange {
            position: 1,
            token: 400,
            vocab: 400
        }
    );
}

#[test]
fn tokenizer_training_is_deterministic_and_persists() {
    let dir = TempDir::new("tok");
    let corpus = Corpus::synthetic(1, 400, 0);
    let (a, b) = (dir.0.join("a.json"), dir.0.join("b.json"));
    Tokenizer::train(&corpus.train, 512)
        .unwrap()
        .save(&a)
        .unwrap();
    Tokenizer::train(&corpus.train, 512)
        .unwrap()
        .save(&b)
        .unwrap();
    let bytes = std::fs::read(&a).unwrap();
    assert_eq!(bytes, std::fs::read(&b).unwrap());
    let json: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
    assert_eq!(json["model"]["type"], "BPE");
    assert_eq!(json["pre_tokenizer"]["type"], "ByteLevel");
    assert_eq!(json["decoder"]["type"], "ByteLevel");
    assert_eq!(json["added_tokens"][0]["content"], EOS_TOKEN);
    assert_eq!(json["added_tokens"][0]["special"], true);

    let tok = Tokenizer::train(&corpus.train, 512).unwrap();
    let loaded = Tokenizer::load(&a).unwrap();
    assert_eq!(loaded.vocab_size(), tok.vocab_size());
    assert_eq!(loaded.eos_id(), tok.eos_id());
    for d in corpus.train.iter().take(20) {
        assert_eq!(
            loaded.encode(&d.text).unwrap(),
            tok.encode(&d.text).unwrap()
        );
    }
    // A different corpus gives a different tokenizer (the test above can fail).
    let other = Tokenizer::train(&Corpus::synthetic(2, 400, 0).train, 512).unwrap();
    other.save(&b).unwrap();
    assert_ne!(bytes, std::fs::read(&b).unwrap());
}

#[test]
fn tokenizer_errors() {
    let dir = TempDir::new("tokerr");
    let d = docs(&["some text", "more text"]);
    for v in [0, 256, 1 << 21] {
        assert!(matches!(
            Tokenizer::train(&d, v),
            Err(Error::InvalidOption {
                name: "vocab_size",
                ..
            })
        ));
    }
    assert!(Tokenizer::train(&[], 300).is_err());
    // A tiny corpus cannot fill a large vocabulary: the real size is reported.
    let small = Tokenizer::train(&d, 5000).unwrap();
    assert!(small.vocab_size() > 257 && small.vocab_size() < 5000);

    let missing = dir.0.join("missing.json");
    let e = message(Tokenizer::load(&missing).err().unwrap());
    assert!(e.contains("missing.json"), "{e}");
    let corrupt = dir.write("corrupt.json", "{\"model\": 3");
    let e = message(Tokenizer::load(&corrupt).err().unwrap());
    assert!(e.contains("corrupt.json"), "{e}");
    // Valid JSON tokenizer without the EOS token.
    let tok = Tokenizer::train(&d, 300).unwrap();
    tok.save(&dir.0.join("ok.json")).unwrap();
    let text = std::fs::read_to_string(dir.0.join("ok.json")).unwrap();
    let no_eos = dir.write("no_eos.json", text.replace(EOS_TOKEN, "<|other|>"));
    let e = message(Tokenizer::load(&no_eos).err().unwrap());
    assert!(e.contains("no_eos.json") && e.contains(EOS_TOKEN), "{e}");
    let e = tok.save(&dir.0.join("no/such/dir/t.json")).unwrap_err();
    assert!(message(e).contains("t.json"));
}

// ---------------------------------------------------------------- streams, batches, floor

#[test]
fn stream_is_documents_then_eos_in_order() {
    let corpus = Corpus::synthetic(0, 200, 0);
    let tok = Tokenizer::train(&corpus.train, 300).unwrap();
    let stream = TokenStream::encode(&corpus.train, &tok).unwrap();
    assert_eq!(stream.docs, 200);
    let eos = tok.eos_id();
    assert_eq!(stream.tokens.iter().filter(|&&t| t == eos).count(), 200);
    let pieces: Vec<String> = stream
        .tokens
        .split(|&t| t == eos)
        .take(200)
        .map(|ids| tok.decode(ids).unwrap())
        .collect();
    let texts: Vec<String> = corpus.train.iter().map(|d| d.text.clone()).collect();
    assert_eq!(pieces, texts);
    assert_eq!(*stream.tokens.last().unwrap(), eos);

    let (x, y) = train_batch(&stream, 5, 3, 4, 64).unwrap();
    assert_eq!((x.len(), y.len()), (256, 256));
    assert_eq!(x[1..64], y[..63]);
    let windows = val_windows(&stream, 64);
    assert_eq!(windows.len(), (stream.tokens.len() - 1) / 64);
}

#[test]
fn entropy_floor_of_the_synthetic_language() {
    let seed = 0;
    let corpus = Corpus::synthetic(seed, 4000, 300);
    let start = Instant::now();
    let tok = Tokenizer::train(&corpus.train, 512).unwrap();
    let train_time = start.elapsed();
    let bytes: usize = corpus.train.iter().map(|d| d.text.len()).sum();
    let lang = SyntheticLanguage::new(seed);
    let floor = entropy_floor(&lang, &corpus.val, &tok).unwrap();
    let stream = TokenStream::encode(&corpus.val, &tok).unwrap();
    let info: f64 = corpus
        .val
        .iter()
        .map(|d| -lang.log_prob(&d.text).unwrap())
        .sum();
    assert!((floor - info / stream.tokens.len() as f64).abs() < 1e-12);
    let words: usize = corpus.val.iter().map(|d| d.text.split(' ').count()).sum();
    eprintln!(
        "tokenizer: 4000 docs ({:.2} MB) trained in {:.2} s; val: {:.2} tokens/word, \
         {:.3} nats/word, floor {floor:.4} nats/token",
        bytes as f64 / 1e6,
        train_time.as_secs_f64(),
        stream.tokens.len() as f64 / words as f64,
        info / words as f64,
    );
    assert!(floor > 0.3 && floor < 1.5, "{floor}");

    // A document from elsewhere is an error naming it.
    let mut val = corpus.val.clone();
    val.push(Document {
        text: "Not in the language.".to_string(),
        source: "intruder.txt".to_string(),
    });
    let e = message(entropy_floor(&lang, &val, &tok).unwrap_err());
    assert!(e.contains("intruder.txt"), "{e}");
}
