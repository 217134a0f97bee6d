//! The CPU backend's vectorizable `exp2_nonpositive`, `log2`, `exp` and `ln`
//! (`distill_kernels::cpu::fastmath`) against the f64 library functions, for both multiply-add
//! flavours (fused: the AVX2/AVX-512/aarch64 code; unfused: x86_64 without FMA).
//!
//! The bounds asserted are the documented ones ([`EXP2_MAX_ULP`], [`LOG2_MAX_ULP`],
//! [`EXP_MAX_ULP`], [`LN_MAX_ULP`]), measured on every f32 of the ranges (fused / unfused: exp2
//! 0.93 / 1.21 ulp, log2 1.41 / 2.37, exp 1.63 / 1.98, ln 1.20 / 1.23); here a dense sample
//! (every 61st f32 bit pattern, tens of millions of values per function and flavour) plus the
//! edges and special values is checked, and the worst error found is printed
//! (`cargo test --release --test fastmath -- --nocapture`).

use distill_kernels::cpu::fastmath::{
    exp, exp2_nonpositive, ln, log2, log2_normal, Fused, MulAdd, Unfused, EXP2_MAX_ULP,
    EXP_MAX_ULP, LN_MAX_ULP, LOG2_MAX_ULP,
};

/// The exact value's ulp as an f32 (normal range; the subnormal spacing below it).
fn ulp_of(exact: f64) -> f64 {
    let e = exact.abs().log2().floor() as i32;
    2f64.powi(e.max(-126) - 23)
}

/// Every `stride`-th f32 bit pattern with value in `[lo, hi]` (both signs walked separately),
/// plus `lo` and `hi`.
fn sample(lo: f32, hi: f32, stride: u32) -> impl Iterator<Item = f32> {
    let pos = (0..0x7f80_0000u32)
        .step_by(stride as usize)
        .map(f32::from_bits);
    let neg = (0..0x7f80_0000u32)
        .step_by(stride as usize)
        .map(|b| f32::from_bits(b | 0x8000_0000));
    pos.chain(neg)
        .filter(move |x| (lo..=hi).contains(x))
        .chain([lo, hi])
}

/// ln(f32::MAX): above it e^x overflows.
const LN_F32_MAX: f64 = 88.722_839_052_068_35;
/// ln(f32::MIN_POSITIVE): below it e^x is subnormal (and flushed to 0).
const LN_F32_MIN_NORMAL: f64 = -87.336_544_750_553_1;

struct Worst {
    ulp: f64,
    at: f32,
}

fn check_exp<M: MulAdd>(name: &str) -> Worst {
    let mut worst = Worst { ulp: 0.0, at: 0.0 };
    for x in sample(-104.0, 88.7, 61) {
        let got = exp::<M>(x);
        let want = (x as f64).exp();
        if want < f32::MIN_POSITIVE as f64 {
            // Flushed: 0, or (within the rounding of the range reduction) the exact value.
            assert!(
                got == 0.0 || (got as f64 - want).abs() <= f32::MIN_POSITIVE as f64,
                "{name} exp({x:e}) = {got:e}, exact {want:e}"
            );
            continue;
        }
        let ulp = (got as f64 - want).abs() / ulp_of(want);
        assert!(
            ulp <= EXP_MAX_ULP,
            "{name} exp({x:e}) = {got:e}, exact {want:e}: {ulp:.3} ulp"
        );
        if ulp > worst.ulp {
            worst = Worst { ulp, at: x };
        }
    }
    // The edges of the normal range, bit by bit.
    for x in [LN_F32_MIN_NORMAL as f32, LN_F32_MAX as f32] {
        for offset in -500i32..=500 {
            let v = f32::from_bits(x.to_bits().wrapping_add_signed(offset));
            let got = exp::<M>(v) as f64;
            let want = (v as f64).exp();
            if want > f32::MAX as f64 {
                assert_eq!(got, f64::INFINITY, "{name} exp({v:e}) overflows");
            } else if want >= f32::MIN_POSITIVE as f64 && got.is_finite() {
                assert!(
                    (got - want).abs() / ulp_of(want) <= EXP_MAX_ULP,
                    "{name} exp({v:e})"
                );
            } else {
                // Within an ulp of the thresholds: 0 below, inf above, or the value.
                assert!(
                    got == 0.0
                        || got == f64::INFINITY
                        || (got - want).abs() <= f32::MIN_POSITIVE as f64,
                    "{name} exp({v:e}) = {got:e}, exact {want:e}"
                );
            }
        }
    }
    worst
}

fn check_exp_specials<M: MulAdd>(name: &str) {
    let zero_bits = 0.0f32.to_bits();
    for x in [
        f32::NEG_INFINITY,
        -f32::MAX,
        -1e30,
        -1e4,
        -200.0,
        -104.0,
        -103.98,
        -88.0,
    ] {
        assert_eq!(exp::<M>(x).to_bits(), zero_bits, "{name} exp({x:e}) is +0");
    }
    for x in [f32::INFINITY, f32::MAX, 1e30, 1e4, 200.0, 89.0, 88.73] {
        assert_eq!(exp::<M>(x), f32::INFINITY, "{name} exp({x:e}) is +inf");
    }
    assert!(exp::<M>(f32::NAN).is_nan(), "{name} exp(NaN)");
    assert!(exp::<M>(-f32::NAN).is_nan(), "{name} exp(-NaN)");
    // NaN with a payload stays NaN (the exponent bits are rebuilt from garbage there).
    assert!(exp::<M>(f32::from_bits(0x7fc0_1234)).is_nan(), "{name}");
    assert!(exp::<M>(f32::from_bits(0xffa0_0001)).is_nan(), "{name}");
    assert_eq!(exp::<M>(0.0), 1.0, "{name} exp(0) is exactly 1");
    assert_eq!(exp::<M>(-0.0), 1.0, "{name} exp(-0) is exactly 1");
    // Monotone across the range-reduction boundaries k ln 2.
    for k in (-120..=127).filter(|&k| k != 0) {
        let x = (k as f32) * std::f32::consts::LN_2;
        let (below, at, above) = (
            exp::<M>(f32::from_bits(x.to_bits().wrapping_sub(1))),
            exp::<M>(x),
            exp::<M>(f32::from_bits(x.to_bits().wrapping_add(1))),
        );
        let (lo, hi) = if x < 0.0 {
            (above, below)
        } else {
            (below, above)
        };
        assert!(lo <= at && at <= hi, "{name} exp not monotone at {k} ln 2");
    }
}

fn check_ln<M: MulAdd>(name: &str) -> Worst {
    let mut worst = Worst { ulp: 0.0, at: 0.0 };
    // Every positive finite f32 class: subnormals, normals, up to f32::MAX.
    let positives = (1..0x7f80_0000u32).step_by(61).map(f32::from_bits).chain([
        f32::from_bits(1),
        f32::from_bits(0x007f_ffff),
        f32::MIN_POSITIVE,
        f32::MAX,
        1.0 - f32::EPSILON / 2.0,
        1.0 + f32::EPSILON,
        std::f32::consts::FRAC_1_SQRT_2,
        std::f32::consts::SQRT_2,
    ]);
    for x in positives {
        let got = ln::<M>(x);
        let want = (x as f64).ln();
        if want == 0.0 {
            assert_eq!(got, 0.0, "{name} ln(1)");
            continue;
        }
        let ulp = (got as f64 - want).abs() / ulp_of(want);
        assert!(
            ulp <= LN_MAX_ULP,
            "{name} ln({x:e}) = {got:e}, exact {want:e}: {ulp:.3} ulp"
        );
        if ulp > worst.ulp {
            worst = Worst { ulp, at: x };
        }
    }
    worst
}

fn check_ln_specials<M: MulAdd>(name: &str) {
    assert_eq!(ln::<M>(1.0).to_bits(), 0, "{name} ln(1) is exactly +0");
    assert_eq!(ln::<M>(0.0), f32::NEG_INFINITY, "{name} ln(0)");
    assert_eq!(ln::<M>(-0.0), f32::NEG_INFINITY, "{name} ln(-0)");
    assert_eq!(ln::<M>(f32::INFINITY), f32::INFINITY, "{name} ln(inf)");
    for x in [
        -1.0,
        -f32::MIN_POSITIVE,
        -f32::from_bits(1),
        -f32::MAX,
        f32::NEG_INFINITY,
        f32::NAN,
        -f32::NAN,
        f32::from_bits(0x7fc0_1234),
    ] {
        assert!(ln::<M>(x).is_nan(), "{name} ln({x:e}) is NaN");
    }
    // ln and exp are inverse to within the bounds.
    for x in [-80.0f32, -10.0, -1.0, -1e-3, 1e-3, 1.0, 10.0, 80.0] {
        let back = ln::<M>(exp::<M>(x));
        assert!(
            (back - x).abs() <= 4e-7 * x.abs().max(1.0),
            "{name} ln(exp({x}))"
        );
    }
}

fn check_exp2<M: MulAdd>(name: &str) -> Worst {
    let mut worst = Worst { ulp: 0.0, at: 0.0 };
    for t in sample(-160.0, 0.0, 61).chain([-126.0, -125.5, -126.5, -127.0, -149.0, -150.0]) {
        let got = exp2_nonpositive::<M>(t);
        let want = (t as f64).exp2();
        if want < f32::MIN_POSITIVE as f64 {
            // Flushed to 0, or near -126 the correctly rounded subnormal.
            assert!(
                got == 0.0 || (got as f64 - want).abs() <= 2f64.powi(-149),
                "{name} exp2({t:e}) = {got:e}, exact {want:e}"
            );
            continue;
        }
        let ulp = (got as f64 - want).abs() / ulp_of(want);
        assert!(
            ulp <= EXP2_MAX_ULP,
            "{name} exp2({t:e}) = {got:e}, exact {want:e}: {ulp:.3} ulp"
        );
        if ulp > worst.ulp {
            worst = Worst { ulp, at: t };
        }
    }
    let zero_bits = 0.0f32.to_bits();
    for t in [
        f32::NEG_INFINITY,
        -f32::MAX,
        -1e30,
        -1e4,
        -200.0,
        -128.0,
        -127.5,
    ] {
        assert_eq!(
            exp2_nonpositive::<M>(t).to_bits(),
            zero_bits,
            "{name} exp2({t:e}) is +0"
        );
    }
    assert!(exp2_nonpositive::<M>(f32::NAN).is_nan(), "{name} exp2(NaN)");
    assert!(
        exp2_nonpositive::<M>(f32::from_bits(0xffa0_0001)).is_nan(),
        "{name} exp2(-NaN with payload)"
    );
    assert_eq!(
        exp2_nonpositive::<M>(0.0),
        1.0,
        "{name} exp2(0) is exactly 1"
    );
    assert_eq!(
        exp2_nonpositive::<M>(-0.0),
        1.0,
        "{name} exp2(-0) is exactly 1"
    );
    for k in 1..126 {
        assert_eq!(
            exp2_nonpositive::<M>(-(k as f32)),
            2f32.powi(-k),
            "{name} 2^-{k} exactly"
        );
    }
    worst
}

fn check_log2<M: MulAdd>(name: &str) -> Worst {
    let mut worst = Worst { ulp: 0.0, at: 0.0 };
    let positives = (1..0x7f80_0000u32).step_by(61).map(f32::from_bits).chain([
        f32::from_bits(1),
        f32::MIN_POSITIVE,
        f32::MAX,
        1.0 + f32::EPSILON,
    ]);
    for x in positives {
        let got = log2::<M>(x);
        if x >= f32::MIN_POSITIVE {
            assert_eq!(
                got.to_bits(),
                log2_normal::<M>(x).to_bits(),
                "{name} log2_normal({x:e})"
            );
        }
        let want = (x as f64).log2();
        if want == 0.0 {
            assert_eq!(got, 0.0, "{name} log2(1)");
            continue;
        }
        let ulp = (got as f64 - want).abs() / ulp_of(want);
        assert!(
            ulp <= LOG2_MAX_ULP,
            "{name} log2({x:e}) = {got:e}, exact {want:e}: {ulp:.3} ulp"
        );
        if ulp > worst.ulp {
            worst = Worst { ulp, at: x };
        }
    }
    assert_eq!(log2::<M>(1.0).to_bits(), 0, "{name} log2(1) is exactly +0");
    assert_eq!(log2::<M>(0.0), f32::NEG_INFINITY, "{name} log2(0)");
    assert_eq!(log2::<M>(-0.0), f32::NEG_INFINITY, "{name} log2(-0)");
    assert_eq!(log2::<M>(f32::INFINITY), f32::INFINITY, "{name} log2(inf)");
    for x in [
        -1.0,
        -f32::from_bits(1),
        f32::NEG_INFINITY,
        f32::NAN,
        -f32::NAN,
    ] {
        assert!(log2::<M>(x).is_nan(), "{name} log2({x:e}) is NaN");
    }
    for k in -149i32..128 {
        let x = if k >= -126 {
            f32::from_bits(((k + 127) as u32) << 23)
        } else {
            f32::from_bits(1 << (k + 149))
        };
        assert_eq!(log2::<M>(x), k as f32, "{name} log2(2^{k}) exactly");
    }
    worst
}

#[test]
fn exp2_is_within_its_bound() {
    let f = check_exp2::<Fused>("fused");
    let u = check_exp2::<Unfused>("unfused");
    println!(
        "exp2_nonpositive: worst {:.3} ulp at {:e} fused, {:.3} ulp at {:e} unfused",
        f.ulp, f.at, u.ulp, u.at
    );
}

#[test]
fn log2_is_within_its_bound() {
    let f = check_log2::<Fused>("fused");
    let u = check_log2::<Unfused>("unfused");
    println!(
        "log2: worst {:.3} ulp at {:e} fused, {:.3} ulp at {:e} unfused",
        f.ulp, f.at, u.ulp, u.at
    );
}

#[test]
fn exp_is_within_its_bound_fused() {
    let w = check_exp::<Fused>("fused");
    check_exp_specials::<Fused>("fused");
    println!("exp fused: worst {:.3} ulp at {:e}", w.ulp, w.at);
}

#[test]
fn exp_is_within_its_bound_unfused() {
    let w = check_exp::<Unfused>("unfused");
    check_exp_specials::<Unfused>("unfused");
    println!("exp unfused: worst {:.3} ulp at {:e}", w.ulp, w.at);
}

#[test]
fn ln_is_within_its_bound_fused() {
    let w = check_ln::<Fused>("fused");
    check_ln_specials::<Fused>("fused");
    println!("ln fused: worst {:.3} ulp at {:e}", w.ulp, w.at);
}

#[test]
fn ln_is_within_its_bound_unfused() {
    let w = check_ln::<Unfused>("unfused");
    check_ln_specials::<Unfused>("unfused");
    println!("ln unfused: worst {:.3} ulp at {:e}", w.ulp, w.at);
}
