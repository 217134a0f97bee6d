//! A training run's output directory: an exclusive lock, checkpoints as generations, and the
//! recovery that makes an interrupted run, save or `--force` lose nothing complete.
//!
//! ```text
//! OUT/
//!   .lock                         advisory lock (flock) held for the run's life; the holder's pid
//!   checkpoints/step-00000200/    a complete checkpoint: config.json, tokenizer.json,
//!   checkpoints/step-00000300/    model.safetensors, trainer_state.safetensors
//!   config.json                   copies of the newest generation's files, for tools that
//!   model.safetensors             read a Hugging Face directory (transformers, `distill eval`,
//!   tokenizer.json                `distill distill --teacher OUT`)
//!   tokenizer_config.json, generation_config.json
//!   metrics.json, loss.png        written when the run ends
//! ```
//!
//! **Generations.** A save writes a whole checkpoint into `checkpoints/.step-N.PID.tmp/`, fsyncs
//! every file and the directory, and makes it current with one rename to `step-N` (then fsyncs
//! `checkpoints/`). A directory named `step-N` is therefore always complete; a crash or a full
//! disk at any point leaves the previous generations as they were. Only then are the top-level
//! copies replaced (each atomically) and generations beyond the newest `keep` removed (each
//! renamed to a temporary name first, so a half-deleted generation never looks complete).
//!
//! **Lock.** [`RunDir::open`] takes `flock(LOCK_EX | LOCK_NB)` on `.lock`; a second run is
//! refused with the holder's pid. The kernel drops the lock when its process dies, so a lock
//! left by a killed run is simply taken over.
//!
//! **Recovery** (on every open, under the lock): temporaries of other processes are removed; a
//! run that `--force` had moved aside (`.replaced/`) is either removed, if the new run has
//! completed a generation since, or put back; top-level copies older than the newest generation
//! (a kill between the rename and the copies) are replaced.

use std::fs::File;
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};

use crate::train::checkpoint::{
    CONFIG_FILE, GENERATION_CONFIG_FILE, TOKENIZER_CONFIG_FILE, TOKENIZER_FILE, TRAINER_STATE_FILE,
    WEIGHTS_FILE,
};
use crate::train::error::{Result, TrainError as Error};
use crate::train::files::{
    remove_stale_temps, sync_dir, sync_dir_for_recovery, sync_file, temp_path, CleanupGuard,
    StaleRule,
};

/// The directory of the generations.
pub const CHECKPOINTS_DIR: &str = "checkpoints";
/// The lock file.
pub const LOCK_FILE: &str = ".lock";
/// Where `--force` keeps the previous run until the new one has a complete generation.
pub const REPLACED_DIR: &str = ".replaced";
/// The newest generation's files that are copied to the top of the run directory.
pub const EXPORTED_FILES: [&str; 5] = [
    CONFIG_FILE,
    TOKENIZER_FILE,
    TOKENIZER_CONFIG_FILE,
    GENERATION_CONFIG_FILE,
    WEIGHTS_FILE,
];
/// Written when a run ends, next to the copies.
pub const REPORT_FILES: [&str; 2] = ["metrics.json", "loss.png"];

/// The entries of a run directory that belong to its run (what `--force` replaces; anything else
/// is left alone). `checkpoints/` goes first so that an interrupted move is still recoverable.
const RUN_ENTRIES: [&str; 9] = [
    CHECKPOINTS_DIR,
    CONFIG_FILE,
    TOKENIZER_FILE,
    TOKENIZER_CONFIG_FILE,
    GENERATION_CONFIG_FILE,
    WEIGHTS_FILE,
    TRAINER_STATE_FILE, // the layout before generations kept the state at the top
    "metrics.json",
    "loss.png",
];

/// One complete checkpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Generation {
    /// The optimizer step it was saved at; `None` for a checkpoint of the layout before
    /// generations (files at the top of the run directory), whose step is in its files.
    pub step: Option<u64>,
    /// Its directory.
    pub path: PathBuf,
}

impl Generation {
    /// `checkpoints/step-00000200` (relative to the run directory) or `the top level`.
    pub fn describe(&self) -> String {
        match self.step {
            Some(s) => format!("{CHECKPOINTS_DIR}/{}", generation_name(s)),
            None => "the checkpoint at the top of the directory (layout before generations)".into(),
        }
    }
}

/// `step-00000200`.
pub fn generation_name(step: u64) -> String {
    format!("step-{step:08}")
}

fn parse_generation_name(name: &str) -> Option<u64> {
    let digits = name.strip_prefix("step-")?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

fn io_err(path: &Path, e: impl std::fmt::Display) -> Error {
    Error::Io {
        path: path.display().to_string(),
        message: e.to_string(),
    }
}

fn read_dir_names(dir: &Path) -> Result<Vec<String>> {
    let rd = match std::fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io_err(dir, e)),
    };
    let mut names = Vec::new();
    for entry in rd {
        let entry = entry.map_err(|e| io_err(dir, e))?;
        names.push(entry.file_name().to_string_lossy().into_owned());
    }
    Ok(names)
}

/// The complete generations under `run`, newest first; a checkpoint of the old layout (files at
/// the top) comes last. Reads only: usable without the lock.
pub fn generations(run: &Path) -> Result<Vec<Generation>> {
    let dir = run.join(CHECKPOINTS_DIR);
    let mut gens: Vec<Generation> = read_dir_names(&dir)?
        .into_iter()
        .filter_map(|name| {
            let step = parse_generation_name(&name)?;
            let path = dir.join(&name);
            path.join(TRAINER_STATE_FILE)
                .is_file()
                .then_some(Generation {
                    step: Some(step),
                    path,
                })
        })
        .collect();
    gens.sort_by_key(|g| std::cmp::Reverse(g.step));
    if run.join(TRAINER_STATE_FILE).is_file() {
        gens.push(Generation {
            step: None,
            path: run.to_path_buf(),
        });
    }
    Ok(gens)
}

/// Whether `run` holds anything of a run: a generation, a run file, or a run that an interrupted
/// `--force` moved aside. The lock file and temporaries do not count.
pub fn holds_run(run: &Path) -> Result<bool> {
    for name in read_dir_names(run)? {
        if name == LOCK_FILE || crate::train::files::parse_temp_name(&name).is_some() {
            continue;
        }
        if name == CHECKPOINTS_DIR {
            let inner = read_dir_names(&run.join(CHECKPOINTS_DIR))?;
            if inner
                .iter()
                .all(|n| crate::train::files::parse_temp_name(n).is_some())
            {
                continue; // empty, or only temporaries of an unfinished first save
            }
        }
        return Ok(true);
    }
    Ok(false)
}

/// The generations a resume can choose from: the run's own, or (after an interrupted `--force`,
/// before the next run put it back) those of the run moved aside. Reads only.
pub fn resumable_generations(run: &Path) -> Result<Vec<Generation>> {
    let own = generations(run)?;
    if !own.is_empty() {
        return Ok(own);
    }
    generations(&run.join(REPLACED_DIR))
}

/// The pid recorded in `run`'s lock file if another process holds the lock now. Reads only.
pub fn lock_holder(run: &Path) -> Option<String> {
    let mut file = File::open(run.join(LOCK_FILE)).ok()?;
    if try_lock(&file).ok()? {
        return None; // free; dropping the file releases it again
    }
    Some(read_pid(&mut file))
}

fn read_pid(file: &mut File) -> String {
    let mut text = String::new();
    let _ = file.rewind();
    let _ = file.read_to_string(&mut text);
    match text.trim() {
        "" => "unknown".into(),
        pid => pid.into(),
    }
}

/// `Ok(true)` when the exclusive lock was taken, `Ok(false)` when another process holds it.
#[cfg(unix)]
fn try_lock(file: &File) -> std::io::Result<bool> {
    use std::os::unix::io::AsRawFd;
    // SAFETY: flock on a file descriptor we own; no memory is shared with the kernel.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc == 0 {
        return Ok(true);
    }
    let e = std::io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::EWOULDBLOCK) => Ok(false),
        _ => Err(e),
    }
}

#[cfg(not(unix))]
fn try_lock(_file: &File) -> std::io::Result<bool> {
    Ok(true)
}

/// Renames `path` to a temporary name of this process and removes it there: a crash mid-way
/// leaves a temporary (removed by the next run), never a half-deleted entry under its own name.
fn remove_via_temp(path: &Path) -> Result<()> {
    let tmp = temp_path(path).ok_or_else(|| io_err(path, "names no file"))?;
    std::fs::rename(path, &tmp).map_err(|e| io_err(path, e))?;
    sync_dir(&crate::train::files::parent_dir(path)).map_err(|e| io_err(path, e))?;
    crate::train::files::remove_entry(&tmp).map_err(|e| io_err(&tmp, e))
}

/// An open, locked run directory.
pub struct RunDir {
    path: PathBuf,
    _lock: File,
    /// Set while a run moved aside by `--force` waits for this run's first generation; if the
    /// process is interrupted before, the guard puts it back.
    replaced: Option<CleanupGuard>,
}

impl RunDir {
    /// Creates `path` if needed, takes its lock, removes other processes' temporaries and
    /// finishes what an interrupted `--force` left (see the module documentation). `note`
    /// receives a line for every repair.
    pub fn open(path: &Path, note: &mut dyn FnMut(String)) -> Result<RunDir> {
        std::fs::create_dir_all(path).map_err(|e| io_err(path, e))?;
        let lock_path = path.join(LOCK_FILE);
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&lock_path)
            .map_err(|e| io_err(&lock_path, e))?;
        if !try_lock(&file).map_err(|e| io_err(&lock_path, e))? {
            return Err(Error::RunDirInUse {
                path: path.display().to_string(),
                pid: read_pid(&mut file),
            });
        }
        file.set_len(0)
            .and_then(|()| file.rewind())
            .and_then(|()| writeln!(file, "{}", std::process::id()))
            .map_err(|e| io_err(&lock_path, e))?;
        let dir = RunDir {
            path: path.to_path_buf(),
            _lock: file,
            replaced: None,
        };
        for d in [path.to_path_buf(), path.join(CHECKPOINTS_DIR)] {
            for t in remove_stale_temps(&d, None, StaleRule::OtherProcesses)? {
                note(format!(
                    "removed {}, left by an interrupted run",
                    t.display()
                ));
            }
        }
        dir.recover_replaced(note)?;
        dir.refresh_exports(note)?;
        Ok(dir)
    }

    /// A run killed between making a generation current and copying its files to the top
    /// leaves older copies there; they are brought up to the newest generation.
    fn refresh_exports(&self, note: &mut dyn FnMut(String)) -> Result<()> {
        let Some(newest) = self.generations()?.into_iter().find(|g| g.step.is_some()) else {
            return Ok(());
        };
        let same = |name: &str| -> bool {
            let (a, b) = (newest.path.join(name), self.path.join(name));
            match (std::fs::metadata(&a), std::fs::metadata(&b)) {
                (Ok(ma), Ok(mb)) if ma.len() == mb.len() => {
                    matches!((std::fs::read(&a), std::fs::read(&b)), (Ok(x), Ok(y)) if x == y)
                }
                (Err(_), _) => true, // nothing to copy
                _ => false,
            }
        };
        if EXPORTED_FILES.iter().all(|n| same(n)) {
            return Ok(());
        }
        self.copy_exports(&newest.path)?;
        note(format!(
            "refreshed the files at the top of {} from {}, which an interrupted save had left older",
            self.path.display(),
            newest.describe()
        ));
        Ok(())
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The complete generations, newest first.
    pub fn generations(&self) -> Result<Vec<Generation>> {
        generations(&self.path)
    }

    fn recover_replaced(&self, note: &mut dyn FnMut(String)) -> Result<()> {
        let aside = self.path.join(REPLACED_DIR);
        if !aside.is_dir() {
            return Ok(());
        }
        if self.generations()?.iter().any(|g| g.step.is_some()) {
            remove_via_temp(&aside)?;
            note(format!(
                "removed {}: the run that replaced it had completed a checkpoint",
                aside.display()
            ));
            return Ok(());
        }
        restore(&self.path)?;
        note(format!(
            "put back the run in {} that an interrupted --force was replacing",
            self.path.display()
        ));
        Ok(())
    }

    /// `--force`: moves the run files into `.replaced/`, to be removed once this run completes a
    /// generation ([`RunDir::save_generation`]) and put back if it fails or is interrupted first.
    pub fn move_aside(&mut self) -> Result<()> {
        let aside = self.path.join(REPLACED_DIR);
        std::fs::create_dir(&aside).map_err(|e| io_err(&aside, e))?;
        for name in RUN_ENTRIES {
            let from = self.path.join(name);
            if std::fs::symlink_metadata(&from).is_ok() {
                std::fs::rename(&from, aside.join(name)).map_err(|e| io_err(&from, e))?;
            }
        }
        sync_dir(&aside)
            .and_then(|()| sync_dir(&self.path))
            .map_err(|e| io_err(&self.path, e))?;
        let run = self.path.clone();
        self.replaced = Some(CleanupGuard::new(move || {
            let _ = restore(&run);
        }));
        Ok(())
    }

    /// Puts back a run moved aside by [`RunDir::move_aside`] (this run failed before its first
    /// generation); `true` if there was one.
    pub fn restore_replaced(&mut self) -> Result<bool> {
        match self.replaced.take() {
            Some(guard) => {
                guard.disarm();
                restore(&self.path)?;
                Ok(true)
            }
            None => Ok(false),
        }
    }

    /// Saves one generation: `write` fills a fresh temporary directory, which becomes
    /// `checkpoints/step-N` with one rename; then the top-level copies are replaced, a run moved
    /// aside by `--force` is removed, and generations beyond the newest `keep` are removed.
    pub fn save_generation(
        &mut self,
        step: u64,
        keep: usize,
        write: impl FnOnce(&Path) -> Result<()>,
    ) -> Result<Generation> {
        let ckpts = self.path.join(CHECKPOINTS_DIR);
        if !ckpts.is_dir() {
            std::fs::create_dir(&ckpts)
                .and_then(|()| sync_dir(&self.path))
                .map_err(|e| io_err(&ckpts, e))?;
        }
        let name = generation_name(step);
        let target = ckpts.join(&name);
        let tmp = temp_path(&target).ok_or_else(|| io_err(&target, "names no directory"))?;
        let guard = CleanupGuard::remove_on_abort(&tmp);
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp).map_err(|e| io_err(&tmp, e))?;
        }
        std::fs::create_dir(&tmp).map_err(|e| io_err(&tmp, e))?;
        write(&tmp)?;
        sync_dir(&tmp).map_err(|e| io_err(&tmp, e))?;
        if target.exists() {
            // Only when resuming fell back past a damaged generation of this step.
            remove_via_temp(&target)?;
        }
        std::fs::rename(&tmp, &target)
            .and_then(|()| sync_dir(&ckpts))
            .map_err(|e| io_err(&target, e))?;
        guard.disarm();
        // From here on this run has a complete generation: the run it replaces can go.
        if let Some(g) = self.replaced.take() {
            g.disarm();
            remove_via_temp(&self.path.join(REPLACED_DIR))?;
        }
        self.copy_exports(&target)?;
        let legacy = self.path.join(TRAINER_STATE_FILE);
        if legacy.is_file() {
            remove_via_temp(&legacy)?;
        }
        for old in self.generations()?.iter().skip(keep.max(1)) {
            remove_via_temp(&old.path)?;
        }
        Ok(Generation {
            step: Some(step),
            path: target,
        })
    }

    /// Replaces each top-level export with a copy of the generation's file, atomically per
    /// file. Copies, not hard links: a tool that rewrites `OUT/model.safetensors` in place (as
    /// `save_pretrained` does) must not change a checkpoint behind the trainer's back.
    fn copy_exports(&self, generation: &Path) -> Result<()> {
        for name in EXPORTED_FILES {
            let src = generation.join(name);
            if !src.is_file() {
                continue;
            }
            let dst = self.path.join(name);
            let tmp = temp_path(&dst).ok_or_else(|| io_err(&dst, "names no file"))?;
            let guard = CleanupGuard::remove_on_abort(&tmp);
            std::fs::copy(&src, &tmp)
                .and_then(|_| sync_file(&File::open(&tmp)?))
                .and_then(|()| std::fs::rename(&tmp, &dst))
                .map_err(|e| io_err(&dst, e))?;
            guard.disarm();
        }
        sync_dir(&self.path).map_err(|e| io_err(&self.path, e))
    }
}

/// Moves the entries of `.replaced/` back into the run directory, `checkpoints/` last (an empty
/// `checkpoints/` of the failed run is removed first), and removes `.replaced/`.
fn restore(run: &Path) -> Result<()> {
    let aside = run.join(REPLACED_DIR);
    if !aside.is_dir() {
        return Ok(());
    }
    let mut names = read_dir_names(&aside)?;
    names.sort_by_key(|n| n == CHECKPOINTS_DIR);
    for name in names {
        let to = run.join(&name);
        if name == CHECKPOINTS_DIR && to.is_dir() && generations(run)?.is_empty() {
            // Only temporaries of the run that failed before its first generation.
            std::fs::remove_dir_all(&to).map_err(|e| io_err(&to, e))?;
        }
        if std::fs::symlink_metadata(&to).is_ok() {
            return Err(io_err(
                &to,
                format!(
                    "cannot put back the previous run from {}: {name} exists in both",
                    aside.display()
                ),
            ));
        }
        std::fs::rename(aside.join(&name), &to).map_err(|e| io_err(&to, e))?;
    }
    sync_dir_for_recovery(run).map_err(|e| io_err(run, e))?;
    std::fs::remove_dir(&aside).map_err(|e| io_err(&aside, e))?;
    sync_dir_for_recovery(run).map_err(|e| io_err(run, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generation_names_round_trip() {
        assert_eq!(generation_name(200), "step-00000200");
        assert_eq!(parse_generation_name("step-00000200"), Some(200));
        assert_eq!(parse_generation_name("step-"), None);
        assert_eq!(parse_generation_name("step-12a"), None);
        assert_eq!(parse_generation_name(".step-00000002.7.tmp"), None);
    }
}
