//! The matmuls through cuBLAS on the emulated device: first the emulated cuBLAS itself against a
//! column-major reference written here from cuBLAS's documentation (every transpose pair, leading
//! dimensions with padding, strided batches, bf16 GemmEx, its argument checks and status codes),
//! then `CudaKernels::matmul_{forward,backward}` against `model::ops`.
//!
//! Tolerances: a dot product of `k` f32 terms summed in any order with one rounding per step is
//! within `gamma_k = k u / (1 - k u)` (u = 2^-24) of the exact sum, relative to `sum |a_i b_i|`
//! (Higham, Accuracy and Stability of Numerical Algorithms, 3.1). The device and the CPU sum in
//! different orders, so each is held to that bound against the exact (f64) result of the same f32
//! inputs, with the accumulator's old value and the final rounding counted as two more terms.
mod common;

use common::emulated;
use cudarc::cublas::result as cublas;
use cudarc::cublas::sys::cublasOperation_t::{self, CUBLAS_OP_N, CUBLAS_OP_T};
use cudarc::cublas::sys::cublasStatus_t;
use cudarc::driver::{CudaSlice, DevicePtr, DevicePtrMut};
use distill_kernels::model::ops;
use distill_kernels::Error;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

fn normals(rng: &mut StdRng, n: usize, scale: f32) -> Vec<f32> {
    (0..n)
        .map(|_| (0..4).map(|_| rng.gen::<f32>() - 0.5).sum::<f32>() * scale)
        .collect()
}

fn up<T: cudarc::driver::DeviceRepr>(v: &[T]) -> CudaSlice<T> {
    emulated().stream().clone_htod(v).unwrap()
}

fn down<T: cudarc::driver::DeviceRepr + Default + Clone>(s: &CudaSlice<T>) -> Vec<T> {
    emulated().stream().clone_dtoh(s).unwrap()
}

const U: f64 = 1.0 / (1u64 << 24) as f64;

/// `got` within `(terms + 2) u / (1 - (terms + 2) u)` of `exact`, relative to `magnitude`
/// (`sum |a b|` plus the accumulator's old magnitude).
fn assert_within_dot_bound(
    what: &str,
    got: &[f32],
    exact: &[f64],
    magnitude: &[f64],
    terms: usize,
) {
    assert_eq!(got.len(), exact.len(), "{what}: lengths");
    let t = (terms + 2) as f64 * U;
    let gamma = t / (1.0 - t);
    for (i, ((&g, &e), &m)) in got.iter().zip(exact).zip(magnitude).enumerate() {
        let err = (g as f64 - e).abs();
        assert!(
            err <= gamma * m + f64::from(f32::MIN_POSITIVE),
            "{what}[{i}]: {g} vs exact {e} (error {err:e}, bound {:e})",
            gamma * m
        );
    }
}

/// Column-major `C = alpha op(A) op(B) + beta C` in f64, with `sum |op(A) op(B)| + |beta C|` per
/// element: the reference the emulated cuBLAS is held to.
#[allow(clippy::too_many_arguments)]
fn reference_gemm(
    ta: bool,
    tb: bool,
    m: usize,
    n: usize,
    k: usize,
    alpha: f64,
    a: &[f32],
    lda: usize,
    b: &[f32],
    ldb: usize,
    beta: f64,
    c: &[f32],
    ldc: usize,
) -> (Vec<f64>, Vec<f64>) {
    let op_a = |i: usize, l: usize| a[if ta { l + i * lda } else { i + l * lda }] as f64;
    let op_b = |l: usize, j: usize| b[if tb { j + l * ldb } else { l + j * ldb }] as f64;
    let mut exact: Vec<f64> = c.iter().map(|&x| x as f64).collect();
    let mut mag = vec![0.0; c.len()];
    for j in 0..n {
        for i in 0..m {
            let (mut s, mut sa) = (0.0, 0.0);
            for l in 0..k {
                s += op_a(i, l) * op_b(l, j);
                sa += (op_a(i, l) * op_b(l, j)).abs();
            }
            let at = i + j * ldc;
            let old = if beta == 0.0 {
                0.0
            } else {
                beta * c[at] as f64
            };
            exact[at] = alpha * s + old;
            mag[at] = (alpha * sa).abs() + old.abs();
        }
    }
    (exact, mag)
}

fn op(t: bool) -> cublasOperation_t {
    if t {
        CUBLAS_OP_T
    } else {
        CUBLAS_OP_N
    }
}

/// The emulated cuBLAS computes exactly what cuBLAS documents for every transpose pair, with
/// padded leading dimensions; elements of C outside the `m x n` block (the padding) are untouched.
#[test]
fn sgemm_follows_the_column_major_contract_for_every_transpose_pair() {
    let dev = emulated();
    let blas = *dev.blas().unwrap().handle();
    let mut rng = StdRng::seed_from_u64(7);
    let (m, n, k) = (5, 3, 7);
    for ta in [false, true] {
        for tb in [false, true] {
            // Stored shapes (rows x cols) and a leading dimension two larger than the rows.
            let (ar, ac) = if ta { (k, m) } else { (m, k) };
            let (br, bc) = if tb { (n, k) } else { (k, n) };
            let (lda, ldb, ldc) = (ar + 2, br + 1, m + 3);
            let a = normals(&mut rng, lda * ac, 1.0);
            let b = normals(&mut rng, ldb * bc, 1.0);
            let c0 = normals(&mut rng, ldc * n, 1.0);
            let (alpha, beta) = (0.75f32, -1.5f32);
            let (da, db, mut dc) = (up(&a), up(&b), up(&c0));
            let s = dev.stream();
            {
                let ((pa, _ga), (pb, _gb)) = (da.device_ptr(s), db.device_ptr(s));
                let (pc, _gc) = dc.device_ptr_mut(s);
                // SAFETY: every operand's extent lies inside its buffer (ld * cols elements).
                unsafe {
                    cublas::sgemm(
                        blas,
                        op(ta),
                        op(tb),
                        m as i32,
                        n as i32,
                        k as i32,
                        &alpha,
                        pa as *const f32,
                        lda as i32,
                        pb as *const f32,
                        ldb as i32,
                        &beta,
                        pc as *mut f32,
                        ldc as i32,
                    )
                }
                .unwrap();
            }
            let got = down(&dc);
            let (exact, mag) = reference_gemm(
                ta,
                tb,
                m,
                n,
                k,
                alpha as f64,
                &a,
                lda,
                &b,
                ldb,
                beta as f64,
                &c0,
                ldc,
            );
            for j in 0..n {
                for i in m..ldc {
                    let at = i + j * ldc;
                    assert_eq!(got[at].to_bits(), c0[at].to_bits(), "padding of C written");
                }
            }
            let block = |v: &[f32]| -> Vec<f32> {
                (0..n)
                    .flat_map(|j| (0..m).map(move |i| i + j * ldc))
                    .map(|at| v[at])
                    .collect()
            };
            let pick = |v: &[f64]| -> Vec<f64> {
                (0..n)
                    .flat_map(|j| (0..m).map(move |i| i + j * ldc))
                    .map(|at| v[at])
                    .collect()
            };
            assert_within_dot_bound(
                &format!("sgemm ta={ta} tb={tb}"),
                &block(&got),
                &pick(&exact),
                &pick(&mag),
                k,
            );
        }
    }
}

/// cuBLAS's argument checks: leading dimensions below the stored rows, negative sizes and
/// unknown operations are `CUBLAS_STATUS_INVALID_VALUE`, before any work is queued.
#[test]
fn sgemm_rejects_what_cublas_rejects() {
    let dev = emulated();
    let blas = *dev.blas().unwrap().handle();
    let (m, n, k) = (4usize, 3usize, 5usize);
    let a = up(&[1.0f32; 64]);
    let b = up(&[1.0f32; 64]);
    let mut c = up(&[1.0f32; 64]);
    let s = dev.stream();
    let ((pa, _ga), (pb, _gb)) = (a.device_ptr(s), b.device_ptr(s));
    let (pc, _gc) = c.device_ptr_mut(s);
    let call = |ta: cublasOperation_t, tb, m: i32, n: i32, k: i32, lda, ldb, ldc| {
        let (alpha, beta) = (1.0f32, 0.0f32);
        // SAFETY: every accepted call below stays inside the 64-element buffers.
        unsafe {
            cublas::sgemm(
                blas,
                ta,
                tb,
                m,
                n,
                k,
                &alpha,
                pa as *const f32,
                lda,
                pb as *const f32,
                ldb,
                &beta,
                pc as *mut f32,
                ldc,
            )
        }
    };
    let (m, n, k) = (m as i32, n as i32, k as i32);
    let invalid = Err(cublas::CublasError(
        cublasStatus_t::CUBLAS_STATUS_INVALID_VALUE,
    ));
    assert_eq!(call(CUBLAS_OP_N, CUBLAS_OP_N, m, n, k, m, k, m), Ok(()));
    // op N: lda >= m; op T: lda >= k.
    assert_eq!(
        call(CUBLAS_OP_N, CUBLAS_OP_N, m, n, k, m - 1, k, m),
        invalid
    );
    assert_eq!(call(CUBLAS_OP_T, CUBLAS_OP_N, m, n, k, m, k, m), invalid);
    assert_eq!(call(CUBLAS_OP_T, CUBLAS_OP_N, m, n, k, k, k, m), Ok(()));
    // op N: ldb >= k; op T: ldb >= n.
    assert_eq!(
        call(CUBLAS_OP_N, CUBLAS_OP_N, m, n, k, m, k - 1, m),
        invalid
    );
    assert_eq!(
        call(CUBLAS_OP_N, CUBLAS_OP_T, m, n, k, m, n - 1, m),
        invalid
    );
    assert_eq!(
        call(CUBLAS_OP_N, CUBLAS_OP_N, m, n, k, m, k, m - 1),
        invalid
    );
    assert_eq!(call(CUBLAS_OP_N, CUBLAS_OP_N, -1, n, k, m, k, m), invalid);
    assert_eq!(call(CUBLAS_OP_N, CUBLAS_OP_N, m, n, -1, m, k, m), invalid);
    // SAFETY: an out-of-range enum value, as a caller's bug would pass it.
    let bogus: cublasOperation_t = unsafe { std::mem::transmute(7u32) };
    assert_eq!(call(bogus, CUBLAS_OP_N, m, n, k, m, k, m), invalid);
    dev.stream().synchronize().unwrap();
}

/// With `beta = 0` cuBLAS does not read C (it may hold NaN); with `alpha = 0` it reads neither A
/// nor B, so NaN there does not reach C.
#[test]
fn sgemm_reads_c_only_when_beta_is_nonzero() {
    let dev = emulated();
    let blas = *dev.blas().unwrap().handle();
    let (m, n, k) = (3usize, 2usize, 4usize);
    let a = up(&vec![2.0f32; m * k]);
    let b = up(&vec![0.5f32; k * n]);
    let nan_c = || up(&vec![f32::NAN; m * n]);
    let s = dev.stream();
    let run = |alpha: f32, beta: f32, a: &CudaSlice<f32>, c: &mut CudaSlice<f32>| {
        let ((pa, _ga), (pb, _gb)) = (a.device_ptr(s), b.device_ptr(s));
        let (pc, _gc) = c.device_ptr_mut(s);
        // SAFETY: contiguous operands of exactly the stated shapes.
        unsafe {
            cublas::sgemm(
                blas,
                CUBLAS_OP_N,
                CUBLAS_OP_N,
                m as i32,
                n as i32,
                k as i32,
                &alpha,
                pa as *const f32,
                m as i32,
                pb as *const f32,
                k as i32,
                &beta,
                pc as *mut f32,
                m as i32,
            )
        }
        .unwrap();
    };
    let mut c = nan_c();
    run(1.0, 0.0, &a, &mut c);
    assert_eq!(down(&c), vec![4.0; m * n]);
    let mut c = nan_c();
    run(1.0, 1.0, &a, &mut c);
    assert!(down(&c).iter().all(|x| x.is_nan()), "beta = 1 reads C");
    let nan_a = up(&vec![f32::NAN; m * k]);
    let mut c = up(&vec![3.0f32; m * n]);
    run(0.0, 2.0, &nan_a, &mut c);
    assert_eq!(down(&c), vec![6.0; m * n]);
}

/// A GEMM whose operand reaches past its allocation faults when it runs, as on the GPU
/// (CUDA_ERROR_ILLEGAL_ADDRESS at the next synchronising call), instead of reading neighbours.
#[test]
fn sgemm_past_the_end_of_an_operand_faults() {
    // A context of its own: the fault is sticky-free here but must not leak into other tests'
    // streams, so it is checked and cleared on this stream.
    let dev = emulated();
    let blas = *dev.blas().unwrap().handle();
    let (m, n, k) = (8usize, 8usize, 8usize);
    let a = up(&vec![1.0f32; m * k - 1]); // one element short
    let b = up(&vec![1.0f32; k * n]);
    let mut c = up(&vec![0.0f32; m * n]);
    let s = dev.stream();
    {
        let ((pa, _ga), (pb, _gb)) = (a.device_ptr(s), b.device_ptr(s));
        let (pc, _gc) = c.device_ptr_mut(s);
        let (alpha, beta) = (1.0f32, 0.0f32);
        // SAFETY: deliberately out of range on the device; the emulator checks before it reads.
        unsafe {
            cublas::sgemm(
                blas,
                CUBLAS_OP_N,
                CUBLAS_OP_N,
                m as i32,
                n as i32,
                k as i32,
                &alpha,
                pa as *const f32,
                m as i32,
                pb as *const f32,
                k as i32,
                &beta,
                pc as *mut f32,
                m as i32,
            )
        }
        .unwrap();
    }
    let err = s.synchronize().unwrap_err();
    assert_eq!(
        err.0,
        cudarc::driver::sys::cudaError_enum::CUDA_ERROR_ILLEGAL_ADDRESS
    );
    let msg = distill_kernels::cuda::emulator_last_error().unwrap_or_default();
    assert!(
        msg.contains("cublasSgemm operand A") && msg.contains("not inside one device allocation"),
        "{msg}"
    );
}

/// `model::ops::matmul_forward` and `CudaKernels::matmul_forward` on odd shapes: both within the
/// dot-product bound of the exact result.
#[test]
fn matmul_forward_matches_the_cpu() {
    let dev = emulated();
    let mut rng = StdRng::seed_from_u64(11);
    for &(n, ic, oc) in &[(1, 1, 1), (7, 13, 5), (33, 64, 17), (3, 129, 250)] {
        let inp = normals(&mut rng, n * ic, 1.0);
        let w = normals(&mut rng, oc * ic, 0.5);
        let mut cpu = vec![0.0f32; n * oc];
        ops::matmul_forward(&mut cpu, &inp, &w, ic, oc);
        let mut out = up(&vec![f32::NAN; n * oc]);
        dev.matmul_forward(&mut out, &up(&inp), &up(&w), ic, oc)
            .unwrap();
        let got = down(&out);
        let (mut exact, mut mag) = (vec![0.0; n * oc], vec![0.0; n * oc]);
        for r in 0..n {
            for o in 0..oc {
                for i in 0..ic {
                    let p = inp[r * ic + i] as f64 * w[o * ic + i] as f64;
                    exact[r * oc + o] += p;
                    mag[r * oc + o] += p.abs();
                }
            }
        }
        let what = format!("forward n={n} ic={ic} oc={oc}");
        assert_within_dot_bound(&format!("{what} device"), &got, &exact, &mag, ic);
        assert_within_dot_bound(&format!("{what} cpu"), &cpu, &exact, &mag, ic);
    }
}

/// The backward accumulates into both gradients (`+=`), like the CPU's.
#[test]
fn matmul_backward_matches_the_cpu() {
    let dev = emulated();
    let mut rng = StdRng::seed_from_u64(12);
    for &(n, ic, oc) in &[(1, 1, 1), (7, 13, 5), (33, 64, 17), (65, 3, 130)] {
        let inp = normals(&mut rng, n * ic, 1.0);
        let w = normals(&mut rng, oc * ic, 0.5);
        let dout = normals(&mut rng, n * oc, 1.0);
        let dinp0 = normals(&mut rng, n * ic, 0.25);
        let dw0 = normals(&mut rng, oc * ic, 0.25);
        let (mut dinp, mut dw) = (dinp0.clone(), dw0.clone());
        ops::matmul_backward(&mut dinp, &mut dw, &dout, &inp, &w, ic, oc);
        let (mut d_dinp, mut d_dw) = (up(&dinp0), up(&dw0));
        dev.matmul_backward(
            &mut d_dinp,
            &mut d_dw,
            &up(&dout),
            &up(&inp),
            &up(&w),
            ic,
            oc,
        )
        .unwrap();
        let (mut ex_x, mut mag_x): (Vec<f64>, Vec<f64>) = (
            dinp0.iter().map(|&v| v as f64).collect(),
            dinp0.iter().map(|&v| (v as f64).abs()).collect(),
        );
        let (mut ex_w, mut mag_w): (Vec<f64>, Vec<f64>) = (
            dw0.iter().map(|&v| v as f64).collect(),
            dw0.iter().map(|&v| (v as f64).abs()).collect(),
        );
        for r in 0..n {
            for o in 0..oc {
                let g = dout[r * oc + o] as f64;
                for i in 0..ic {
                    let px = g * w[o * ic + i] as f64;
                    ex_x[r * ic + i] += px;
                    mag_x[r * ic + i] += px.abs();
                    let pw = g * inp[r * ic + i] as f64;
                    ex_w[o * ic + i] += pw;
                    mag_w[o * ic + i] += pw.abs();
                }
            }
        }
        let what = format!("backward n={n} ic={ic} oc={oc}");
        assert_within_dot_bound(
            &format!("{what} dinp device"),
            &down(&d_dinp),
            &ex_x,
            &mag_x,
            oc,
        );
        assert_within_dot_bound(&format!("{what} dinp cpu"), &dinp, &ex_x, &mag_x, oc);
        assert_within_dot_bound(
            &format!("{what} dweight device"),
            &down(&d_dw),
            &ex_w,
            &mag_w,
            n,
        );
        assert_within_dot_bound(&format!("{what} dweight cpu"), &dw, &ex_w, &mag_w, n);
    }
}

/// Shapes that do not fit are refused with the tensor named, before anything runs.
#[test]
fn matmul_shape_errors_name_the_tensor() {
    let dev = emulated();
    let inp = up(&[0.0f32; 12]);
    let w = up(&[0.0f32; 12]);
    let mut out = up(&[0.0f32; 8]);
    let e = dev.matmul_forward(&mut out, &inp, &w, 4, 3).unwrap_err();
    assert!(
        matches!(e, Error::ShapeMismatch { tensor: "out", .. }),
        "{e}"
    );
    let e = dev.matmul_forward(&mut out, &inp, &w, 5, 3).unwrap_err();
    assert!(
        matches!(
            e,
            Error::ShapeMismatch {
                tensor: "weight",
                ..
            }
        ),
        "{e}"
    );
    let e = dev.matmul_forward(&mut out, &inp, &w, 0, 3).unwrap_err();
    assert!(matches!(e, Error::Empty(_)), "{e}");
    let inp7 = up(&[0.0f32; 7]);
    let e = dev.matmul_forward(&mut out, &inp7, &w, 4, 3).unwrap_err();
    assert!(
        matches!(e, Error::ShapeMismatch { tensor: "inp", .. }),
        "{e}"
    );
}

/// Strided-batched GemmEx with bf16 operands and f32 compute: each matrix of the batch as the
/// column-major reference of its own (bf16 widened exactly), C in f32 or rounded once to bf16;
/// the type pairs cuBLAS does not accept for f32 compute are `CUBLAS_STATUS_NOT_SUPPORTED`.
#[test]
fn strided_batched_gemm_ex_in_bf16_with_f32_compute() {
    use cudarc::cublas::sys::cublasComputeType_t::CUBLAS_COMPUTE_32F;
    use cudarc::cublas::sys::cublasGemmAlgo_t;
    use cudarc::cublas::sys::cudaDataType_t::{CUDA_R_16BF, CUDA_R_16F, CUDA_R_32F};
    use half::bf16;
    let dev = emulated();
    let blas = *dev.blas().unwrap().handle();
    let mut rng = StdRng::seed_from_u64(21);
    // A op T stored k x m (lda = k + 1), B op N stored k x n (ldb = k), C m x n; 3 matrices, with
    // strides larger than one matrix.
    let (m, n, k, batch) = (6usize, 5usize, 9usize, 3usize);
    let (lda, ldb, ldc) = (k + 1, k, m);
    let (sa, sb, sc) = (lda * m + 3, ldb * n + 1, ldc * n + 2);
    let round = |v: Vec<f32>| -> Vec<bf16> { v.into_iter().map(bf16::from_f32).collect() };
    let a = round(normals(&mut rng, sa * batch, 1.0));
    let b = round(normals(&mut rng, sb * batch, 1.0));
    let c0 = normals(&mut rng, sc * batch, 1.0);
    let (alpha, beta) = (1.25f32, 0.5f32);
    let wide = |v: &[bf16]| -> Vec<f32> { v.iter().map(|x| x.to_f32()).collect() };
    let (a32, b32) = (wide(&a), wide(&b));
    let s = dev.stream();
    let (da, db) = (up(&a), up(&b));
    let mut dc32 = up(&c0);
    let mut dc16 = up(&round(c0.clone()));
    let c16_0 = wide(&round(c0.clone()));
    let call = |c: u64, ctype, atype| {
        let ((pa, _ga), (pb, _gb)) = (da.device_ptr(s), db.device_ptr(s));
        // SAFETY: each operand's batch extent lies inside its buffer (stride * batch elements).
        unsafe {
            cublas::gemm_strided_batched_ex(
                blas,
                CUBLAS_OP_T,
                CUBLAS_OP_N,
                m as i32,
                n as i32,
                k as i32,
                (&alpha as *const f32).cast(),
                pa as *const _,
                atype,
                lda as i32,
                sa as i64,
                pb as *const _,
                atype,
                ldb as i32,
                sb as i64,
                (&beta as *const f32).cast(),
                c as *mut _,
                ctype,
                ldc as i32,
                sc as i64,
                batch as i32,
                CUBLAS_COMPUTE_32F,
                cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        }
    };
    {
        let (p32, _g32) = dc32.device_ptr_mut(s);
        call(p32, CUDA_R_32F, CUDA_R_16BF).unwrap();
        let (p16, _g16) = dc16.device_ptr_mut(s);
        call(p16, CUDA_R_16BF, CUDA_R_16BF).unwrap();
        let unsupported = Err(cublas::CublasError(
            cublasStatus_t::CUBLAS_STATUS_NOT_SUPPORTED,
        ));
        // f32 operands into a bf16 C, and f16 (not implemented by the emulated cuBLAS).
        assert_eq!(call(p16, CUDA_R_16BF, CUDA_R_32F), unsupported);
        assert_eq!(call(p32, CUDA_R_32F, CUDA_R_16F), unsupported);
    }
    let (got32, got16) = (down(&dc32), wide(&down(&dc16)));
    for bi in 0..batch {
        let (ea, eb) = (&a32[bi * sa..], &b32[bi * sb..]);
        let c = &c0[bi * sc..bi * sc + ldc * n];
        let (exact, mag) = reference_gemm(
            true,
            false,
            m,
            n,
            k,
            alpha as f64,
            ea,
            lda,
            eb,
            ldb,
            beta as f64,
            c,
            ldc,
        );
        let g = &got32[bi * sc..bi * sc + ldc * n];
        assert_within_dot_bound(&format!("batch {bi} f32 C"), g, &exact, &mag, k);
        // bf16 C: the f32 result (from the bf16-rounded old C) rounded once more to 8 bits.
        let c16 = &c16_0[bi * sc..bi * sc + ldc * n];
        let (exact16, mag16) = reference_gemm(
            true,
            false,
            m,
            n,
            k,
            alpha as f64,
            ea,
            lda,
            eb,
            ldb,
            beta as f64,
            c16,
            ldc,
        );
        for (i, (&g, &e)) in got16[bi * sc..bi * sc + ldc * n]
            .iter()
            .zip(&exact16)
            .enumerate()
        {
            let bound = (k + 2) as f64 * U * 1.01 * mag16[i] + e.abs() / 256.0;
            assert!(
                (g as f64 - e).abs() <= bound,
                "batch {bi} bf16 C[{i}]: {g} vs {e}"
            );
        }
    }
    // Between the matrices of the batch (the stride padding) C is untouched.
    for bi in 0..batch {
        for at in bi * sc + ldc * n..(bi + 1) * sc {
            assert_eq!(
                got32[at].to_bits(),
                c0[at].to_bits(),
                "stride padding of C written"
            );
        }
    }
}
