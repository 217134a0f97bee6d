//! The memory floor of the fused loss on this machine: one pass that reads both inputs once and
//! writes a gradient-sized f32 output (`out = student - teacher`), with the same row
//! parallelism, chunking and dtype conversion as the loss. No kernel that reads its inputs and
//! writes a gradient can beat it; benchmarks report the loss's time as a multiple of it.

use rayon::prelude::*;

use super::fastmath::MulAdd;
use super::simd::{self, Kernel, SimdLevel, CHUNK};
use super::{row_of, widen};
use crate::dtype::HostSlice;

/// `out = student - teacher` over `[rows, vocab]` inputs of any dtypes, rows in parallel.
///
/// # Panics
/// When a length is not `rows * vocab` (or that product overflows).
pub fn memory_floor(
    student: HostSlice,
    teacher: HostSlice,
    rows: usize,
    vocab: usize,
    out: &mut [f32],
) {
    let n = rows.checked_mul(vocab).expect("rows * vocab overflows");
    assert_eq!(student.len(), n, "memory_floor: student length");
    assert_eq!(teacher.len(), n, "memory_floor: teacher length");
    assert_eq!(out.len(), n, "memory_floor: output length");
    if n == 0 {
        return;
    }
    let level = SimdLevel::detect();
    out.par_chunks_mut(vocab).enumerate().for_each(|(r, out)| {
        let row = FloorRow {
            s: row_of(student, r, vocab),
            t: row_of(teacher, r, vocab),
            out,
        };
        simd::run(level, row)
    });
}

struct FloorRow<'a> {
    s: HostSlice<'a>,
    t: HostSlice<'a>,
    out: &'a mut [f32],
}

impl Kernel for FloorRow<'_> {
    type Output = ();

    #[inline(always)]
    fn run<M: MulAdd>(self) {
        let (mut bs, mut bt) = ([0.0f32; CHUNK], [0.0f32; CHUNK]);
        for (c, out) in self.out.chunks_mut(CHUNK).enumerate() {
            let range = c * CHUNK..c * CHUNK + out.len();
            let xs = widen(self.s, range.clone(), &mut bs, 0.0);
            let ys = widen(self.t, range, &mut bt, 0.0);
            for ((o, &x), &y) in out.iter_mut().zip(xs).zip(ys) {
                *o = x - y;
            }
        }
    }
}
