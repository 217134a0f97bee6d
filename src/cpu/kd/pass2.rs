//! Passes 2 and 3 of the fused loss (see the parent module): the per-entry terms, the loop over
//! a row's chunks that writes the gradient, and JSD's third pass.

use super::*;

/// Everything pass 2 needs, per row. Logarithms are in base 2 (`log2 p = ln p / ln 2`): the
/// loss terms are summed in base-2 units and the row's sum converted once.
#[derive(Clone, Copy)]
pub(super) struct Consts {
    pub(super) ms: f32,
    pub(super) mt: f32,
    /// `log2 e / T`.
    pub(super) scale2: f32,
    /// `log2 z_s`, `log2 z_t`, `log2 z_1`.
    pub(super) log_zs: f32,
    pub(super) log_zt: f32,
    pub(super) log_z1: f32,
    /// `grad_scale * soft_weight / T`: the soft part's factor (d a / d s = 1 / T).
    pub(super) a: f32,
    /// `a ln 2`: the factor of gradients written with base-2 log-probabilities.
    pub(super) a2: f32,
    /// `grad_scale * hard_weight`.
    pub(super) b: f32,
    /// [`HardMode::Pow`]: `softmax(s) = (p_s c)^T`, `c = exp(log z_s - log z_1 / T)`.
    pub(super) c: f32,
    pub(super) beta: f32,
    pub(super) one_minus_beta: f32,
    /// JSD: `a2 (1 - beta)`, the factor of the gradient's `p_s (log2 p_s - log2 m)`.
    pub(super) aj: f32,
    /// JSD: `-aj sum_k p_s(k) (log2 p_s(k) - log2 m(k))`, the factor of the gradient's `p_s`
    /// (known after pass 2).
    pub(super) ajk: f32,
}

/// Per chunk: the factors that turn the scratch's exponentials into probabilities,
/// `exp((m_c - m) / T) / z` (or at T = 1 for the cross-entropy alone); after pass 1 they replace
/// the chunk maxima in the scratch. Reverse KL has no teacher probabilities: `ft` is the offset
/// that turns the chunk's kept log ratios into `log2 p_s - log2 p_t - KL_r` (see
/// [`ReverseKl`]).
#[derive(Clone, Copy)]
pub(super) struct ChunkFactors {
    pub(super) fs: f32,
    pub(super) ft: f32,
}

impl Consts {
    /// `log2 p_s = (s - m_s) log2 e / T - log2 z_s`, centered before scaling.
    #[inline(always)]
    fn log_ps<M: MulAdd>(&self, x: f32) -> f32 {
        M::mul_add(x - self.ms, self.scale2, -self.log_zs)
    }

    #[inline(always)]
    fn log_pt<M: MulAdd>(&self, y: f32) -> f32 {
        M::mul_add(y - self.mt, self.scale2, -self.log_zt)
    }

    /// The cross-entropy's gradient `b (softmax(s) - onehot)` at the entry with student logit
    /// `x` and soft probability `ps`: `Q = 1` from an exponential of its own
    /// ([`HardMode::Exp`]), `Q = n + 1` as `(ps c)^n` ([`HardMode::Pow`]).
    #[inline(always)]
    fn hard_grad<M: MulAdd, const Q: u32>(&self, x: f32, ps: f32, onehot: f32) -> f32 {
        let q = match Q {
            1 => exp2::<M>(M::mul_add(x - self.ms, LOG2_E, -self.log_z1)),
            2 => ps * self.c,
            3 => pow::<2>(ps * self.c),
            4 => pow::<3>(ps * self.c),
            _ => pow::<4>(ps * self.c),
        };
        self.b * (q - onehot)
    }

    /// `log2 m = log2(beta p_t + (1 - beta) p_s)` from the probabilities themselves: one
    /// multiply-add and one logarithm, no exponential. `m` is clamped below at the smallest normal
    /// f32, so `log2 m >= -126` is finite even where both probabilities underflow (then `p_s,
    /// p_t <= 2^-126 / min(beta, 1 - beta)`, and the terms `p (log2 p - log2 m)` they weight are
    /// off by less than `2^-126 / min(beta, 1 - beta) * 150`, far below an f32 loss's rounding;
    /// a zero probability still weights its term by exactly 0). NaN stays NaN.
    #[inline(always)]
    fn log_mixture<M: MulAdd>(&self, ps: f32, pt: f32) -> f32 {
        let m = M::mul_add(self.beta, pt, self.one_minus_beta * ps);
        let m = if m < f32::MIN_POSITIVE {
            f32::MIN_POSITIVE
        } else {
            m
        };
        log2_normal::<M>(m)
    }
}

/// What one entry of a pass produces: up to two loss terms, the gradient (without the label's
/// one-hot, which the caller passes as `onehot` for the label entry only), and a value to leave
/// in the teacher's scratch slot.
pub(super) struct Out {
    terms: [f32; 2],
    grad: f32,
    keep: f32,
}

/// Which inputs a pass reads; the others are read from the scratch only.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Reads {
    Scratch,
    Student,
    Both,
}

/// One entry of a pass, from the student and teacher logits `x`, `y` and the scratch values
/// `es`, `et` of the entry (`x`, `y` are meaningless where [`Entry::READS`] leaves them out).
pub(super) trait Entry: Copy {
    /// How many of the two terms are summed.
    const SUMS: usize;
    const READS: Reads;
    /// Whether `keep` is written back to the teacher's scratch slot.
    const KEEP: bool = false;
    #[allow(clippy::too_many_arguments)]
    fn eval<M: MulAdd>(
        self,
        c: &Consts,
        f: ChunkFactors,
        x: f32,
        y: f32,
        es: f32,
        et: f32,
        onehot: f32,
    ) -> Out;
}

/// Forward KL, pass 2 (the loss came from pass 1): the gradient `a (p_s - p_t)` from the
/// scratch alone. `Q`: the cross-entropy's gradient, 0 for none, else as in
/// [`Consts::hard_grad`] (so for the other entries; only `Q = 1` reads the student again).
#[derive(Clone, Copy)]
pub(super) struct ForwardKl<const Q: u32>;

impl<const Q: u32> Entry for ForwardKl<Q> {
    const SUMS: usize = 0;
    const READS: Reads = if Q == 1 {
        Reads::Student
    } else {
        Reads::Scratch
    };
    #[inline(always)]
    fn eval<M: MulAdd>(
        self,
        c: &Consts,
        f: ChunkFactors,
        x: f32,
        _: f32,
        es: f32,
        et: f32,
        onehot: f32,
    ) -> Out {
        let (ps, pt) = (es * f.fs, et * f.ft);
        let d = ps - pt;
        let grad = if Q > 0 {
            M::mul_add(c.a, d, c.hard_grad::<M, Q>(x, ps, onehot))
        } else {
            c.a * d
        };
        Out {
            terms: [0.0, 0.0],
            grad,
            keep: 0.0,
        }
    }
}

/// Reverse KL, pass 2 (the loss came from pass 1): the gradient
/// `a p_s (log p_s - log p_t - KL_r)` from the scratch alone: pass 1 kept each entry's log ratio
/// `dc` relative to its chunk's running maxima in the teacher's slot, and `f.ft` holds the
/// chunk's offset `(m_s,c - m_s - m_t,c + m_t) log2 e / T + log2 z_t - log2 z_s - KL_r`. A
/// student `-inf` (kept as `dc = -inf`) has gradient 0.
#[derive(Clone, Copy)]
pub(super) struct ReverseKl<const Q: u32>;

impl<const Q: u32> Entry for ReverseKl<Q> {
    const SUMS: usize = 0;
    const READS: Reads = if Q == 1 {
        Reads::Student
    } else {
        Reads::Scratch
    };
    #[inline(always)]
    fn eval<M: MulAdd>(
        self,
        c: &Consts,
        f: ChunkFactors,
        x: f32,
        _: f32,
        es: f32,
        dc: f32,
        onehot: f32,
    ) -> Out {
        let ps = es * f.fs;
        let gs = c.a2 * (ps * (dc + f.ft));
        let gs = if dc == NEG_INF { 0.0 } else { gs };
        let grad = if Q > 0 {
            gs + c.hard_grad::<M, Q>(x, ps, onehot)
        } else {
            gs
        };
        Out {
            terms: [0.0, 0.0],
            grad,
            keep: 0.0,
        }
    }
}

/// JSD, pass 2: `p_t (log p_t - log m)` and `p_s (log p_s - log m)`. With `G` (a gradient is
/// wanted) it keeps in the teacher's slot the gradient without its mean term,
/// `aj p_s (log2 p_s - log2 m)` plus the cross-entropy's (`Q` as in [`Consts::hard_grad`]),
/// for [`jsd_grad`] to finish.
#[derive(Clone, Copy)]
pub(super) struct JsdLoss<const G: bool, const Q: u32>;

impl<const G: bool, const Q: u32> Entry for JsdLoss<G, Q> {
    const SUMS: usize = 2;
    const READS: Reads = Reads::Both;
    const KEEP: bool = G;
    #[inline(always)]
    fn eval<M: MulAdd>(
        self,
        c: &Consts,
        f: ChunkFactors,
        x: f32,
        y: f32,
        es: f32,
        et: f32,
        onehot: f32,
    ) -> Out {
        let (ls, lt) = (c.log_ps::<M>(x), c.log_pt::<M>(y));
        let (ps, pt) = (es * f.fs, et * f.ft);
        let lm = c.log_mixture::<M>(ps, pt);
        // Equal probabilities are their own mixture: both log ratios are exactly 0 (so identical
        // distributions give exactly 0), not the rounding of the log-probabilities' difference
        // from `log2 m`.
        let same = ps == pt;
        let ta = if same { 0.0 } else { pt * (lt - lm) };
        let tb = if same { 0.0 } else { ps * (ls - lm) };
        let ta = if lt == NEG_INF { 0.0 } else { ta };
        let tb = if ls == NEG_INF { 0.0 } else { tb };
        let keep = if G {
            let gs = c.aj * tb;
            if Q > 0 {
                gs + c.hard_grad::<M, Q>(x, ps, onehot)
            } else {
                gs
            }
        } else {
            0.0
        };
        Out {
            terms: [ta, tb],
            grad: 0.0,
            keep,
        }
    }
}

/// JSD, pass 3: the gradient `keep - aj KL(p_s || m) p_s` from the scratch alone (the inputs are
/// not read again): `keep` from the teacher's slot ([`JsdLoss`]), `p_s` from the student's.
/// A zero student exponential (a `-inf` logit) leaves `keep` as it is, so a masked entry's
/// gradient is exactly 0.
#[inline(always)]
pub(super) fn jsd_grad<M: MulAdd>(c: &Consts, sc: &Scratch, n: usize, grad: &mut HostSliceMut) {
    let mut bg = [0.0f32; CHUNK];
    for ci in 0..n.div_ceil(CHUNK) {
        let range = ci * CHUNK..((ci + 1) * CHUNK).min(n);
        let m = range.len();
        let fs = sc.ms[ci];
        let es = &sc.es[ci * CHUNK..ci * CHUNK + m];
        let keep = &sc.et[ci * CHUNK..ci * CHUNK + m];
        let direct = match grad {
            HostSliceMut::F32(d) => Some(&mut d[range.clone()]),
            _ => None,
        };
        let in_place = direct.is_some();
        let out: &mut [f32] = match direct {
            Some(d) => d,
            None => &mut bg[..m],
        };
        let out = &mut out[..m];
        for j in 0..m {
            let g = M::mul_add(es[j] * fs, c.ajk, keep[j]);
            out[j] = if es[j] == 0.0 { keep[j] } else { g };
        }
        if !in_place {
            narrow_into(&bg[..m], grad, range.start);
        }
    }
}

/// The cross-entropy alone (alpha = 0): its gradient `b (exp(s - m) / z_1 - onehot)` from the
/// exponentials pass 1 kept; the teacher is not read.
#[derive(Clone, Copy)]
pub(super) struct HardOnly;

impl Entry for HardOnly {
    const SUMS: usize = 0;
    const READS: Reads = Reads::Scratch;
    #[inline(always)]
    fn eval<M: MulAdd>(
        self,
        c: &Consts,
        f: ChunkFactors,
        _: f32,
        _: f32,
        es: f32,
        _: f32,
        onehot: f32,
    ) -> Out {
        Out {
            terms: [0.0, 0.0],
            grad: c.b * (es * f.fs - onehot),
            keep: 0.0,
        }
    }
}

/// The row's inputs, of which a pass reads what its [`Entry::READS`] says.
#[derive(Clone, Copy)]
pub(super) struct Inputs<'a> {
    pub(super) s: HostSlice<'a>,
    pub(super) t: HostSlice<'a>,
}

/// One pass over a row: the sums of `e`'s terms, and (when `grad` is given) its gradient written
/// a chunk at a time. The label entry's gradient is recomputed with its one-hot.
#[inline(always)]
pub(super) fn row_pass<M: MulAdd, E: Entry>(
    e: E,
    c: &Consts,
    input: Inputs,
    sc: &mut Scratch,
    label: Option<usize>,
    grad: Option<&mut HostSliceMut>,
) -> [f32; 2] {
    // Separate loops with and without the gradient: the loss terms are the same code in both, so
    // the loss-only path gives the same bits.
    match grad {
        Some(g) => chunks::<M, E, true>(e, c, input, sc, label, Some(g)),
        None => chunks::<M, E, false>(e, c, input, sc, label, None),
    }
}

#[inline(always)]
fn chunks<M: MulAdd, E: Entry, const GRAD: bool>(
    e: E,
    c: &Consts,
    input: Inputs,
    sc: &mut Scratch,
    label: Option<usize>,
    mut grad: Option<&mut HostSliceMut>,
) -> [f32; 2] {
    let (mut bs, mut bt, mut bg) = ([0.0f32; CHUNK], [0.0f32; CHUNK], [0.0f32; CHUNK]);
    let (mut b0, mut b1) = ([0.0f32; CHUNK], [0.0f32; CHUNK]);
    let (mut total0, mut total1) = (0.0f32, 0.0f32);
    let n = input.s.len();
    for ci in 0..n.div_ceil(CHUNK) {
        let range = ci * CHUNK..((ci + 1) * CHUNK).min(n);
        let f = ChunkFactors {
            fs: sc.ms[ci],
            ft: sc.mt[ci],
        };
        // What is not read is never looked at: the chunk's padded length of zeros stands in.
        let xs = match E::READS {
            Reads::Scratch => &bs[..range.len().next_multiple_of(W)],
            Reads::Student | Reads::Both => widen(input.s, range.clone(), &mut bs, NEG_INF),
        };
        let ys = match E::READS {
            Reads::Both => widen(input.t, range.clone(), &mut bt, NEG_INF),
            Reads::Scratch | Reads::Student => xs,
        };
        // An f32 gradient is written in place when the chunk needs no padding; otherwise into
        // `bg`, narrowed (or copied) afterwards.
        let direct = match grad.as_deref_mut() {
            Some(HostSliceMut::F32(d)) if range.len().is_multiple_of(W) => {
                Some(&mut d[range.clone()])
            }
            _ => None,
        };
        let in_place = direct.is_some();
        let out: &mut [f32] = match direct {
            Some(d) => d,
            None => &mut bg[..],
        };
        // A plain loop over the entries (vectorized as a map), the terms summed afterwards
        // (see `simd::sum`). Equal lengths let LLVM drop the bounds checks.
        let m = xs.len();
        let (ys, es, et) = (&ys[..m], &slot(sc.es, ci)[..m], &mut slot(sc.et, ci)[..m]);
        let (out, t0, t1) = (&mut out[..m], &mut b0[..m], &mut b1[..m]);
        // The label entry (when a gradient or a kept value needs its one-hot), with what the
        // loop reads in the teacher's slot before a kept value replaces it.
        let lab = if GRAD || E::KEEP {
            label
                .filter(|y| range.contains(y))
                .map(|y| (y - range.start, et[y - range.start]))
        } else {
            None
        };
        for j in 0..m {
            let o = e.eval::<M>(c, f, xs[j], ys[j], es[j], et[j], 0.0);
            if E::SUMS > 0 {
                t0[j] = o.terms[0];
            }
            if E::SUMS > 1 {
                t1[j] = o.terms[1];
            }
            if GRAD {
                out[j] = o.grad;
            }
            if E::KEEP {
                et[j] = o.keep;
            }
        }
        if E::SUMS > 0 {
            total0 += simd::sum(t0);
        }
        if E::SUMS > 1 {
            total1 += simd::sum(t1);
        }
        if let Some((j, et_j)) = lab {
            let o = e.eval::<M>(c, f, xs[j], ys[j], es[j], et_j, 1.0);
            if GRAD {
                out[j] = o.grad;
            }
            if E::KEEP {
                et[j] = o.keep;
            }
        }
        if GRAD && !in_place {
            if let Some(g) = grad.as_deref_mut() {
                narrow_into(&bg[..range.len()], g, range.start);
            }
        }
    }
    [total0, total1]
}
