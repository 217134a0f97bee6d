//! Text corpora from disk, split into training and validation sets.

use std::fs;
use std::path::{Path, PathBuf};

use crate::rng::SplitMix64;
use crate::train::error::{Result, TrainError as Error};
use crate::train::memory::{human_bytes, MemoryPlan};

/// One unit of text. Documents are independent: the token stream separates them with EOS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Document {
    /// The text, its lines joined by `\n`; never empty or whitespace-only when read from a file.
    pub text: String,
    /// Where the text came from: a file path, or `synthetic:<i>` for the embedded language.
    pub source: String,
}

/// A training and a validation split, each in a deterministic order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Corpus {
    /// Training documents; never empty after [`Corpus::load`].
    pub train: Vec<Document>,
    /// Validation documents; never empty after [`Corpus::load`], and disjoint from `train` by file
    /// when several files hold text.
    pub val: Vec<Document>,
}

/// Salt so that the split's stream differs from other uses of the same user seed.
const SPLIT_SALT: u64 = 0x5fa1_7c0d_e5ee_d001;

/// Where one document ends and the next begins. The token stream puts the model's EOS after
/// every document, so this decides where the model is taught that a text ends.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Documents {
    /// Each file is one document: running prose keeps its paragraph breaks as text, and no EOS
    /// is invented inside it. The command line's default, because a blank line in a book is
    /// not the end of a text (a pretrained teacher finds an EOS there improbable, and would
    /// teach that); [`Corpus::load`] keeps [`Documents::BlankLines`], as before this option
    /// existed. A single file is cut at the paragraph break nearest the validation fraction,
    /// its end going to validation.
    #[default]
    File,
    /// Paragraphs separated by blank lines are documents (corpora of short, unrelated texts).
    BlankLines,
    /// Documents are separated by this exact string (e.g. `<|doc|>` or a line of `---`);
    /// whitespace around each document is dropped.
    Separator(String),
}

impl std::str::FromStr for Documents {
    type Err = String;

    /// `file`, `blank-lines` or `separator:STR`.
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "file" => Ok(Documents::File),
            "blank-lines" => Ok(Documents::BlankLines),
            _ => match s.strip_prefix("separator:") {
                Some(sep) if !sep.is_empty() => Ok(Documents::Separator(sep.to_string())),
                _ => Err(format!(
                    "{s:?}: expected file, blank-lines or separator:STR (STR not empty)"
                )),
            },
        }
    }
}

impl Corpus {
    /// [`Corpus::load_with`] with documents separated by blank lines ([`Documents::BlankLines`]).
    pub fn load(path: &Path, val_fraction: f64, seed: u64) -> Result<Corpus> {
        Self::load_with(path, val_fraction, seed, &Documents::BlankLines)
    }

    /// Every document under `path` in order, unsplit (what evaluating a whole text reads); the
    /// same files and documents as [`Corpus::load_with`].
    pub fn documents(path: &Path, documents: &Documents) -> Result<Vec<Document>> {
        Ok(read_files(path, documents)?.concat())
    }

    /// PATH is a UTF-8 text file or a directory of them (searched recursively in sorted order;
    /// hidden entries, whose name starts with `.`, are skipped, and so are whitespace-only files
    /// inside a directory). `documents` says where documents end.
    ///
    /// With two or more files holding text, whole files go to one side, so that no file's
    /// phrasing leaks from training into validation; with one file, whole documents do.
    /// About `val_fraction` of the files (or documents) go to validation, at least one and
    /// never all. The choice depends only on `seed` and the sorted list of inputs; each side
    /// keeps the input order.
    pub fn load_with(
        path: &Path,
        val_fraction: f64,
        seed: u64,
        documents: &Documents,
    ) -> Result<Corpus> {
        check_fraction(val_fraction)?;
        let mut units = read_files(path, documents)?;
        if units.len() == 1 && *documents == Documents::File {
            let doc = units.pop().unwrap_or_default().pop();
            return cut_file(path, doc, val_fraction);
        }
        if units.len() == 1 {
            let docs = units.pop().unwrap_or_default();
            if docs.len() < 2 {
                return Err(Error::Data(format!(
                    "{}: too little text to split into training and validation: one document \
                     (see --documents; at least 2 are needed)",
                    path.display()
                )));
            }
            units = docs.into_iter().map(|d| vec![d]).collect();
        }
        Ok(split_units(units, val_fraction, seed))
    }
}

impl Corpus {
    /// SHA-256 of every document's text, training split then validation split, each prefixed
    /// by its length; as `sha256:` and the first 16 hex digits. Stored with each checkpoint, so
    /// that a resume on other data (or another split of it) is noticed.
    pub fn fingerprint(&self) -> String {
        use sha2::{Digest, Sha256};
        let mut h = Sha256::new();
        for (split, docs) in [(b"train", &self.train), (b"val\0\0", &self.val)] {
            h.update(split);
            h.update((docs.len() as u64).to_le_bytes());
            for d in docs {
                h.update((d.text.len() as u64).to_le_bytes());
                h.update(d.text.as_bytes());
            }
        }
        let digest = h.finalize();
        let hex: String = digest[..8].iter().map(|b| format!("{b:02x}")).collect();
        format!("sha256:{hex}")
    }
}

/// Reading, splitting and tokenizing text holds about four times its size at once (the bytes,
/// the documents, the token streams); data that cannot is refused before it is read.
fn check_data_size(path: &Path, files: &[PathBuf]) -> Result<()> {
    let mut bytes = 0u64;
    for f in files {
        bytes = bytes.saturating_add(fs::metadata(f).map_err(|e| io_error(f, e))?.len());
    }
    let mut plan = MemoryPlan::new();
    plan.add("text, documents and tokens", usize::try_from(bytes).ok(), 4);
    plan.check(&format!(
        "reading {} ({} files, {})",
        path.display(),
        files.len(),
        human_bytes(bytes as u128)
    ))
}

fn check_fraction(val_fraction: f64) -> Result<()> {
    if val_fraction.is_finite() && val_fraction > 0.0 && val_fraction < 1.0 {
        Ok(())
    } else {
        Err(Error::InvalidOption {
            name: "val_fraction",
            value: val_fraction.to_string(),
            reason: "must be strictly between 0 and 1",
        })
    }
}

/// Sends about `val_fraction` of the units (at least one, never all; there are >= 2) to
/// validation.
fn split_units(units: Vec<Vec<Document>>, val_fraction: f64, seed: u64) -> Corpus {
    let n = units.len();
    let k = ((n as f64 * val_fraction).round() as usize).clamp(1, n - 1);
    let mut is_val = vec![false; n];
    for i in SplitMix64::from_parts(&[SPLIT_SALT, seed]).choose(n, k) {
        is_val[i] = true;
    }
    let mut corpus = Corpus {
        train: Vec::new(),
        val: Vec::new(),
    };
    for (unit, val) in units.into_iter().zip(is_val) {
        let side = if val {
            &mut corpus.val
        } else {
            &mut corpus.train
        };
        side.extend(unit);
    }
    corpus
}

fn io_error(path: &Path, e: std::io::Error) -> Error {
    Error::Io {
        path: path.display().to_string(),
        message: e.to_string(),
    }
}

/// The text files under `path`, in sorted order.
fn list_files(path: &Path) -> Result<Vec<PathBuf>> {
    let meta = fs::metadata(path).map_err(|e| io_error(path, e))?;
    if meta.is_file() {
        return Ok(vec![path.to_path_buf()]);
    }
    if !meta.is_dir() {
        return Err(Error::Data(format!(
            "{}: neither a file nor a directory",
            path.display()
        )));
    }
    let mut files = Vec::new();
    walk(path, &mut files)?;
    if files.is_empty() {
        return Err(Error::Data(format!(
            "{}: directory holds no (non-hidden) files",
            path.display()
        )));
    }
    Ok(files)
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    let mut entries = Vec::new();
    for entry in fs::read_dir(dir).map_err(|e| io_error(dir, e))? {
        let entry = entry.map_err(|e| io_error(dir, e))?;
        if !entry.file_name().to_string_lossy().starts_with('.') {
            entries.push(entry.path());
        }
    }
    entries.sort();
    for p in entries {
        // symlink_metadata: a linked directory is not followed, so link cycles cannot loop.
        let meta = fs::symlink_metadata(&p).map_err(|e| io_error(&p, e))?;
        if meta.is_dir() {
            walk(&p, out)?;
        } else if fs::metadata(&p).map(|m| m.is_file()).unwrap_or(false) {
            out.push(p);
        }
    }
    Ok(())
}

/// The file's documents, or an error naming the first byte that is not UTF-8.
/// The documents of each file under `path` that holds text, in order; an error when none does.
fn read_files(path: &Path, documents: &Documents) -> Result<Vec<Vec<Document>>> {
    let files = list_files(path)?;
    check_data_size(path, &files)?;
    let mut units: Vec<Vec<Document>> = Vec::new();
    for file in &files {
        let docs = read_documents(file, documents)?;
        if !docs.is_empty() {
            units.push(docs);
        }
    }
    if units.is_empty() {
        let what = if path.is_dir() {
            "directory holds no text files"
        } else {
            "file holds no text"
        };
        return Err(Error::Data(format!("{}: {what}", path.display())));
    }
    Ok(units)
}

/// One file's single document cut in two at the paragraph break (else line break) nearest to
/// leaving `val_fraction` of its bytes for validation.
fn cut_file(path: &Path, doc: Option<Document>, val_fraction: f64) -> Result<Corpus> {
    let too_little = || {
        Error::Data(format!(
            "{}: too little text to split into training and validation: the file has no line \
             break to cut it at",
            path.display()
        ))
    };
    let doc = doc.ok_or_else(too_little)?;
    let text = &doc.text;
    let target = ((1.0 - val_fraction) * text.len() as f64) as usize;
    let nearest = |pat: &str| {
        text.match_indices(pat)
            .map(|(i, _)| i)
            .filter(|&i| !text[..i].trim().is_empty() && !text[i..].trim().is_empty())
            .min_by_key(|&i| i.abs_diff(target))
    };
    let at = nearest("\n\n")
        .or_else(|| nearest("\n"))
        .ok_or_else(too_little)?;
    let part = |t: &str| Document {
        text: t.trim_matches('\n').to_string(),
        source: doc.source.clone(),
    };
    Ok(Corpus {
        train: vec![part(&text[..at])],
        val: vec![part(&text[at..])],
    })
}

fn read_documents(path: &Path, documents: &Documents) -> Result<Vec<Document>> {
    let bytes = fs::read(path).map_err(|e| io_error(path, e))?;
    let text = std::str::from_utf8(&bytes).map_err(|e| Error::File {
        path: path.display().to_string(),
        message: format!(
            "not UTF-8 text: invalid byte 0x{:02x} at byte offset {}",
            bytes[e.valid_up_to()],
            e.valid_up_to()
        ),
    })?;
    let source = path.display().to_string();
    let texts = match documents {
        Documents::BlankLines => split_documents(text),
        Documents::File => {
            let t = normalize(text);
            match t.trim().is_empty() {
                true => Vec::new(),
                false => vec![t.trim_end().to_string()],
            }
        }
        Documents::Separator(sep) => normalize(text)
            .split(sep.as_str())
            .map(str::trim)
            .filter(|d| !d.is_empty())
            .map(str::to_string)
            .collect(),
    };
    Ok(texts
        .into_iter()
        .map(|text| Document {
            text,
            source: source.clone(),
        })
        .collect())
}

/// The text with `\r\n` line ends as `\n` and no leading byte-order mark.
fn normalize(text: &str) -> String {
    text.strip_prefix('\u{feff}')
        .unwrap_or(text)
        .replace("\r\n", "\n")
}

/// Paragraphs separated by blank (or whitespace-only) lines; line ends are normalized to `\n`
/// and a leading byte-order mark is dropped, since neither is content.
pub(crate) fn split_documents(text: &str) -> Vec<String> {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let mut docs = Vec::new();
    let mut current: Vec<&str> = Vec::new();
    for line in text.lines() {
        if line.trim().is_empty() {
            if !current.is_empty() {
                docs.push(current.join("\n"));
                current.clear();
            }
        } else {
            current.push(line);
        }
    }
    if !current.is_empty() {
        docs.push(current.join("\n"));
    }
    docs
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn documents_split_on_blank_lines() {
        let docs = split_documents("\u{feff}a b\r\nc\n\n \t\n\nd\n\n\ne\n");
        assert_eq!(docs, vec!["a b\nc", "d", "e"]);
        assert!(split_documents(" \n\n\t").is_empty());
    }

    #[test]
    fn fraction_is_checked() {
        for f in [0.0, 1.0, -0.5, f64::NAN, f64::INFINITY] {
            assert!(matches!(
                check_fraction(f),
                Err(Error::InvalidOption {
                    name: "val_fraction",
                    ..
                })
            ));
        }
        assert!(check_fraction(0.1).is_ok());
    }

    #[test]
    fn split_keeps_both_sides_nonempty() {
        let unit = |i: usize| {
            vec![Document {
                text: i.to_string(),
                source: String::new(),
            }]
        };
        for n in 2..20 {
            for f in [0.001, 0.1, 0.5, 0.999] {
                let c = split_units((0..n).map(unit).collect(), f, 9);
                assert!(!c.train.is_empty() && !c.val.is_empty(), "n={n} f={f}");
                assert_eq!(c.train.len() + c.val.len(), n);
            }
        }
        let c = split_units((0..100).map(unit).collect(), 0.1, 9);
        assert_eq!(c.val.len(), 10);
    }
}
