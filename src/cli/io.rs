//! safetensors in and out: reading a file into typed host tensors with every problem reported by
//! tensor name, and writing an output file atomically (a temporary file in the target directory,
//! renamed over the target only once complete).

use std::borrow::Cow;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use distill_kernels::train::error::describe_safetensors;
use distill_kernels::train::files::{self, CleanupGuard, StaleRule};
use distill_kernels::train::memory::MemoryPlan;
use distill_kernels::HostVec;
use half::{bf16, f16};
use safetensors::tensor::TensorView;
use safetensors::{Dtype as StDtype, SafeTensors, View};

use super::{CliError, CliResult};

/// A whole safetensors file in memory, parsed.
pub struct InputFile {
    path: String,
    bytes: Vec<u8>,
}

impl InputFile {
    /// Reads a regular file (a device, FIFO or directory is refused: `/dev/zero` would be read
    /// until memory runs out) whose size fits the available memory.
    pub fn read(path: &Path) -> CliResult<Self> {
        let shown = path.display().to_string();
        let meta = std::fs::metadata(path)
            .map_err(|e| CliError::new(format!("cannot read input file {shown}: {e}")))?;
        if !meta.is_file() {
            return Err(CliError::new(format!(
                "input {shown} is not a regular file (a directory, device or pipe)"
            )));
        }
        let mut plan = MemoryPlan::new();
        plan.add(
            "the file, its tensors and the gradients",
            usize::try_from(meta.len()).ok(),
            3,
        );
        plan.check(&format!("reading input {shown}"))?;
        let bytes = std::fs::read(path)
            .map_err(|e| CliError::new(format!("cannot read input file {shown}: {e}")))?;
        let file = InputFile { path: shown, bytes };
        // Parse once up front so header problems are reported before anything else.
        file.parse()?;
        Ok(file)
    }

    pub fn path(&self) -> &str {
        &self.path
    }

    pub fn parse(&self) -> CliResult<SafeTensors<'_>> {
        SafeTensors::deserialize(&self.bytes).map_err(|e| {
            CliError::new(format!(
                "input file {} is not a valid safetensors file: {}",
                self.path,
                describe_safetensors(&e)
            ))
        })
    }
}

pub fn shape_str(shape: &[usize]) -> String {
    let parts: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
    format!("[{}]", parts.join(", "))
}

/// A float tensor read from the input, converted to a host vector of its own dtype.
pub struct FloatTensor {
    pub shape: Vec<usize>,
    pub data: HostVec,
}

/// Looks up `name`; `Ok(None)` when the file has no such tensor.
fn view<'a>(st: &SafeTensors<'a>, name: &str) -> Option<TensorView<'a>> {
    st.tensor(name).ok()
}

/// Reads float tensor `name` of rank `rank` (`dims` names the axes for messages), or `None` if
/// the file does not contain it.
pub fn float_tensor(
    file: &InputFile,
    st: &SafeTensors<'_>,
    name: &str,
    rank: usize,
    dims: &str,
) -> CliResult<Option<FloatTensor>> {
    let Some(v) = view(st, name) else {
        return Ok(None);
    };
    let shape = v.shape().to_vec();
    let data = match v.dtype() {
        StDtype::F32 => HostVec::F32(decode::<4, f32>(v.data(), f32::from_le_bytes)),
        StDtype::F16 => HostVec::F16(decode::<2, f16>(v.data(), |b| {
            f16::from_bits(u16::from_le_bytes(b))
        })),
        StDtype::BF16 => HostVec::Bf16(decode::<2, bf16>(v.data(), |b| {
            bf16::from_bits(u16::from_le_bytes(b))
        })),
        other => {
            return Err(CliError::new(format!(
                "input {}: tensor `{name}` has dtype {other:?}, expected F32, F16 or BF16",
                file.path()
            )))
        }
    };
    check_rank(file, name, &shape, rank, dims)?;
    Ok(Some(FloatTensor { shape, data }))
}

/// Reads the I64 label tensor `name` (rank 1), or `None` if absent.
pub fn label_tensor(
    file: &InputFile,
    st: &SafeTensors<'_>,
    name: &str,
) -> CliResult<Option<(Vec<usize>, Vec<i64>)>> {
    let Some(v) = view(st, name) else {
        return Ok(None);
    };
    let shape = v.shape().to_vec();
    if v.dtype() != StDtype::I64 {
        return Err(CliError::new(format!(
            "input {}: tensor `{name}` has dtype {:?}, expected I64",
            file.path(),
            v.dtype()
        )));
    }
    check_rank(file, name, &shape, 1, "[N]")?;
    Ok(Some((
        shape,
        decode::<8, i64>(v.data(), i64::from_le_bytes),
    )))
}

/// Reads the integer id tensor `name` of rank `rank` (U32, I32 or I64; every value must fit
/// u32), or `None` if absent.
pub fn id_tensor(
    file: &InputFile,
    st: &SafeTensors<'_>,
    name: &str,
    rank: usize,
    dims: &str,
) -> CliResult<Option<(Vec<usize>, Vec<u32>)>> {
    let Some(v) = view(st, name) else {
        return Ok(None);
    };
    let shape = v.shape().to_vec();
    let wide: Vec<i64> = match v.dtype() {
        StDtype::U32 => decode::<4, i64>(v.data(), |b| u32::from_le_bytes(b) as i64),
        StDtype::I32 => decode::<4, i64>(v.data(), |b| i32::from_le_bytes(b) as i64),
        StDtype::I64 => decode::<8, i64>(v.data(), i64::from_le_bytes),
        other => {
            return Err(CliError::new(format!(
                "input {}: tensor `{name}` has dtype {other:?}, expected U32, I32 or I64",
                file.path()
            )))
        }
    };
    check_rank(file, name, &shape, rank, dims)?;
    let ids = wide
        .iter()
        .enumerate()
        .map(|(i, &x)| {
            u32::try_from(x).map_err(|_| {
                CliError::new(format!(
                    "input {}: tensor `{name}` holds {x} at element {i}: ids must be in [0, 2^32)",
                    file.path()
                ))
            })
        })
        .collect::<CliResult<Vec<u32>>>()?;
    Ok(Some((shape, ids)))
}

fn check_rank(
    file: &InputFile,
    name: &str,
    shape: &[usize],
    rank: usize,
    dims: &str,
) -> CliResult<()> {
    if shape.len() != rank {
        return Err(CliError::new(format!(
            "input {}: tensor `{name}` has shape {} (rank {}), expected rank {rank} {dims}",
            file.path(),
            shape_str(shape),
            shape.len()
        )));
    }
    Ok(())
}

/// Little-endian bytes to a properly aligned, typed vector (copies; the mapped bytes may be
/// unaligned, so they are never reinterpreted in place).
fn decode<const W: usize, T>(bytes: &[u8], from: impl Fn([u8; W]) -> T) -> Vec<T> {
    bytes
        .chunks_exact(W)
        .map(|c| {
            let mut b = [0u8; W];
            b.copy_from_slice(c);
            from(b)
        })
        .collect()
}

/// A tensor to be written: little-endian bytes plus dtype and shape.
pub struct OutTensor {
    dtype: StDtype,
    shape: Vec<usize>,
    bytes: Vec<u8>,
}

impl OutTensor {
    pub fn f32(shape: Vec<usize>, values: &[f32]) -> Self {
        let mut bytes = Vec::with_capacity(values.len() * 4);
        for v in values {
            bytes.extend_from_slice(&v.to_le_bytes());
        }
        OutTensor {
            dtype: StDtype::F32,
            shape,
            bytes,
        }
    }

    pub fn f16(shape: Vec<usize>, values: &[f16]) -> Self {
        let mut bytes = Vec::with_capacity(values.len() * 2);
        for v in values {
            bytes.extend_from_slice(&v.to_bits().to_le_bytes());
        }
        OutTensor {
            dtype: StDtype::F16,
            shape,
            bytes,
        }
    }

    pub fn bf16(shape: Vec<usize>, values: &[bf16]) -> Self {
        let mut bytes = Vec::with_capacity(values.len() * 2);
        for v in values {
            bytes.extend_from_slice(&v.to_bits().to_le_bytes());
        }
        OutTensor {
            dtype: StDtype::BF16,
            shape,
            bytes,
        }
    }

    pub fn host(shape: Vec<usize>, values: &HostVec) -> Self {
        match values {
            HostVec::F32(v) => Self::f32(shape, v),
            HostVec::F16(v) => Self::f16(shape, v),
            HostVec::Bf16(v) => Self::bf16(shape, v),
        }
    }

    pub fn i64(shape: Vec<usize>, values: &[i64]) -> Self {
        let mut bytes = Vec::with_capacity(values.len() * 8);
        for v in values {
            bytes.extend_from_slice(&v.to_le_bytes());
        }
        OutTensor {
            dtype: StDtype::I64,
            shape,
            bytes,
        }
    }
}

impl View for &OutTensor {
    fn dtype(&self) -> StDtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(&self.bytes)
    }
    fn data_len(&self) -> usize {
        self.bytes.len()
    }
}

/// An output file being prepared: its temporary sibling `.NAME.PID.tmp` exists from `create` on
/// (so an unwritable directory fails before any work is done) and is removed again unless
/// `commit` renames it over the target, also when a signal interrupts the command.
pub struct PendingOutput {
    target: PathBuf,
    temp: PathBuf,
    /// Removes the temporary when dropped uncommitted or on SIGINT/SIGTERM.
    guard: Option<CleanupGuard>,
}

impl PendingOutput {
    /// Checks the output path (its directory exists, it is not a directory, it is not one of
    /// `inputs`) and creates the temporary file next to it.
    pub fn create(target: &Path, inputs: &[&Path]) -> CliResult<Self> {
        let shown = target.display();
        let Some(file_name) = target.file_name() else {
            return Err(CliError::new(format!(
                "output path {shown} does not name a file"
            )));
        };
        let dir = match target.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        if !dir.is_dir() {
            return Err(CliError::new(format!(
                "output directory {} does not exist (output {shown})",
                dir.display()
            )));
        }
        if target.is_dir() {
            return Err(CliError::new(format!("output {shown} is a directory")));
        }
        for input in inputs {
            if same_file(target, input) {
                return Err(CliError::new(format!(
                    "output {shown} is the input file; refusing to overwrite the input"
                )));
            }
        }
        // Temporaries of earlier `distill loss` runs into this output that were killed.
        let name = file_name.to_string_lossy();
        let _ = files::remove_stale_temps(&dir, Some(&name), StaleRule::DeadProcesses);
        let temp = files::temp_path(target)
            .ok_or_else(|| CliError::new(format!("output path {shown} does not name a file")))?;
        let guard = CleanupGuard::remove_on_abort(&temp);
        std::fs::File::create(&temp).map_err(|e| {
            CliError::new(format!(
                "cannot create output file in {}: {e} (output {shown})",
                dir.display()
            ))
        })?;
        Ok(PendingOutput {
            target: target.to_path_buf(),
            temp,
            guard: Some(guard),
        })
    }

    /// Writes the tensors (sorted by the safetensors layout rules, so the bytes are
    /// deterministic) and one metadata entry, then renames the file over the target.
    pub fn commit(
        mut self,
        tensors: &[(&str, OutTensor)],
        note: Option<(&str, String)>,
    ) -> CliResult<()> {
        let shown = self.target.display().to_string();
        let metadata = note.map(|(k, v)| HashMap::from([(k.to_string(), v)]));
        let views: Vec<(&str, &OutTensor)> = tensors.iter().map(|(n, t)| (*n, t)).collect();
        let bytes = safetensors::serialize(views, &metadata).map_err(|e| {
            CliError::new(format!(
                "cannot write output {shown}: {}",
                describe_safetensors(&e)
            ))
        })?;
        files::write_synced(&self.temp, &bytes)
            .and_then(|()| std::fs::rename(&self.temp, &self.target))
            .and_then(|()| files::sync_dir(&files::parent_dir(&self.target)))
            .map_err(|e| CliError::new(format!("cannot write output {shown}: {e}")))?;
        if let Some(g) = self.guard.take() {
            g.disarm();
        }
        Ok(())
    }
}

/// Whether two paths name the same existing file (also through links).
fn same_file(a: &Path, b: &Path) -> bool {
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        if let (Ok(ma), Ok(mb)) = (std::fs::metadata(a), std::fs::metadata(b)) {
            return ma.dev() == mb.dev() && ma.ino() == mb.ino();
        }
        false
    }
    #[cfg(not(unix))]
    {
        match (std::fs::canonicalize(a), std::fs::canonicalize(b)) {
            (Ok(x), Ok(y)) => x == y,
            _ => false,
        }
    }
}
