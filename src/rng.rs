//! The crate's one pseudo-random generator: initialization, synthetic corpora, batch offsets,
//! sampling and benchmark inputs. Hand-written rather than taken from a crate so that every
//! stream is bit-identical across versions and platforms: only integer arithmetic is involved.

/// SplitMix64 (Steele, Lea, Flood 2014): one 64-bit state, full period, good enough statistics
/// for sampling documents and window offsets.
#[derive(Debug, Clone)]
pub struct SplitMix64 {
    state: u64,
}

impl SplitMix64 {
    /// A generator whose state is `seed` itself; to seed from several values use
    /// [`SplitMix64::from_parts`].
    pub fn new(seed: u64) -> Self {
        SplitMix64 { state: seed }
    }

    /// A generator whose stream depends on every part, so that e.g. `(seed, step)` pairs never
    /// share a stream the way `seed + step` would.
    pub fn from_parts(parts: &[u64]) -> Self {
        let mut h = 0x6a09_e667_f3bc_c908u64;
        for &p in parts {
            h = SplitMix64::new(h ^ p).next_u64();
        }
        SplitMix64::new(h)
    }

    /// The next 64 uniformly distributed bits.
    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform integer in `[0, n)` for `n > 0` (multiply-high; the bias is below 2^-32 for the
    /// sizes used here).
    pub fn below(&mut self, n: u64) -> u64 {
        debug_assert!(n > 0);
        ((self.next_u64() as u128 * n as u128) >> 64) as u64
    }

    /// Uniform in `[0, 1)`, on the grid of 2^-53.
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Uniform in `(0, 1]` (safe under `ln`).
    pub fn unit(&mut self) -> f64 {
        ((self.next_u64() >> 11) + 1) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// `k` distinct indices from `0..n`, in random order (partial Fisher-Yates).
    pub fn choose(&mut self, n: usize, k: usize) -> Vec<usize> {
        let mut p: Vec<usize> = (0..n).collect();
        let k = k.min(n);
        for i in 0..k {
            let j = i + self.below((n - i) as u64) as usize;
            p.swap(i, j);
        }
        p.truncate(k);
        p
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reference_values() {
        // First outputs of SplitMix64 seeded with 0, as published with the algorithm.
        let mut r = SplitMix64::new(0);
        assert_eq!(r.next_u64(), 0xe220_a839_7b1d_cdaf);
        assert_eq!(r.next_u64(), 0x6e78_9e6a_a1b9_65f4);
    }

    #[test]
    fn below_is_in_range_and_covers_it() {
        let mut r = SplitMix64::new(3);
        let mut seen = [0u32; 7];
        for _ in 0..7000 {
            seen[r.below(7) as usize] += 1;
        }
        assert!(seen.iter().all(|&c| (800..1200).contains(&c)), "{seen:?}");
    }

    #[test]
    fn choose_is_distinct() {
        let mut r = SplitMix64::new(5);
        let mut c = r.choose(50, 20);
        c.sort_unstable();
        c.dedup();
        assert_eq!(c.len(), 20);
        assert!(c.iter().all(|&i| i < 50));
        assert_eq!(r.choose(3, 10).len(), 3);
    }

    #[test]
    fn parts_give_different_streams() {
        let a = SplitMix64::from_parts(&[1, 2]).next_u64();
        let b = SplitMix64::from_parts(&[2, 1]).next_u64();
        let c = SplitMix64::from_parts(&[1, 2]).next_u64();
        assert_ne!(a, b);
        assert_eq!(a, c);
    }
}
