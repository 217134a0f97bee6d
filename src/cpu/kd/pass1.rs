//! Pass 1 of the fused loss (see the parent module): the online row statistics and the
//! chunks of exponentials kept in the scratch.

use super::*;

/// The row statistics of pass 1 (exponentials are computed as `2^(d log2 e / T)`).
pub(super) struct Stats {
    /// Raw maximum of the student logits (`max(s / T) = max(s) / T`).
    pub(super) ms: f32,
    /// `sum exp((s - ms) / T)` (soft loss on).
    pub(super) zs: f32,
    /// `sum exp(s - ms)` (hard loss on).
    pub(super) z1: f32,
    pub(super) t: MaxSum,
    /// Forward KL: `sum exp(tc) (tc - sc)`; reverse KL: `sum exp(sc) (sc - tc)` (see the module
    /// documentation), with `sc`, `tc` in base-2 units (`(s - ms) log2 e / T`).
    pub(super) sd: f32,
    /// A positive probability of the KL's weighting side against a `-inf` of the other side (the
    /// KL is `+inf`): a teacher entry against a student `-inf` (forward), or the reverse.
    pub(super) hole: bool,
}

#[inline(always)]
fn larger(a: f32, b: f32) -> f32 {
    if b > a {
        b
    } else {
        a
    }
}

#[inline(always)]
pub(super) fn pass1<M: MulAdd>(
    p: &KdParams,
    hard: bool,
    s: HostSlice,
    t: HostSlice,
    sc: &mut Scratch,
) -> Stats {
    let s2 = p.scale2;
    let soft = !matches!(p.soft, Soft::Off);
    let forward = matches!(p.soft, Soft::ForwardKl);
    let reverse = matches!(p.soft, Soft::ReverseKl);
    // What the student's chunk sums add to z1 (see `z1_term`): nothing (no hard loss, or T = 1
    // where z1 is z_s), its own exponentials (1), or powers of the soft ones (2..=4).
    let z1_mode = match (hard, p.hard_mode) {
        (false, _) | (true, HardMode::Pow(1)) => 0,
        (true, HardMode::Exp) => 1,
        (true, HardMode::Pow(n)) => n,
    };
    let mut st = Stats {
        ms: NEG_INF,
        zs: 0.0,
        z1: 0.0,
        t: MaxSum::EMPTY,
        sd: 0.0,
        hole: false,
    };
    let (mut bs, mut bt) = ([0.0f32; CHUNK], [0.0f32; CHUNK]);
    let (mut tmp, mut terms, mut et_tmp) = ([0.0f32; CHUNK], [0.0f32; CHUNK], [0.0f32; CHUNK]);
    let n = s.len();
    for c in 0..n.div_ceil(CHUNK) {
        let range = c * CHUNK..((c + 1) * CHUNK).min(n);
        let next = range.end..range.end + CHUNK;
        simd::prefetch(s, next.clone());
        if soft {
            simd::prefetch(t, next);
        }
        let xs = widen(s, range.clone(), &mut bs, NEG_INF);
        let ms = larger(st.ms, simd::max(xs));
        let ys: &[f32] = if soft {
            widen(t, range, &mut bt, NEG_INF)
        } else {
            &[]
        };
        if soft {
            let mt = larger(st.t.m, simd::max(ys));
            if (forward || reverse) && (ms > st.ms || mt > st.t.m) {
                // The KL's weighting side `w` (the teacher for forward KL, the student for
                // reverse) and the other side `o`, old maxima and new: every recorded
                // `w_c - o_c` moves by -shift, every weight exp(w_c) by exp(m_w - m_w').
                let ((zw, mw, mw_new), (mo, mo_new)) = if forward {
                    ((st.t.z, st.t.m, mt), (st.ms, ms))
                } else {
                    ((st.zs, st.ms, ms), (st.t.m, mt))
                };
                if zw != 0.0 {
                    let shift = ((mw_new - mw) - (mo_new - mo)) * s2;
                    st.sd = (st.sd - shift * zw) * exp2::<M>((mw - mw_new) * s2);
                }
            }
            st.t.raise::<M>(mt, s2);
            // Reverse KL's pass 2 needs no teacher probability: its slot keeps log ratios.
            let et = if reverse {
                &mut et_tmp[..]
            } else {
                slot(sc.et, c)
            };
            st.t.add::<M>(ys, s2, et);
            sc.mt[c] = st.t.m;
        }
        if ms > st.ms {
            // The same arithmetic as MaxSum::raise, so identical inputs give identical sums.
            st.zs *= exp2::<M>((st.ms - ms) * s2);
            st.z1 *= exp2::<M>((st.ms - ms) * LOG2_E);
            st.ms = ms;
        }
        sc.ms[c] = st.ms;
        let es = slot(sc.es, c);
        if st.ms == NEG_INF {
            if simd::has_nan(xs) {
                (st.zs, st.z1) = (f32::NAN, f32::NAN);
            }
            // Only -inf so far: a teacher entry above -inf is a forward-KL hole, and reverse
            // KL's log ratios are -inf (zero gradient).
            if forward && ys.iter().any(|&y| y > NEG_INF) {
                st.hole = true;
            }
            if reverse {
                slot(sc.et, c).fill(NEG_INF);
            }
            es.fill(0.0);
            continue;
        }
        if reverse {
            let d = slot(sc.et, c);
            let c = with_const!(z1_mode, Z1, {
                rkl_sums::<M, Z1>(xs, ys, st.ms, st.t.m, s2, es, d, &mut tmp, &mut terms)
            });
            st.zs += c.z;
            st.z1 += c.z1;
            st.sd += c.sd;
            st.hole |= c.hole;
        } else if forward {
            let (z, z1) = with_const!(z1_mode, Z1, exp_sums::<M, Z1>(xs, st.ms, s2, es, &mut tmp));
            st.zs += z;
            st.z1 += z1;
            let (sd, hole) = fkl_sums(xs, ys, slot(sc.et, c), st.ms, st.t.m, s2, &mut terms);
            st.sd += sd;
            st.hole |= hole;
        } else if soft {
            let (z, z1) = with_const!(z1_mode, Z1, exp_sums::<M, Z1>(xs, st.ms, s2, es, &mut tmp));
            st.zs += z;
            st.z1 += z1;
        } else {
            // The cross-entropy alone: its exponentials go to the scratch.
            st.z1 += simd::exp2_sum::<M>(xs, st.ms, LOG2_E, es);
        }
    }
    if hard && z1_mode == 0 {
        st.z1 = st.zs;
    }
    st
}

/// Writes `e = 2^((x - m) * scale2)` of every entry of `xs` to `out` and returns `(sum e, z1)`,
/// z1 being (`Z1 = 0`) nothing, (`1`) `sum exp(x - m)` (its own exponentials, through `tmp`)
/// or (`2..=4`) `sum e^Z1` (see [`HardMode`]). Student and teacher take this same code, so
/// identical inputs give identical sums.
#[inline(always)]
fn exp_sums<M: MulAdd, const Z1: u32>(
    xs: &[f32],
    m: f32,
    scale2: f32,
    out: &mut [f32],
    tmp: &mut [f32; CHUNK],
) -> (f32, f32) {
    let z = simd::exp2_sum::<M>(xs, m, scale2, out);
    let z1 = match Z1 {
        0 => 0.0,
        1 => simd::exp2_sum::<M>(xs, m, LOG2_E, tmp),
        2 => simd::sum_pow::<2>(&out[..xs.len()]),
        3 => simd::sum_pow::<3>(&out[..xs.len()]),
        _ => simd::sum_pow::<4>(&out[..xs.len()]),
    };
    (z, z1)
}

struct RklSums {
    z: f32,
    z1: f32,
    sd: f32,
    hole: bool,
}

/// Pass-1 sums of reverse KL over one chunk, relative to the running maxima `ms`, `mt`: `z_s` and
/// z1 as in [`exp_sums`] (the student's exponentials go to `out`), `sd`, and whether a student
/// entry meets a teacher `-inf`. Each entry's log ratio `sc - tc` goes to `d` (`-inf` for a
/// student `-inf`, whose gradient is 0) for pass 2, which adds the chunk's offset.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn rkl_sums<M: MulAdd, const Z1: u32>(
    xs: &[f32],
    ys: &[f32],
    ms: f32,
    mt: f32,
    s2: f32,
    out: &mut [f32],
    d: &mut [f32],
    tmp: &mut [f32; CHUNK],
    terms: &mut [f32; CHUNK],
) -> RklSums {
    let n = xs.len();
    let (ys, out, d, terms) = (&ys[..n], &mut out[..n], &mut d[..n], &mut terms[..n]);
    let mut hole = 0u32;
    for j in 0..n {
        let (x, y) = (xs[j], ys[j]);
        let sc = (x - ms) * s2;
        let e = exp2::<M>(sc);
        out[j] = e;
        let ratio = sc - (y - mt) * s2;
        // A select through the bits: written as an `if`, LLVM stores each side with a masked
        // store (`vmaskmovps`), which is microcoded and slow on AMD.
        let masked = ((x == NEG_INF) as u32).wrapping_neg();
        d[j] = f32::from_bits((ratio.to_bits() & !masked) | (NEG_INF.to_bits() & masked));
        let term = e * ratio;
        // A zero student probability contributes 0; a teacher zero makes the row +inf.
        let skip = x == NEG_INF || y == NEG_INF;
        terms[j] = if skip { 0.0 } else { term };
        hole |= (x > NEG_INF && y == NEG_INF) as u32;
    }
    let z = simd::sum(out);
    let z1 = match Z1 {
        0 => 0.0,
        1 => simd::exp2_sum::<M>(xs, ms, LOG2_E, tmp),
        2 => simd::sum_pow::<2>(out),
        3 => simd::sum_pow::<3>(out),
        _ => simd::sum_pow::<4>(out),
    };
    RklSums {
        z,
        z1,
        sd: simd::sum(terms),
        hole: hole != 0,
    }
}

/// Pass-1 sum of forward KL over one chunk, relative to the running maxima `ms`, `mt`:
/// `sum et (tc - sc)` over the teacher's exponentials `et`, and whether a teacher entry above
/// `-inf` meets a student `-inf`.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn fkl_sums(
    xs: &[f32],
    ys: &[f32],
    et: &[f32],
    ms: f32,
    mt: f32,
    s2: f32,
    terms: &mut [f32; CHUNK],
) -> (f32, bool) {
    let n = xs.len();
    let (ys, et, terms) = (&ys[..n], &et[..n], &mut terms[..n]);
    let mut hole = 0u32;
    for j in 0..n {
        let (x, y) = (xs[j], ys[j]);
        let term = et[j] * ((y - mt) * s2 - (x - ms) * s2);
        // A zero teacher probability contributes 0; a student zero makes the row +inf.
        let skip = x == NEG_INF || y == NEG_INF;
        terms[j] = if skip { 0.0 } else { term };
        hole |= (x == NEG_INF && y > NEG_INF) as u32;
    }
    (simd::sum(terms), hole != 0)
}
