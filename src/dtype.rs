//! Element types the kernels accept, and host slices of them.

use half::{bf16, f16};

/// A logits/hidden element type. Accumulation is always f32 (device, cpu) or f64 (reference).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Dtype {
    /// IEEE binary32.
    F32,
    /// IEEE binary16 ([`half::f16`]): 10-bit mantissa, largest finite 65504.
    F16,
    /// bfloat16 ([`half::bf16`]): f32's exponent range, 7-bit mantissa.
    Bf16,
}

impl Dtype {
    /// Every dtype, in this order (for sweeps in tests and benchmarks).
    pub const ALL: [Dtype; 3] = [Dtype::F32, Dtype::F16, Dtype::Bf16];

    /// The suffix used in kernel names (`dk_kd_f32_bf16_f32`).
    pub fn suffix(self) -> &'static str {
        match self {
            Dtype::F32 => "f32",
            Dtype::F16 => "f16",
            Dtype::Bf16 => "bf16",
        }
    }

    /// Bytes per element: 4 for f32, 2 for f16 and bf16.
    pub fn size_bytes(self) -> usize {
        match self {
            Dtype::F32 => 4,
            Dtype::F16 | Dtype::Bf16 => 2,
        }
    }
}

impl std::fmt::Display for Dtype {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.suffix())
    }
}

impl std::str::FromStr for Dtype {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "f32" => Ok(Dtype::F32),
            "f16" => Ok(Dtype::F16),
            "bf16" => Ok(Dtype::Bf16),
            other => Err(format!(
                "unknown dtype `{other}` (expected f32, f16 or bf16)"
            )),
        }
    }
}

mod sealed {
    /// Only the crate's three element types implement [`super::Element`]: the kernels exist for
    /// no other.
    pub trait Sealed {}
    impl Sealed for f32 {}
    impl Sealed for half::f16 {}
    impl Sealed for half::bf16 {}

    /// With the `cuda` feature, elements can be kernel arguments and device buffer contents.
    #[cfg(feature = "cuda")]
    pub trait DeviceBound: cudarc::driver::DeviceRepr {}
    #[cfg(feature = "cuda")]
    impl<T: cudarc::driver::DeviceRepr> DeviceBound for T {}
    #[cfg(not(feature = "cuda"))]
    pub trait DeviceBound {}
    #[cfg(not(feature = "cuda"))]
    impl<T> DeviceBound for T {}
}

/// Host element types (`f32`, `f16`, `bf16`; sealed). Conversions are exact widening (to
/// f32/f64) or round-to-nearest-even.
pub trait Element: sealed::Sealed + sealed::DeviceBound + Copy + Send + Sync + 'static {
    /// The [`Dtype`] tag of this type.
    const DTYPE: Dtype;
    /// Widened to f32 (exact).
    fn to_f32(self) -> f32;
    /// `v` rounded to this type, to nearest even (the identity for f32).
    fn from_f32(v: f32) -> Self;
    /// Widened to f64 (exact).
    fn to_f64(self) -> f64 {
        self.to_f32() as f64
    }
}

impl Element for f32 {
    const DTYPE: Dtype = Dtype::F32;
    fn to_f32(self) -> f32 {
        self
    }
    fn from_f32(v: f32) -> Self {
        v
    }
}

impl Element for f16 {
    const DTYPE: Dtype = Dtype::F16;
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
    fn from_f32(v: f32) -> Self {
        f16::from_f32(v)
    }
}

impl Element for bf16 {
    const DTYPE: Dtype = Dtype::Bf16;
    fn to_f32(self) -> f32 {
        bf16::to_f32(self)
    }
    fn from_f32(v: f32) -> Self {
        bf16::from_f32(v)
    }
}

/// A borrowed host tensor of any supported dtype, row-major.
#[derive(Debug, Clone, Copy)]
pub enum HostSlice<'a> {
    /// f32 elements.
    F32(&'a [f32]),
    /// f16 elements.
    F16(&'a [f16]),
    /// bf16 elements.
    Bf16(&'a [bf16]),
}

impl<'a> HostSlice<'a> {
    /// The element type.
    pub fn dtype(&self) -> Dtype {
        match self {
            HostSlice::F32(_) => Dtype::F32,
            HostSlice::F16(_) => Dtype::F16,
            HostSlice::Bf16(_) => Dtype::Bf16,
        }
    }

    /// Number of elements (not bytes).
    pub fn len(&self) -> usize {
        match self {
            HostSlice::F32(s) => s.len(),
            HostSlice::F16(s) => s.len(),
            HostSlice::Bf16(s) => s.len(),
        }
    }

    /// Whether it has no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Element `i` widened to f32 (exact).
    #[inline]
    pub fn get_f32(&self, i: usize) -> f32 {
        match self {
            HostSlice::F32(s) => s[i],
            HostSlice::F16(s) => s[i].to_f32(),
            HostSlice::Bf16(s) => s[i].to_f32(),
        }
    }

    /// Bytes of the whole slice, for device copies.
    pub fn as_bytes(&self) -> &'a [u8] {
        match *self {
            HostSlice::F32(s) => bytemuck_cast(s),
            HostSlice::F16(s) => bytemuck_cast(s),
            HostSlice::Bf16(s) => bytemuck_cast(s),
        }
    }
}

impl<'a> From<&'a [f32]> for HostSlice<'a> {
    fn from(s: &'a [f32]) -> Self {
        HostSlice::F32(s)
    }
}
impl<'a> From<&'a [f16]> for HostSlice<'a> {
    fn from(s: &'a [f16]) -> Self {
        HostSlice::F16(s)
    }
}
impl<'a> From<&'a [bf16]> for HostSlice<'a> {
    fn from(s: &'a [bf16]) -> Self {
        HostSlice::Bf16(s)
    }
}

/// An owned host tensor of any supported dtype (what files and tests produce).
#[derive(Debug, Clone, PartialEq)]
pub enum HostVec {
    /// f32 elements.
    F32(Vec<f32>),
    /// f16 elements.
    F16(Vec<f16>),
    /// bf16 elements.
    Bf16(Vec<bf16>),
}

impl HostVec {
    /// Rounds f32 values to `dtype` (round to nearest even).
    pub fn from_f32(values: &[f32], dtype: Dtype) -> Self {
        match dtype {
            Dtype::F32 => HostVec::F32(values.to_vec()),
            Dtype::F16 => HostVec::F16(values.iter().map(|&v| f16::from_f32(v)).collect()),
            Dtype::Bf16 => HostVec::Bf16(values.iter().map(|&v| bf16::from_f32(v)).collect()),
        }
    }

    /// `len` zeros of `dtype`.
    pub fn zeros(dtype: Dtype, len: usize) -> Self {
        match dtype {
            Dtype::F32 => HostVec::F32(vec![0.0; len]),
            Dtype::F16 => HostVec::F16(vec![f16::ZERO; len]),
            Dtype::Bf16 => HostVec::Bf16(vec![bf16::ZERO; len]),
        }
    }

    /// Borrowed mutably, e.g. as a gradient buffer.
    pub fn as_mut_slice(&mut self) -> HostSliceMut<'_> {
        match self {
            HostVec::F32(v) => HostSliceMut::F32(v),
            HostVec::F16(v) => HostSliceMut::F16(v),
            HostVec::Bf16(v) => HostSliceMut::Bf16(v),
        }
    }

    /// Borrowed as a [`HostSlice`] of the same dtype.
    pub fn as_slice(&self) -> HostSlice<'_> {
        match self {
            HostVec::F32(v) => HostSlice::F32(v),
            HostVec::F16(v) => HostSlice::F16(v),
            HostVec::Bf16(v) => HostSlice::Bf16(v),
        }
    }

    /// The element type.
    pub fn dtype(&self) -> Dtype {
        self.as_slice().dtype()
    }

    /// Every element widened to f32 (exact).
    pub fn to_f32_vec(&self) -> Vec<f32> {
        let s = self.as_slice();
        (0..s.len()).map(|i| s.get_f32(i)).collect()
    }
}

/// Borrowed mutable host tensor: where a gradient is written.
#[derive(Debug)]
pub enum HostSliceMut<'a> {
    /// f32 elements.
    F32(&'a mut [f32]),
    /// f16 elements.
    F16(&'a mut [f16]),
    /// bf16 elements.
    Bf16(&'a mut [bf16]),
}

impl HostSliceMut<'_> {
    /// Borrowed immutably.
    pub fn as_slice(&self) -> HostSlice<'_> {
        match self {
            HostSliceMut::F32(v) => HostSlice::F32(v),
            HostSliceMut::F16(v) => HostSlice::F16(v),
            HostSliceMut::Bf16(v) => HostSlice::Bf16(v),
        }
    }

    /// The element type.
    pub fn dtype(&self) -> Dtype {
        match self {
            HostSliceMut::F32(_) => Dtype::F32,
            HostSliceMut::F16(_) => Dtype::F16,
            HostSliceMut::Bf16(_) => Dtype::Bf16,
        }
    }

    /// Number of elements (not bytes).
    pub fn len(&self) -> usize {
        match self {
            HostSliceMut::F32(s) => s.len(),
            HostSliceMut::F16(s) => s.len(),
            HostSliceMut::Bf16(s) => s.len(),
        }
    }

    /// Whether it has no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

fn bytemuck_cast<T: Copy>(s: &[T]) -> &[u8] {
    // SAFETY: f32, f16 and bf16 are plain old data with no padding; the byte view covers exactly
    // the same memory and lives as long as `s`.
    unsafe { std::slice::from_raw_parts(s.as_ptr() as *const u8, std::mem::size_of_val(s)) }
}
