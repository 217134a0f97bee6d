//! Loads the fake CUDA driver built from `kernels/emulator` (embedded in the crate) so that
//! cudarc's later `dlopen("libcuda.so.1")` resolves to it: a library already loaded under that
//! SONAME is reused by the dynamic loader.

use std::path::PathBuf;
use std::sync::OnceLock;

use crate::error::{Error, Result};

static LIBRARY: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/libdistill_emu.so"));
/// The check build: the same kernels instrumented for memcheck, initcheck and racecheck
/// (kernels/emulator/sanitizer.cpp). Chosen when `DISTILL_EMU_CHECK` is set.
static CHECK_LIBRARY: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/libdistill_emu_check.so"));

/// Whether `DISTILL_EMU_CHECK` asks for the check build (any value but empty, `0` or `off`).
pub(crate) fn check_requested() -> bool {
    std::env::var("DISTILL_EMU_CHECK").is_ok_and(|v| !matches!(v.trim(), "" | "0" | "off"))
}
/// The emulated cuBLAS (kernels/emulator/cublas.cpp), SONAME `libcublas.so`: loaded after the
/// driver, so that cudarc's `dlopen("libcublas.so")` resolves to it.
static CUBLAS_LIBRARY: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/libdistill_cublas.so"));
static LOADED: OnceLock<std::result::Result<(libloading::Library, libloading::Library), String>> =
    OnceLock::new();

pub(crate) fn is_loaded() -> bool {
    matches!(LOADED.get(), Some(Ok(_)))
}

pub(crate) fn load() -> Result<&'static libloading::Library> {
    LOADED
        .get_or_init(|| {
            if LIBRARY.is_empty() {
                return Err(
                    "the emulated GPU was not built for this target (Linux only) or \
                            this is a docs.rs build"
                        .to_string(),
                );
            }
            let path = match library_override() {
                Some(path) => path,
                None => write_library(driver_library(), "libcuda.so.1")
                    .map_err(|e| format!("cannot write the emulator library: {e}"))?,
            };
            // SAFETY: our own library; its initializers only register kernels.
            let driver = unsafe { libloading::Library::new(&path) }
                .map_err(|e| format!("cannot load the emulator library {}: {e}", path.display()))?;
            let path = write_library(CUBLAS_LIBRARY, "libcublas.so")
                .map_err(|e| format!("cannot write the emulated cuBLAS: {e}"))?;
            // SAFETY: our own library, without initializers; it finds the driver loaded above.
            let cublas = unsafe { libloading::Library::new(&path) }
                .map_err(|e| format!("cannot load the emulated cuBLAS {}: {e}", path.display()))?;
            Ok((driver, cublas))
        })
        .as_ref()
        .map(|(driver, _)| driver)
        .map_err(|e| Error::DeviceUnavailable(e.clone()))
}

/// `DISTILL_EMU_LIBRARY`: a fake driver built outside the crate (the mutation proof links one
/// per mutant of the kernels, see kernels/emulator/mutants.sh) to load instead of the embedded
/// one. It must be linked with the SONAME `libcuda.so.1`, the name cudarc opens.
fn library_override() -> Option<PathBuf> {
    std::env::var_os("DISTILL_EMU_LIBRARY")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
}

/// The driver build to load: the check build when `DISTILL_EMU_CHECK` asks for it.
fn driver_library() -> &'static [u8] {
    if check_requested() {
        CHECK_LIBRARY
    } else {
        LIBRARY
    }
}

/// Writes an embedded library as `name` once per content hash into the temp directory
/// (atomically: concurrent test processes may race here).
fn write_library(library: &[u8], name: &str) -> std::io::Result<PathBuf> {
    let hash = library.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
    });
    let dir = std::env::temp_dir().join(format!("distill-kernels-emu-{hash:016x}"));
    std::fs::create_dir_all(&dir)?;
    let path = dir.join(name);
    if std::fs::metadata(&path)
        .map(|m| m.len() == library.len() as u64)
        .unwrap_or(false)
    {
        return Ok(path);
    }
    let tmp = dir.join(format!("{name}.{}.tmp", std::process::id()));
    std::fs::write(&tmp, library)?;
    std::fs::rename(&tmp, &path)?;
    Ok(path)
}

/// The message of the emulator's last failed launch (barrier divergence, trap, bad shuffle).
pub(crate) fn last_error() -> Option<String> {
    let lib = match LOADED.get() {
        Some(Ok((lib, _))) => lib,
        _ => return None,
    };
    // SAFETY: `dkEmuLastError` returns NULL or a NUL-terminated string owned by the library.
    unsafe {
        let f = lib
            .get::<unsafe extern "C" fn() -> *const std::os::raw::c_char>(b"dkEmuLastError\0")
            .ok()?;
        let p = f();
        if p.is_null() {
            None
        } else {
            Some(std::ffi::CStr::from_ptr(p).to_string_lossy().into_owned())
        }
    }
}

/// The emulator-only module image: the fake driver loads it as a module holding every kernel
/// compiled into the emulator, self-test kernels included (a real driver rejects it).
pub(crate) const MODULE_IMAGE: &[u8] = b"distill-emulator-module\0";

/// Gives the fake driver ptxas's numbers for every kernel (the `sm_90` rows of the report:
/// registers and static shared memory), so that launches are limited like on an H100 and
/// `cuFuncGetAttribute` reports them. Once per process; an empty report (no nvcc) sets nothing.
pub(crate) fn set_kernel_limits(report: &str) -> Result<()> {
    static DONE: OnceLock<std::result::Result<(), String>> = OnceLock::new();
    DONE.get_or_init(|| {
        let lib = load().map_err(|e| e.to_string())?;
        // SAFETY: `dkEmuSetKernelLimits(const char*, int, int, int) -> int` in driver.cpp.
        let set = unsafe {
            lib.get::<unsafe extern "C" fn(*const std::os::raw::c_char, i32, i32, i32) -> i32>(
                b"dkEmuSetKernelLimits\0",
            )
        }
        .map_err(|e| format!("the emulator library lacks dkEmuSetKernelLimits: {e}"))?;
        for row in report.lines().skip(1) {
            let f: Vec<&str> = row.split('\t').collect();
            if f.len() != 7 || f[0] != "sm_90" {
                continue;
            }
            let number = |s: &str| s.parse::<i32>().map_err(|_| format!("ptxas report: {row}"));
            let (regs, smem) = (number(f[2])?, number(f[6])?);
            let name = std::ffi::CString::new(f[1]).map_err(|_| format!("ptxas report: {row}"))?;
            // SAFETY: a NUL-terminated name; the library copies what it keeps.
            let rc = unsafe { set(name.as_ptr(), 0, smem, regs) };
            if rc != 0 {
                let detail = last_error().unwrap_or_default();
                return Err(format!("kernel limits for {}: error {rc}: {detail}", f[1]));
            }
        }
        Ok(())
    })
    .clone()
    .map_err(Error::DeviceUnavailable)
}
