//! Branch-free f32 exponentials and logarithms that LLVM vectorizes when they are inlined into a
//! loop: [`exp2_nonpositive`] and [`log2`], which the hot loops use (the kernels keep their
//! log-probabilities in base 2, folding `log2 e` into the temperature's scale, so an exponential
//! needs no `k ln 2` reduction), and the natural [`exp`] and [`ln`] for the scalar remainder.
//!
//! All are written with the IEEE basic operations, multiply-adds, integer bit manipulation and
//! selects (`if c { a } else { b }` on values, which compile to `blend`/`max`/`min`), never with a
//! table or a branch. Every operation is correctly rounded and Rust never contracts `a * b + c` on
//! its own, so each function is a pure function of its argument: the same bits on every machine,
//! vectorized or scalar. The multiply-adds are a type parameter: [`Fused`] (one rounding, what the
//! AVX2/AVX-512 and aarch64 code uses) or [`Unfused`] (two roundings, for x86_64 CPUs without FMA,
//! where a software `fma` would be slow); the two may differ in the last bit and both meet the
//! bounds below.
//!
//! Error bounds, measured against `f64::exp` / `f64::ln` on every f32 in the stated ranges, for
//! both flavours (tests/fastmath.rs re-checks them on a dense sample and at the special values):
//!
//! - [`exp`]: at most [`EXP_MAX_ULP`] = 2 ulp (measured: 1.63 fused, 1.98 unfused) where the exact
//!   result is a normal f32, i.e. on `[-87.336, 88.722]`; the worst case is just below 1, where
//!   `e^r` near 2 is scaled by 1/2. Results that would be subnormal (x below about -87.3365) are
//!   flushed to +0, an absolute error below `f32::MIN_POSITIVE` = 1.2e-38; `exp(-inf) = 0`;
//!   x above ln(f32::MAX) = 88.7228 gives `+inf`; `exp(NaN) = NaN`; `exp(0) = 1` exactly.
//! - [`ln`]: at most [`LN_MAX_ULP`] = 1.5 ulp (measured: 1.20 fused, 1.23 unfused) on every
//!   positive f32, subnormals included; `ln(1) = 0` exactly, `ln(0) = -inf`, `ln(+inf) = +inf`,
//!   `ln(x < 0) = NaN`, `ln(NaN) = NaN`.
//! - [`exp2_nonpositive`], `2^t` for `t <= 0`: at most [`EXP2_MAX_ULP`] = 1.5 ulp (measured:
//!   0.93 fused, 1.21 unfused) where the exact result is a normal f32, i.e. on `[-126, 0]`;
//!   below, results are flushed to +0 or (within an ulp of -126) the correctly rounded
//!   subnormal; `2^-inf = 0`, `2^NaN = NaN`, `2^0 = 1` exactly. Positive arguments are outside
//!   its domain (every argument in the kernels is `x - max <= 0` scaled, or a difference of
//!   log-probabilities about the larger one).
//! - [`log2`]: at most [`LOG2_MAX_ULP`] = 2.5 ulp (measured: 1.43 fused, 2.37 unfused) on every
//!   positive f32, subnormals included (special values as [`ln`]).

/// `a * b + c`, fused or not: the one operation whose rounding the two flavours choose.
pub trait MulAdd: Copy + Send + Sync + 'static {
    /// `a * b + c`, rounded once ([`Fused`]) or twice ([`Unfused`]).
    fn mul_add(a: f32, b: f32, c: f32) -> f32;
}

/// One rounding (`f32::mul_add`): a single instruction with FMA (x86_64 AVX2/AVX-512 levels,
/// aarch64), a slow but exact library call without.
#[derive(Debug, Clone, Copy)]
pub struct Fused;

/// Two roundings (`a * b` then `+ c`): for x86_64 CPUs without FMA.
#[derive(Debug, Clone, Copy)]
pub struct Unfused;

impl MulAdd for Fused {
    #[inline(always)]
    fn mul_add(a: f32, b: f32, c: f32) -> f32 {
        a.mul_add(b, c)
    }
}

impl MulAdd for Unfused {
    #[inline(always)]
    fn mul_add(a: f32, b: f32, c: f32) -> f32 {
        a * b + c
    }
}

/// The largest error of [`exp`] in ulps of the exact result, where that result is a normal f32.
pub const EXP_MAX_ULP: f64 = 2.0;
/// The largest error of [`ln`] in ulps of the exact result, over every positive f32.
pub const LN_MAX_ULP: f64 = 1.5;
/// The largest error of [`exp2_nonpositive`] in ulps of the exact result, where that result is a
/// normal f32.
pub const EXP2_MAX_ULP: f64 = 1.5;
/// The largest error of [`log2`] in ulps of the exact result, over every positive f32.
pub const LOG2_MAX_ULP: f64 = 2.5;

const LOG2E: f32 = std::f32::consts::LOG2_E;
/// `ln 2 = LN2_HI + LN2_LO`; `LN2_HI = 355 / 512` has 9 significant bits, so `k * LN2_HI` is exact
/// for every exponent `|k| < 2^15` and the reduction `x - k * LN2_HI` loses nothing.
const LN2_HI: f32 = f32::from_bits(0x3f31_8000);
const LN2_LO: f32 = -2.121_944_4e-4;
/// `1.5 * 2^23`: adding it rounds an f32 of magnitude below 2^22 to an integer (to nearest, ties
/// to even) and leaves that integer in the low mantissa bits.
const ROUND_MAGIC: f32 = 12_582_912.0;

/// Arguments are clamped to this range first (NaN passes through): below it the result is 0
/// whatever the argument, above it `+inf`, and inside it the exponent `k` stays in `[-128, 128]`.
const EXP_LO: f32 = -88.0;
const EXP_HI: f32 = 89.0;

// Minimax coefficients (Remez, relative error 5.5e-9 in exact arithmetic) of
// e^r ~ 1 + r (c1 + r (c2 + ... + r c6)) on r in [-0.02, 0.71], rounded to f32.
const EXP_C1: f32 = f32::from_bits(0x3f80_0002);
const EXP_C2: f32 = f32::from_bits(0x3eff_ffb7);
const EXP_C3: f32 = f32::from_bits(0x3e2a_a8db);
const EXP_C4: f32 = f32::from_bits(0x3d2b_2147);
const EXP_C5: f32 = f32::from_bits(0x3c02_6b35);
const EXP_C6: f32 = f32::from_bits(0x3af5_405d);

/// `e^x` in f32 (see the module documentation for the error bound and the special values).
///
/// Range reduction `x = k ln 2 + r` with `k = floor(x log2 e)` (so `r` is in `[0, ln 2)` and
/// `e^r` in `[1, 2)`), a degree-6 polynomial for `e^r`, and the result `e^r * 2^k` with `2^k`
/// built from its exponent bits: `k = -127` and below give the factor 0 (flush), `k = 128` gives
/// `+inf` (overflow). Floor rather than round-to-nearest keeps `k <= 127` for every finite
/// result, so one scale factor suffices.
#[inline(always)]
pub fn exp<M: MulAdd>(x: f32) -> f32 {
    // Selects keep NaN (a NaN compares false); they compile to maxps/minps with NaN-safe order.
    let x = if x < EXP_LO { EXP_LO } else { x };
    let x = if x > EXP_HI { EXP_HI } else { x };
    // floor(x log2 e) as round-to-nearest of (x log2 e - 1/2), with the integer in `tm`'s bits.
    let tm = M::mul_add(x, LOG2E, -0.5) + ROUND_MAGIC;
    let k = tm - ROUND_MAGIC;
    let r = M::mul_add(k, -LN2_HI, x);
    let r = M::mul_add(k, -LN2_LO, r);
    let p = M::mul_add(r, EXP_C6, EXP_C5);
    let p = M::mul_add(r, p, EXP_C4);
    let p = M::mul_add(r, p, EXP_C3);
    let p = M::mul_add(r, p, EXP_C2);
    let p = M::mul_add(r, p, EXP_C1);
    let p = M::mul_add(r, p, 1.0);
    // Biased exponent k + 127, in [-1, 255] for the clamped range; below 1 the factor is 0.
    let biased = (tm.to_bits() as i32).wrapping_sub(ROUND_MAGIC.to_bits() as i32 - 127);
    let biased = if biased < 0 { 0 } else { biased };
    // For NaN `biased` is garbage, but NaN times any factor is NaN.
    p * f32::from_bits((biased as u32) << 23)
}

// Minimax coefficients (Remez, relative error 3.5e-8 in exact arithmetic) of
// ln(1 + f) ~ f - f^2 / 2 + f^3 (c3 + f (c4 + ... + f c9)) on f in [sqrt(1/2) - 1, sqrt(2) - 1].
const LN_C3: f32 = f32::from_bits(0x3eaa_ab98);
const LN_C4: f32 = f32::from_bits(0xbe80_0102);
const LN_C5: f32 = f32::from_bits(0x3e4c_5c6e);
const LN_C6: f32 = f32::from_bits(0xbe29_ee3a);
const LN_C7: f32 = f32::from_bits(0x3e19_a058);
const LN_C8: f32 = f32::from_bits(0xbe10_dc6b);
const LN_C9: f32 = f32::from_bits(0x3da9_3546);
/// Bits of sqrt(1/2): subtracting them splits `x = 2^e m` with `m` in `[sqrt(1/2), sqrt(2))`.
const SQRT_HALF_BITS: i32 = 0x3f35_04f3;

/// `ln x` in f32 (see the module documentation for the error bound and the special values).
///
/// `x = 2^e m` with `m` in `[sqrt(1/2), sqrt(2))` read off the bits (subnormals are first scaled
/// by 2^23), `ln x = e ln 2 + ln(1 + f)` with `f = m - 1` (exact), a degree-9 polynomial for
/// `ln(1 + f)`, and `e ln 2` split in two so that its rounding does not show.
#[inline(always)]
pub fn ln<M: MulAdd>(x: f32) -> f32 {
    let tiny = x < f32::MIN_POSITIVE; // subnormal, zero, negative (and handled below)
    let xs = if tiny { x * 8_388_608.0 } else { x };
    let bias = if tiny { 23.0 } else { 0.0 };
    let ix = (xs.to_bits() as i32).wrapping_sub(SQRT_HALF_BITS);
    let e = (ix >> 23) as f32 - bias;
    let m = f32::from_bits(((ix & 0x007f_ffff) + SQRT_HALF_BITS) as u32);
    let f = m - 1.0;
    let p = M::mul_add(f, LN_C9, LN_C8);
    let p = M::mul_add(f, p, LN_C7);
    let p = M::mul_add(f, p, LN_C6);
    let p = M::mul_add(f, p, LN_C5);
    let p = M::mul_add(f, p, LN_C4);
    let p = M::mul_add(f, p, LN_C3);
    let f2 = f * f;
    let y = M::mul_add(f2 * f, p, M::mul_add(e, LN2_LO, -0.5 * f2));
    let r = M::mul_add(e, LN2_HI, f + y);
    let r = if x == f32::INFINITY { x } else { r };
    let r = if x == 0.0 { f32::NEG_INFINITY } else { r };
    // Negative and NaN arguments: NaN.
    if x >= 0.0 {
        r
    } else {
        f32::NAN
    }
}

// Minimax coefficients of 2^r ~ 1 + r (d1 + r (d2 + ... + r d6)) on r in [-1/2, 1/2], rounded to
// f32 (relative error below 1e-8 in exact arithmetic).
const EXP2_D1: f32 = f32::from_bits(0x3f31_7219);
const EXP2_D2: f32 = f32::from_bits(0x3e75_fdf0);
const EXP2_D3: f32 = f32::from_bits(0x3d63_5716);
const EXP2_D4: f32 = f32::from_bits(0x3c1d_94f2);
const EXP2_D5: f32 = f32::from_bits(0x3aaf_c47f);
const EXP2_D6: f32 = f32::from_bits(0x3922_363f);

/// `2^t` for `t <= 0`, `-inf` or NaN (see the module documentation for the bound; positive
/// arguments are outside the domain and give unspecified results).
///
/// `t = k + r` with `k = round(t)` (to nearest, read off the low bits of `t + 1.5 * 2^23 + 127`)
/// and `r = t - k` in `[-1/2, 1/2]` (exact), a degree-6 polynomial for `2^r` in `[0.71, 1.42]`,
/// and `2^k` built from its exponent bits. Clamping `t` at -127 first keeps the biased exponent
/// `k + 127` in `[0, 127]`, so the low bits of the rounded sum shifted into the exponent field
/// are `2^k` as they are (`k = -127` gives the factor 0: the flush), with no integer add or
/// clamp: the hot loops are bound by the number of vector operations, and this is 12 where
/// [`exp`] takes 17.
#[inline(always)]
pub fn exp2_nonpositive<M: MulAdd>(t: f32) -> f32 {
    // Keeps NaN; at -127 and below every result is 0.
    let t = if t < -127.0 { -127.0 } else { t };
    let tm = t + EXP2_ROUND_MAGIC;
    let k = tm - EXP2_ROUND_MAGIC;
    let r = t - k;
    let p = M::mul_add(r, EXP2_D6, EXP2_D5);
    let p = M::mul_add(r, p, EXP2_D4);
    let p = M::mul_add(r, p, EXP2_D3);
    let p = M::mul_add(r, p, EXP2_D2);
    let p = M::mul_add(r, p, EXP2_D1);
    let p = M::mul_add(r, p, 1.0);
    // `tm` is in [2^23, 2^24) with mantissa bits 2^22 + 127 + k: shifted by 23, the bits above
    // the exponent field fall off and `(k + 127) << 23` is left. For NaN the factor is garbage,
    // but NaN times any factor is NaN.
    p * f32::from_bits(tm.to_bits() << 23)
}

/// `1.5 * 2^23 + 127`: adding it to `t` in `[-127, 0]` rounds `t` to an integer `k` (to nearest,
/// ties to even of the sum) and leaves `2^22 + 127 + k` in the mantissa bits.
const EXP2_ROUND_MAGIC: f32 = 12_583_039.0;

/// [`log2`] without the special cases, for `x` a positive normal f32 (or NaN, which stays NaN):
/// the JSD's `log2(beta + (1 - beta) 2^(lo - hi))`, whose argument is in `[min(beta, 1 - beta),
/// 1]`. The same bits as [`log2`] there, in 8 fewer operations.
#[inline(always)]
pub fn log2_normal<M: MulAdd>(x: f32) -> f32 {
    let ix = (x.to_bits() as i32).wrapping_sub(SQRT_HALF_BITS);
    let e = (ix >> 23) as f32;
    let m = f32::from_bits(((ix & 0x007f_ffff) + SQRT_HALF_BITS) as u32);
    let r = log2_reduced::<M>(m - 1.0, e);
    if x.is_nan() {
        x
    } else {
        r
    }
}

/// `e + log2(1 + f)` for the reduced argument (see [`log2`]).
#[inline(always)]
fn log2_reduced<M: MulAdd>(f: f32, e: f32) -> f32 {
    // The polynomial c3 + f c4 + ... + f^6 c9 in three independent pieces joined by f^2 and f^4
    // rather than one Horner chain: the JSD loop that takes this logarithm is bound by the
    // latency of its dependency chain (measured 17% faster for the logarithm alone), and the
    // error stays within the bound (tests/fastmath.rs).
    let f2 = f * f;
    let lo = M::mul_add(f, LN_C4, LN_C3);
    let mid = M::mul_add(f, LN_C6, LN_C5);
    let hi = M::mul_add(f, LN_C9, LN_C8);
    let hi = M::mul_add(f, hi, LN_C7);
    let f4 = f2 * f2;
    let lo = M::mul_add(f2, mid, lo);
    let p = M::mul_add(f4, hi, lo);
    let y = M::mul_add(f2 * f, p, -0.5 * f2);
    let u = M::mul_add(y, LOG2E_HI, f * LOG2E_LO);
    M::mul_add(f, LOG2E_HI, u) + e
}

/// `log2 e = LOG2E_HI + LOG2E_LO`.
const LOG2E_HI: f32 = std::f32::consts::LOG2_E;
const LOG2E_LO: f32 = 1.925_963e-8;

/// `log2 x` in f32 (see the module documentation for the bound and the special values): [`ln`]'s
/// reduction and polynomial, `ln(1 + f) = f + y`, scaled by `log2 e` in two parts so that the
/// leading `f log2 e` is rounded once: `e + (f LOG2E_HI + (f LOG2E_LO + y log2 e))`.
#[inline(always)]
pub fn log2<M: MulAdd>(x: f32) -> f32 {
    let tiny = x < f32::MIN_POSITIVE;
    let xs = if tiny { x * 8_388_608.0 } else { x };
    let bias = if tiny { 23.0 } else { 0.0 };
    let ix = (xs.to_bits() as i32).wrapping_sub(SQRT_HALF_BITS);
    let e = (ix >> 23) as f32 - bias;
    let m = f32::from_bits(((ix & 0x007f_ffff) + SQRT_HALF_BITS) as u32);
    let r = log2_reduced::<M>(m - 1.0, e);
    let r = if x == f32::INFINITY { x } else { r };
    let r = if x == 0.0 { f32::NEG_INFINITY } else { r };
    if x >= 0.0 {
        r
    } else {
        f32::NAN
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exact_values<M: MulAdd>() {
        assert_eq!(exp::<M>(0.0).to_bits(), 1.0f32.to_bits());
        assert_eq!(exp::<M>(-0.0).to_bits(), 1.0f32.to_bits());
        assert_eq!(exp::<M>(f32::NEG_INFINITY).to_bits(), 0);
        assert_eq!(exp::<M>(f32::INFINITY), f32::INFINITY);
        assert!(exp::<M>(f32::NAN).is_nan());
        assert_eq!(ln::<M>(1.0).to_bits(), 0);
        assert_eq!(ln::<M>(0.0), f32::NEG_INFINITY);
        assert_eq!(ln::<M>(-0.0), f32::NEG_INFINITY);
        assert_eq!(ln::<M>(f32::INFINITY), f32::INFINITY);
        assert!(ln::<M>(-1.0).is_nan());
        assert!(ln::<M>(f32::NAN).is_nan());
        assert_eq!(exp2_nonpositive::<M>(0.0).to_bits(), 1.0f32.to_bits());
        assert_eq!(exp2_nonpositive::<M>(-0.0).to_bits(), 1.0f32.to_bits());
        assert_eq!(exp2_nonpositive::<M>(f32::NEG_INFINITY).to_bits(), 0);
        assert!(exp2_nonpositive::<M>(f32::NAN).is_nan());
        assert_eq!(log2::<M>(1.0).to_bits(), 0);
        assert_eq!(log2::<M>(0.0), f32::NEG_INFINITY);
        assert!(log2::<M>(-1.0).is_nan());
    }

    #[test]
    fn exact_values_fused_and_unfused() {
        exact_values::<Fused>();
        exact_values::<Unfused>();
    }
}
