//! Durable files: atomic replacement, per-process temporary names, clean-up on signals, and the
//! test-only fault hooks that let the test suite kill a save at every fsync or fill the disk.
//!
//! **Temporary names.** A file or directory being written is `.NAME.PID.tmp` next to its final
//! `NAME`, so two processes never share a temporary, and a temporary whose process is gone is
//! recognisable ([`parse_temp_name`], [`remove_stale_temps`]).
//!
//! **Clean-up on signals.** Every temporary is owned by a [`CleanupGuard`] while it exists; the
//! guard removes it when dropped (an error unwinds through it) and registers it in a process-wide
//! list that [`run_cleanup`] walks. The `distill` binary's SIGINT/SIGTERM handler first calls
//! [`interrupt`]: every write and sync here then fails, so a thread that is writing abandons its
//! file through the ordinary error path and the command returns; a thread that is computing is
//! given a grace period, after which the handler calls [`run_cleanup`] itself and exits. A library
//! user with its own handler can do the same. A `kill -9` runs nothing: its temporaries are removed
//! by the next run ([`remove_stale_temps`]).
//!
//! **Fault hooks (tests only).** The environment variable `DISTILL_FAULT` makes the writer fail on
//! purpose, read once per process:
//! - `kill-at-sync=N`: the process sends itself SIGKILL just before its N-th fsync (1-based; file
//!   and directory syncs counted together), the moment a power cut or `kill -9` is most harmful;
//! - `enospc-after=BYTES`: writes fail with "No space left on device" once BYTES bytes in total
//!   were written through this module, as a full disk would.
//!
//! Unset (always, outside the test suite), each hook costs one load of a cached value.

use std::ffi::OsString;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI32, AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};

use crate::train::error::{Result, TrainError as Error};

// ---------------------------------------------------------------------------------------------
// Fault hooks

#[derive(Debug, Clone, Copy)]
enum Fault {
    None,
    KillAtSync(u64),
    EnospcAfter(u64),
}

fn fault() -> Fault {
    static FAULT: OnceLock<Fault> = OnceLock::new();
    *FAULT.get_or_init(|| {
        let Ok(spec) = std::env::var("DISTILL_FAULT") else {
            return Fault::None;
        };
        let parse = |prefix: &str| spec.strip_prefix(prefix).and_then(|n| n.parse().ok());
        if let Some(n) = parse("kill-at-sync=") {
            Fault::KillAtSync(n)
        } else if let Some(n) = parse("enospc-after=") {
            Fault::EnospcAfter(n)
        } else {
            // A misspelt hook would make a fault test pass without injecting anything.
            eprintln!("error: DISTILL_FAULT={spec} is not kill-at-sync=N or enospc-after=BYTES");
            std::process::exit(2);
        }
    })
}

static SYNCS: AtomicU64 = AtomicU64::new(0);
static WRITTEN: AtomicU64 = AtomicU64::new(0);

fn before_sync() {
    if let Fault::KillAtSync(n) = fault() {
        if SYNCS.fetch_add(1, Ordering::SeqCst) + 1 == n {
            kill_self();
        }
    }
}

#[cfg(unix)]
fn kill_self() {
    // SAFETY: kill(2) on our own pid with a valid signal number has no memory effects.
    unsafe {
        libc::kill(libc::getpid(), libc::SIGKILL);
    }
}

#[cfg(not(unix))]
fn kill_self() {
    std::process::abort();
}

fn check_space(len: usize) -> std::io::Result<()> {
    if let Fault::EnospcAfter(budget) = fault() {
        let before = WRITTEN.fetch_add(len as u64, Ordering::SeqCst);
        if before + len as u64 > budget {
            return Err(std::io::Error::from_raw_os_error(28)); // ENOSPC
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Writing and syncing

// ---------------------------------------------------------------------------------------------
// Interruption

static INTERRUPTED: AtomicI32 = AtomicI32::new(0);

/// Records that signal `signal` asks the process to stop: every write and sync of this module
/// fails from now on with [`std::io::ErrorKind::Interrupted`], so the writing thread abandons its
/// file through the normal error path (its [`CleanupGuard`]s remove what it started).
pub fn interrupt(signal: i32) {
    INTERRUPTED.store(signal.max(1), Ordering::SeqCst);
}

/// The signal passed to [`interrupt`], if any.
pub fn interrupted() -> Option<i32> {
    match INTERRUPTED.load(Ordering::SeqCst) {
        0 => None,
        s => Some(s),
    }
}

fn check_interrupted() -> std::io::Result<()> {
    match interrupted() {
        None => Ok(()),
        Some(s) => Err(std::io::Error::new(
            std::io::ErrorKind::Interrupted,
            format!("interrupted by signal {s}"),
        )),
    }
}

/// Writes all of `bytes` to `file` in pieces, each counted by the full-disk hook.
pub fn write_all(file: &mut std::fs::File, bytes: &[u8]) -> std::io::Result<()> {
    for piece in bytes.chunks(1 << 20) {
        check_interrupted()?;
        check_space(piece.len())?;
        file.write_all(piece)?;
    }
    Ok(())
}

/// Creates (or truncates) `path`, writes `bytes` and fsyncs it.
pub fn write_synced(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut f = std::fs::File::create(path)?;
    write_all(&mut f, bytes)?;
    sync_file(&f)
}

/// fsync of one file.
pub fn sync_file(file: &std::fs::File) -> std::io::Result<()> {
    check_interrupted()?;
    before_sync();
    file.sync_all()
}

/// Makes the renames and creations in `dir` durable; without it a crash may persist a later
/// rename but not an earlier one.
pub fn sync_dir(dir: &Path) -> std::io::Result<()> {
    check_interrupted()?;
    sync_dir_for_recovery(dir)
}

/// [`sync_dir`] that still works after [`interrupt`]: for putting things back, which must
/// finish even when a signal stopped the run.
pub fn sync_dir_for_recovery(dir: &Path) -> std::io::Result<()> {
    before_sync();
    #[cfg(unix)]
    {
        std::fs::File::open(dir)?.sync_all()
    }
    #[cfg(not(unix))]
    {
        let _ = dir;
        Ok(())
    }
}

/// Removes a file, a symbolic link (not what it points to) or a whole directory.
pub fn remove_entry(path: &Path) -> std::io::Result<()> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => std::fs::remove_dir_all(path),
        _ => std::fs::remove_file(path),
    }
}

/// The directory a path lives in (`.` for a bare file name).
pub fn parent_dir(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

fn io_error(path: &Path, message: impl Into<String>) -> Error {
    Error::Io {
        path: path.display().to_string(),
        message: message.into(),
    }
}

/// Runs `write` on `.NAME.PID.tmp`, fsyncs it, renames it over `path` and fsyncs the directory:
/// readers see the old file or the complete new one. The temporary is removed on failure and on
/// SIGINT/SIGTERM (through [`run_cleanup`]).
pub fn commit_atomic(
    path: &Path,
    write: impl FnOnce(&Path) -> std::result::Result<(), String>,
) -> Result<()> {
    let tmp = temp_path(path).ok_or_else(|| io_error(path, "the path does not name a file"))?;
    if path.is_dir() {
        return Err(io_error(path, "the path is a directory"));
    }
    let guard = CleanupGuard::remove_on_abort(&tmp);
    write(&tmp).map_err(|m| io_error(path, m))?;
    let result = std::fs::File::open(&tmp)
        .and_then(|f| sync_file(&f))
        .and_then(|()| std::fs::rename(&tmp, path))
        .and_then(|()| sync_dir(&parent_dir(path)));
    guard.disarm_if(result.is_ok());
    result.map_err(|e| io_error(path, e.to_string()))
}

/// Writes `bytes` to `path` atomically and durably (see [`commit_atomic`]).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    commit_atomic(path, |tmp| {
        write_synced(tmp, bytes).map_err(|e| e.to_string())
    })
}

// ---------------------------------------------------------------------------------------------
// Temporary names

/// `.NAME.PID.tmp` next to `path`, for this process; `None` when `path` names no file.
pub fn temp_path(path: &Path) -> Option<PathBuf> {
    temp_path_for(path, std::process::id())
}

fn temp_path_for(path: &Path, pid: u32) -> Option<PathBuf> {
    let mut name = OsString::from(".");
    name.push(path.file_name()?);
    name.push(format!(".{pid}.tmp"));
    Some(path.with_file_name(name))
}

/// The `(NAME, PID)` of a temporary's file name `.NAME.PID.tmp`.
pub fn parse_temp_name(file_name: &str) -> Option<(&str, u32)> {
    let inner = file_name.strip_prefix('.')?.strip_suffix(".tmp")?;
    let (name, pid) = inner.rsplit_once('.')?;
    if name.is_empty() || pid.is_empty() || !pid.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some((name, pid.parse().ok()?))
}

/// Whether process `pid` exists (a process of another user counts as existing).
pub fn process_alive(pid: u32) -> bool {
    #[cfg(unix)]
    {
        let Ok(pid) = libc::pid_t::try_from(pid) else {
            return false;
        };
        // SAFETY: signal 0 only checks that the process exists and may be signalled.
        let rc = unsafe { libc::kill(pid, 0) };
        rc == 0 || std::io::Error::last_os_error().raw_os_error() != Some(libc::ESRCH)
    }
    #[cfg(not(unix))]
    {
        let _ = pid;
        true
    }
}

/// Which temporaries [`remove_stale_temps`] may remove.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StaleRule {
    /// Those of every other process: the caller holds the directory's lock, so no other live
    /// process writes there.
    OtherProcesses,
    /// Only those of processes that no longer exist.
    DeadProcesses,
}

/// Removes the temporaries (files or directories named `.NAME.PID.tmp`) in `dir` that `rule`
/// calls stale, only those for final name `only` when given; returns what was removed.
pub fn remove_stale_temps(dir: &Path, only: Option<&str>, rule: StaleRule) -> Result<Vec<PathBuf>> {
    let mut removed = Vec::new();
    let entries = match std::fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(removed),
        Err(e) => return Err(io_error(dir, e.to_string())),
    };
    let me = std::process::id();
    for entry in entries {
        let entry = entry.map_err(|e| io_error(dir, e.to_string()))?;
        let file_name = entry.file_name();
        let Some((name, pid)) = file_name.to_str().and_then(parse_temp_name) else {
            continue;
        };
        if only.is_some_and(|o| o != name) || pid == me {
            continue;
        }
        if rule == StaleRule::DeadProcesses && process_alive(pid) {
            continue;
        }
        let path = entry.path();
        match remove_entry(&path) {
            Ok(()) => removed.push(path),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(io_error(
                    &path,
                    format!("cannot remove a stale temporary: {e}"),
                ))
            }
        }
    }
    Ok(removed)
}

// ---------------------------------------------------------------------------------------------
// Clean-up on abort

type Action = Box<dyn Fn() + Send>;

fn actions() -> &'static Mutex<Vec<(u64, Action)>> {
    static ACTIONS: OnceLock<Mutex<Vec<(u64, Action)>>> = OnceLock::new();
    ACTIONS.get_or_init(|| Mutex::new(Vec::new()))
}

static NEXT_ID: AtomicU64 = AtomicU64::new(0);

/// An action to run if the process is interrupted (by [`run_cleanup`]) or when the guard is
/// dropped without [`CleanupGuard::disarm`] (an error unwinding); registered while the guard
/// lives.
#[must_use = "the clean-up is registered only while the guard lives"]
pub struct CleanupGuard {
    id: u64,
    armed: bool,
}

impl CleanupGuard {
    /// Registers `action`.
    pub fn new(action: impl Fn() + Send + 'static) -> Self {
        let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
        let mut list = actions().lock().unwrap_or_else(|e| e.into_inner());
        list.push((id, Box::new(action)));
        CleanupGuard { id, armed: true }
    }

    /// A guard that removes the temporary file or directory `path`.
    pub fn remove_on_abort(path: &Path) -> Self {
        let path = path.to_path_buf();
        Self::new(move || {
            let _ = remove_entry(&path);
        })
    }

    /// The work succeeded: unregister without running the action.
    pub fn disarm(mut self) {
        self.armed = false;
    }

    /// [`disarm`](Self::disarm) when `ok`, else run the action now.
    pub fn disarm_if(self, ok: bool) {
        if ok {
            self.disarm();
        }
    }
}

impl Drop for CleanupGuard {
    fn drop(&mut self) {
        let action = {
            let mut list = actions().lock().unwrap_or_else(|e| e.into_inner());
            let at = list.iter().position(|(id, _)| *id == self.id);
            at.map(|i| list.remove(i).1)
        };
        if let (true, Some(action)) = (self.armed, action) {
            action();
        }
    }
}

/// Runs every registered clean-up action, newest first, and leaves the list locked, so nothing
/// registers or unregisters afterwards: call it from a signal-handling thread just before the
/// process exits.
pub fn run_cleanup() {
    let mut list = actions().lock().unwrap_or_else(|e| e.into_inner());
    for (_, action) in list.iter().rev() {
        action();
    }
    list.clear();
    std::mem::forget(list);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn temp_names_round_trip() {
        let p = temp_path_for(Path::new("/x/model.safetensors"), 42).unwrap();
        assert_eq!(p, Path::new("/x/.model.safetensors.42.tmp"));
        let name = p.file_name().unwrap().to_str().unwrap();
        assert_eq!(parse_temp_name(name), Some(("model.safetensors", 42)));
        assert_eq!(parse_temp_name(".a.b.tmp"), None);
        assert_eq!(parse_temp_name("a.1.tmp"), None);
        assert_eq!(parse_temp_name("..1.tmp"), None);
        assert_eq!(
            parse_temp_name(".step-00000002.7.tmp"),
            Some(("step-00000002", 7))
        );
    }

    #[test]
    fn this_process_is_alive() {
        assert!(process_alive(std::process::id()));
    }
}
