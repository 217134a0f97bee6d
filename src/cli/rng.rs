//! A small deterministic generator for `distill example`: splitmix64 for the bits, Marsaglia's
//! polar form of Box-Muller for normals, and a logarithm built from IEEE-754 `+ - * /` only, so
//! the generated file is bit-identical on every machine (platform `ln` may differ by an ulp).

pub use distill_kernels::rng::SplitMix64;

/// What `distill example` and the benchmarks draw beyond the crate generator's integers.
pub trait Draw {
    /// Uniform integer in `[0, n)`, `n > 0`.
    fn index(&mut self, n: usize) -> usize;
    /// Standard normal (polar Box-Muller; the second value of each pair is dropped for
    /// simplicity).
    fn normal(&mut self) -> f64;
    /// A uniformly random permutation of `0..n` (Fisher-Yates).
    fn permutation(&mut self, n: usize) -> Vec<usize>;
}

impl Draw for SplitMix64 {
    fn index(&mut self, n: usize) -> usize {
        self.below(n as u64) as usize
    }

    fn normal(&mut self) -> f64 {
        loop {
            let u = 2.0 * self.uniform() - 1.0;
            let v = 2.0 * self.uniform() - 1.0;
            let s = u * u + v * v;
            if s > 0.0 && s < 1.0 {
                // sqrt is correctly rounded by IEEE-754, hence deterministic.
                return u * (-2.0 * ln(s) / s).sqrt();
            }
        }
    }

    fn permutation(&mut self, n: usize) -> Vec<usize> {
        let mut p: Vec<usize> = (0..n).collect();
        for i in (1..n).rev() {
            let j = self.index(i + 1);
            p.swap(i, j);
        }
        p
    }
}

/// Natural logarithm of a finite `x > 0`, from basic arithmetic only (deterministic everywhere):
/// `x = m 2^e` with `m` in `[sqrt(1/2), sqrt(2))`, `ln x = e ln 2 + 2 atanh((m - 1) / (m + 1))`.
/// Accurate to a few ulp, which is all a synthetic data generator needs.
pub fn ln(x: f64) -> f64 {
    if x.is_nan() || x < 0.0 {
        return f64::NAN;
    }
    if x == 0.0 {
        return f64::NEG_INFINITY;
    }
    if x.is_infinite() {
        return f64::INFINITY;
    }
    let (mut x, mut e) = (x, 0i64);
    if x < f64::MIN_POSITIVE {
        // Subnormal: scale into the normal range first.
        x *= (1u64 << 54) as f64;
        e -= 54;
    }
    let bits = x.to_bits();
    e += ((bits >> 52) & 0x7ff) as i64 - 1023;
    let mut m = f64::from_bits((bits & 0x000f_ffff_ffff_ffff) | 0x3ff0_0000_0000_0000);
    if m > std::f64::consts::SQRT_2 {
        m *= 0.5;
        e += 1;
    }
    // |f| <= 0.1716: the odd series converges to below 1e-17 within 12 terms.
    let f = (m - 1.0) / (m + 1.0);
    let f2 = f * f;
    let mut term = f;
    let mut sum = 0.0;
    let mut k = 1.0;
    while k < 40.0 {
        sum += term / k;
        term *= f2;
        k += 2.0;
    }
    e as f64 * std::f64::consts::LN_2 + 2.0 * sum
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ln_matches_std() {
        for &x in &[
            1e-300, 1e-10, 0.1, 0.5, 0.7, 0.75, 1.0, 1.5, 2.0, 3.0, 10.0, 1e10, 1e300,
        ] {
            let (a, b) = (ln(x), f64::ln(x));
            assert!(
                (a - b).abs() <= 4.0 * f64::EPSILON * b.abs().max(1.0),
                "{x}: {a} vs {b}"
            );
        }
        assert_eq!(ln(1.0), 0.0);
    }

    #[test]
    fn normal_moments() {
        let mut r = SplitMix64::new(7);
        let n = 20000;
        let xs: Vec<f64> = (0..n).map(|_| r.normal()).collect();
        let mean = xs.iter().sum::<f64>() / n as f64;
        let var = xs.iter().map(|x| (x - mean) * (x - mean)).sum::<f64>() / n as f64;
        assert!(mean.abs() < 0.03, "{mean}");
        assert!((var - 1.0).abs() < 0.05, "{var}");
    }
}
