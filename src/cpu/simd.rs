//! The building blocks of the hot loops: lane-blocked reductions, on-the-fly dtype conversion of
//! one chunk of a row, and the run-time choice of instruction set.
//!
//! Per-entry work is written as plain loops over slices, which LLVM vectorizes as maps; sums
//! are loops over blocks of [`W`] elements with one accumulator per lane, written as plain arrays:
//! the order of every floating-point operation is fixed by the source (lane `l` sums elements
//! `l, l + W, l + 2W, ...`; lanes are then added left to right), so the vectorizer may put a
//! block in one zmm, two ymm or four xmm/NEON registers without changing a bit of the result.
//! The kernels are `#[inline(always)]` generic code, instantiated once per instruction set by
//! [`run`] inside a `#[target_feature]` function, so the same source becomes AVX-512, AVX2 or
//! baseline (SSE2/NEON) machine code.

use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};

use super::fastmath::{Fused, MulAdd};
use crate::dtype::{Element, HostSliceMut};

/// Lanes of every accumulator: one zmm, two ymm, four xmm or NEON registers.
pub const W: usize = 16;

/// Elements of a row converted to f32 at a time (2 KiB per input, so a chunk stays in L1).
pub const CHUNK: usize = 512;

const NEG_INF: f32 = f32::NEG_INFINITY;

// ---------------------------------------------------------------------------------------------
// Instruction sets.

/// The instruction set the CPU backend's hot loops run with on this machine.
///
/// All levels compute bit-identical results, with one exception: an x86_64 CPU without FMA
/// (before 2013) runs [`SimdLevel::Portable`] with separate multiplies and adds, whose results may
/// differ from the fused ones in the last bits. On aarch64 the portable level uses fused
/// multiply-adds too (they are part of the base instruction set) and matches x86_64 bit for bit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum SimdLevel {
    /// What the compilation target guarantees (SSE2 on x86_64, NEON on aarch64).
    Portable,
    /// x86_64 with AVX2 and FMA.
    Avx2,
    /// x86_64 with AVX-512F (and AVX2, FMA).
    Avx512,
}

impl SimdLevel {
    /// The best level this CPU supports (detected once).
    pub fn detect() -> SimdLevel {
        use std::sync::OnceLock;
        static LEVEL: OnceLock<SimdLevel> = OnceLock::new();
        *LEVEL.get_or_init(|| {
            #[cfg(target_arch = "x86_64")]
            {
                let avx2 = std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma");
                if avx2 && std::arch::is_x86_feature_detected!("avx512f") {
                    return SimdLevel::Avx512;
                }
                if avx2 {
                    return SimdLevel::Avx2;
                }
            }
            SimdLevel::Portable
        })
    }

    /// `self`, lowered to what this CPU supports (so asking for a level never executes an
    /// instruction the CPU lacks).
    pub fn supported(self) -> SimdLevel {
        self.min(SimdLevel::detect())
    }

    /// Lowercase name for reports: `portable`, `avx2` or `avx512`.
    pub fn name(self) -> &'static str {
        match self {
            SimdLevel::Portable => "portable",
            SimdLevel::Avx2 => "avx2",
            SimdLevel::Avx512 => "avx512",
        }
    }
}

/// A hot loop, written once as generic code over the multiply-add flavour `M` and run by [`run`]
/// at a chosen [`SimdLevel`]. Implementations must be `#[inline(always)]` (and everything they
/// call in their loops too), so that their code lands inside the `#[target_feature]` function.
pub trait Kernel {
    type Output;
    fn run<M: MulAdd>(self) -> Self::Output;
}

/// The multiply-add of the portable level: fused where the target has FMA in its base
/// instruction set (aarch64, or an x86_64 build with `fma` enabled), separate otherwise.
#[cfg(any(target_arch = "aarch64", target_feature = "fma"))]
type PortableArith = Fused;
#[cfg(not(any(target_arch = "aarch64", target_feature = "fma")))]
type PortableArith = super::fastmath::Unfused;

/// Runs `kernel` with the instruction set `level` (lowered to what the CPU supports).
#[inline(always)]
pub fn run<K: Kernel>(level: SimdLevel, kernel: K) -> K::Output {
    #[cfg(target_arch = "x86_64")]
    {
        match level.supported() {
            // SAFETY: `supported` only returns a level whose features the CPU has.
            SimdLevel::Avx512 => return unsafe { run_avx512(kernel) },
            SimdLevel::Avx2 => return unsafe { run_avx2(kernel) },
            SimdLevel::Portable => {}
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = level;
    run_portable(kernel)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn run_avx512<K: Kernel>(kernel: K) -> K::Output {
    kernel.run::<Fused>()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn run_avx2<K: Kernel>(kernel: K) -> K::Output {
    kernel.run::<Fused>()
}

fn run_portable<K: Kernel>(kernel: K) -> K::Output {
    kernel.run::<PortableArith>()
}

// ---------------------------------------------------------------------------------------------
// Element types: one chunk widened to f32, and f32 narrowed back.

/// An element type the hot loops read and write a chunk at a time.
pub trait Lanes: Element {
    /// `src` (at most [`CHUNK`] elements) as f32, padded with `pad` to a multiple of [`W`]:
    /// a view of `src` itself when it is f32 of such a length, else a prefix of `buf`. Logits
    /// are padded with `-inf`, which adds nothing to a maximum, an exponential sum or a
    /// divergence term (`0 * log 0 = 0`) and has gradient 0; plain values with 0.
    fn widen<'a>(src: &'a [Self], buf: &'a mut [f32; CHUNK], pad: f32) -> &'a [f32];
    /// `dst[i] = src[i]` rounded to nearest even (`src.len() == dst.len()`).
    fn narrow(src: &[f32], dst: &mut [Self]);
    /// The slice as a [`HostSliceMut`].
    fn host_mut(x: &mut [Self]) -> HostSliceMut<'_>;
    /// The slice as a [`crate::dtype::HostSlice`].
    fn host(x: &[Self]) -> crate::dtype::HostSlice<'_>;
}

/// Pads `buf[n..]` with `value` up to a multiple of [`W`].
#[inline(always)]
fn pad(buf: &mut [f32; CHUNK], n: usize, value: f32) -> &[f32] {
    let m = n.div_ceil(W) * W;
    buf[n..m].fill(value);
    &buf[..m]
}

impl Lanes for f32 {
    #[inline(always)]
    fn widen<'a>(src: &'a [f32], buf: &'a mut [f32; CHUNK], value: f32) -> &'a [f32] {
        if src.len().is_multiple_of(W) {
            src
        } else {
            buf[..src.len()].copy_from_slice(src);
            pad(buf, src.len(), value)
        }
    }

    #[inline(always)]
    fn narrow(src: &[f32], dst: &mut [f32]) {
        dst.copy_from_slice(src);
    }

    fn host_mut(x: &mut [f32]) -> HostSliceMut<'_> {
        HostSliceMut::F32(x)
    }

    fn host(x: &[f32]) -> crate::dtype::HostSlice<'_> {
        crate::dtype::HostSlice::F32(x)
    }
}

impl Lanes for bf16 {
    #[inline(always)]
    fn widen<'a>(src: &'a [bf16], buf: &'a mut [f32; CHUNK], value: f32) -> &'a [f32] {
        for (d, s) in buf.iter_mut().zip(src) {
            *d = f32::from_bits((s.to_bits() as u32) << 16);
        }
        pad(buf, src.len(), value)
    }

    #[inline(always)]
    fn narrow(src: &[f32], dst: &mut [bf16]) {
        for (d, &s) in dst.iter_mut().zip(src) {
            *d = bf16::from_bits(f32_to_bf16_bits(s));
        }
    }

    fn host_mut(x: &mut [bf16]) -> HostSliceMut<'_> {
        HostSliceMut::Bf16(x)
    }

    fn host(x: &[bf16]) -> crate::dtype::HostSlice<'_> {
        crate::dtype::HostSlice::Bf16(x)
    }
}

impl Lanes for f16 {
    #[inline(always)]
    fn widen<'a>(src: &'a [f16], buf: &'a mut [f32; CHUNK], value: f32) -> &'a [f32] {
        for (d, s) in buf.iter_mut().zip(src) {
            *d = f16_bits_to_f32(s.to_bits());
        }
        pad(buf, src.len(), value)
    }

    #[inline(always)]
    fn narrow(src: &[f32], dst: &mut [f16]) {
        // F16C (or half's software conversion where absent): round to nearest even either way.
        dst.convert_from_f32_slice(src);
    }

    fn host_mut(x: &mut [f16]) -> HostSliceMut<'_> {
        HostSliceMut::F16(x)
    }

    fn host(x: &[f16]) -> crate::dtype::HostSlice<'_> {
        crate::dtype::HostSlice::F16(x)
    }
}

/// f32 -> bf16 bits, round to nearest even; NaN stays NaN (quiet), like `half::bf16::from_f32`.
#[inline(always)]
fn f32_to_bf16_bits(x: f32) -> u16 {
    let b = x.to_bits();
    let rounded = (b.wrapping_add(0x7fff + ((b >> 16) & 1)) >> 16) as u16;
    let nan = ((b >> 16) as u16) | 0x0040;
    if x.is_nan() {
        nan
    } else {
        rounded
    }
}

/// f16 bits -> f32, exact and branch-free: normals and subnormals are the f16 bits moved into an
/// f32 and scaled by 2^112 (exact: a power of two, the result is a normal f32); infinities and
/// NaN get the all-ones exponent.
#[inline(always)]
fn f16_bits_to_f32(h: u16) -> f32 {
    const TWO_POW_112: f32 = f32::from_bits((127 + 112) << 23);
    let h = h as u32;
    let magnitude = (h & 0x7fff) << 13;
    let finite = f32::from_bits(magnitude) * TWO_POW_112;
    let special = f32::from_bits(magnitude | 0x7f80_0000);
    let v = if h & 0x7c00 == 0x7c00 {
        special
    } else {
        finite
    };
    f32::from_bits(v.to_bits() | ((h & 0x8000) << 16))
}

/// Asks the CPU to start loading `x[range]` (clamped to `x`) into its caches, one hint per
/// 64-byte line: pass 1 prefetches the next chunk while it computes on the current one, so the
/// DRAM latency hides behind the exponentials. A hint only; a no-op off x86_64.
#[inline(always)]
pub fn prefetch(x: crate::dtype::HostSlice, range: std::ops::Range<usize>) {
    #[cfg(target_arch = "x86_64")]
    {
        use crate::dtype::HostSlice;
        let bytes: &[u8] = match x {
            HostSlice::F32(v) => bytes_of(v, range),
            HostSlice::F16(v) => bytes_of(v, range),
            HostSlice::Bf16(v) => bytes_of(v, range),
        };
        for line in bytes.chunks(64) {
            // SAFETY: prefetching is a hint that never faults; the address is in bounds anyway.
            unsafe {
                std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(
                    line.as_ptr() as *const i8
                )
            };
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (x, range);
}

/// The bytes of `v[range]`, the range clamped to `v`.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn bytes_of<T>(v: &[T], range: std::ops::Range<usize>) -> &[u8] {
    let end = range.end.min(v.len());
    let start = range.start.min(end);
    let v = &v[start..end];
    // SAFETY: f32, f16 and bf16 are plain old data; the byte view covers the same memory.
    unsafe { std::slice::from_raw_parts(v.as_ptr() as *const u8, std::mem::size_of_val(v)) }
}

// ---------------------------------------------------------------------------------------------
// Lane-blocked reductions.

/// `acc[0] + ... + acc[W - 1]`, left to right. (A tree order would be as good numerically, but
/// it makes LLVM's SLP vectorizer split the accumulating loop into 2-lane vectors.)
#[inline(always)]
pub fn hsum(acc: [f32; W]) -> f32 {
    let mut s = acc[0];
    for &a in &acc[1..] {
        s += a;
    }
    s
}

/// The maximum of `xs` (a multiple of [`W`] long), ignoring NaN; `-inf` when there is none.
#[inline(always)]
pub fn max(xs: &[f32]) -> f32 {
    let mut m = [NEG_INF; W];
    for b in xs.chunks_exact(W) {
        for l in 0..W {
            m[l] = if b[l] > m[l] { b[l] } else { m[l] };
        }
    }
    let mut w = W / 2;
    while w > 0 {
        for i in 0..w {
            m[i] = if m[i + w] > m[i] { m[i + w] } else { m[i] };
        }
        w /= 2;
    }
    m[0]
}

/// `out[i] = 2^((xs[i] - m) * scale2)` (`out` at least as long as `xs`; `m` at least every
/// `xs[i]`, so the exponent is at most 0) and their sum, lane by lane as in [`sum`].
#[inline(always)]
pub fn exp2_sum<M: MulAdd>(xs: &[f32], m: f32, scale2: f32, out: &mut [f32]) -> f32 {
    let out = &mut out[..xs.len()];
    for (o, &x) in out.iter_mut().zip(xs) {
        *o = super::fastmath::exp2_nonpositive::<M>((x - m) * scale2);
    }
    sum(out)
}

/// `sum x^N` over `xs` (N in 2..=4; a multiple of [`W`] long), lane by lane as in [`sum`].
#[inline(always)]
pub fn sum_pow<const N: u32>(xs: &[f32]) -> f32 {
    let mut acc = [0.0f32; W];
    for b in xs.chunks_exact(W) {
        for l in 0..W {
            let e = b[l];
            let e2 = e * e;
            acc[l] += match N {
                2 => e2,
                3 => e2 * e,
                _ => e2 * e2,
            };
        }
    }
    hsum(acc)
}

/// `sum x` over `xs` (a multiple of [`W`] long).
///
/// The hot loops compute their per-entry values with a plain loop into a buffer, then sum the
/// buffer here: a small loop body over lane arrays like this one is fully unrolled and its
/// accumulators live in registers, whereas an exponential inside the accumulating loop makes
/// LLVM vectorize the lane loop with the accumulators in memory (a store-to-load round trip on
/// the loop-carried sum every block, which halved the throughput).
#[inline(always)]
pub fn sum(xs: &[f32]) -> f32 {
    let mut acc = [0.0f32; W];
    for b in xs.chunks_exact(W) {
        for l in 0..W {
            acc[l] += b[l];
        }
    }
    hsum(acc)
}

/// Whether `xs` holds a NaN (used only on the rare path of a chunk without a finite maximum).
#[inline(always)]
pub fn has_nan(xs: &[f32]) -> bool {
    xs.iter().any(|v| v.is_nan())
}

/// Online statistics of one input: the running maximum `m` and `z = sum 2^((x - m) * scale2)`,
/// fed a chunk at a time (`scale2 = log2 e / T`). Sums are taken relative to the running
/// maximum, rescaled when it grows.
#[derive(Clone, Copy, Debug)]
pub struct MaxSum {
    pub m: f32,
    pub z: f32,
}

impl MaxSum {
    pub const EMPTY: MaxSum = MaxSum { m: NEG_INF, z: 0.0 };

    /// Moves the maximum up to `m` (when larger), rescaling the sum. From an empty state the
    /// factor is `exp(-inf) = 0` and the sum (0, or NaN after a NaN) stays what it was.
    #[inline(always)]
    pub fn raise<M: MulAdd>(&mut self, m: f32, scale2: f32) {
        if m > self.m {
            self.z *= super::fastmath::exp2_nonpositive::<M>((self.m - m) * scale2);
            self.m = m;
        }
    }

    /// Adds the chunk `xs`, whose maximum is at most `self.m` (call [`MaxSum::raise`] first),
    /// leaving each entry's `2^((x - m) * scale2)` in `out` (zeros while no finite value has
    /// been seen: then `m = -inf` and only a NaN changes the state).
    #[inline(always)]
    pub fn add<M: MulAdd>(&mut self, xs: &[f32], scale2: f32, out: &mut [f32]) {
        if self.m == NEG_INF {
            if has_nan(xs) {
                self.z = f32::NAN;
            }
            out[..xs.len()].fill(0.0);
        } else {
            self.z += exp2_sum::<M>(xs, self.m, scale2, out);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn f16_conversion_is_exact_for_every_value() {
        for h in 0..=u16::MAX {
            let want = f16::from_bits(h).to_f32();
            let got = f16_bits_to_f32(h);
            if want.is_nan() {
                assert!(got.is_nan(), "{h:#x}");
            } else {
                assert_eq!(got.to_bits(), want.to_bits(), "{h:#x}");
            }
        }
    }

    #[test]
    fn bf16_rounding_matches_half() {
        let mut x = 1u32;
        for _ in 0..2_000_000 {
            x = x.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            let v = f32::from_bits(x);
            let want = bf16::from_f32(v);
            let got = f32_to_bf16_bits(v);
            if v.is_nan() {
                assert!(bf16::from_bits(got).is_nan());
            } else {
                assert_eq!(got, want.to_bits(), "{v:e}");
            }
        }
        for v in [
            f32::MAX,
            f32::INFINITY,
            -f32::INFINITY,
            0.0,
            -0.0,
            1.0 + f32::EPSILON,
        ] {
            assert_eq!(f32_to_bf16_bits(v), bf16::from_f32(v).to_bits(), "{v:e}");
        }
    }
}
