//! Matrix multiplies on device buffers through cuBLAS (cudarc's `cublas` module): the device twins
//! of `crate::model::ops::matmul_{forward,backward}` (`nn.Linear` without bias, row-major), with
//! the same shapes and the same accumulate-into-the-gradient convention.
//!
//! cuBLAS is column-major: a row-major `[r, c]` buffer is the column-major `c x r` matrix, its
//! transpose. So `out[N, OC] = inp[N, IC] W[OC, IC]^T` is, column-major, `out^T = W inp^T`:
//! `m = OC, n = N, k = IC`, `A = W` stored `IC x OC` (op T, lda = IC), `B = inp` stored `IC x N`
//! (op N, ldb = IC), `ldc = OC`. Each call below states its mapping the same way.

use cudarc::cublas::sys::cublasOperation_t::{CUBLAS_OP_N, CUBLAS_OP_T};
use cudarc::cublas::{result as cublas, sys, CudaBlas};
use std::ffi::c_void;

use cudarc::driver::{DevicePtr, DevicePtrMut};

use super::ops::check_len as check;
use super::{CudaKernels, Storage};
use crate::error::{Error, Result};

/// One column-major GEMM `C = alpha op(A) op(B) + beta C` on raw device pointers.
struct Sgemm {
    during: &'static str,
    ta: sys::cublasOperation_t,
    tb: sys::cublasOperation_t,
    m: usize,
    n: usize,
    k: usize,
    a: u64,
    lda: usize,
    b: u64,
    ldb: usize,
    beta: f32,
    c: u64,
    ldc: usize,
    /// The dtype of A and B, and of C (f32 throughout: SGEMM; otherwise GemmEx with f32
    /// accumulation).
    ab_type: sys::cudaDataType,
    c_type: sys::cudaDataType,
}

/// cuBLAS's name of the storage type `T`.
fn cuda_type<T: Storage>() -> sys::cudaDataType {
    match T::SUFFIX {
        "bf16" => sys::cudaDataType::CUDA_R_16BF,
        _ => sys::cudaDataType::CUDA_R_32F,
    }
}

fn int(what: &'static str, v: usize) -> Result<i32> {
    i32::try_from(v).map_err(|_| Error::InvalidOption {
        name: what,
        value: v.to_string(),
        reason: "cuBLAS takes dimensions below 2^31",
    })
}

/// Whether a cuBLAS library can be loaded (cudarc would panic at its first cuBLAS call without
/// one when it loads it at run time; when the application links it, it is loaded already and this
/// finds it; on the emulated device it finds the emulated cuBLAS by its SONAME).
fn cublas_library_present() -> bool {
    let names: &[&str] = if cfg!(windows) {
        &["cublas64_13.dll", "cublas64_12.dll", "cublas64_11.dll"]
    } else {
        &[
            "libcublas.so",
            "libcublas.so.13",
            "libcublas.so.12",
            "libcublas.so.11",
        ]
    };
    names.iter().any(|name| {
        // SAFETY: loads the system's cuBLAS (or finds it loaded); its initializers are the
        // library's own, which cudarc would run next anyway.
        unsafe { libloading::Library::new(name) }.is_ok()
    })
}

impl CudaKernels {
    /// The cuBLAS handle on this device's stream (the emulated cuBLAS on the emulated device),
    /// created at the first use; for callers' own GEMMs in stream order with the crate's work.
    /// [`Error::DeviceUnavailable`] when no libcublas can be loaded.
    pub fn blas(&self) -> Result<&CudaBlas> {
        self.blas
            .get_or_init(|| {
                if !cublas_library_present() {
                    return Err(
                        "libcublas could not be loaded: install the CUDA toolkit's cuBLAS (or put \
                         its directory on LD_LIBRARY_PATH) to run the model's matmuls"
                            .to_string(),
                    );
                }
                CudaBlas::new(self.stream.clone())
                    .map_err(|e| format!("cuBLAS could not be initialised: {e:?}"))
            })
            .as_ref()
            .map_err(|e| Error::DeviceUnavailable(e.clone()))
    }

    fn sgemm(&self, g: Sgemm) -> Result<()> {
        let blas = self.blas()?;
        let (alpha, beta) = (1.0f32, g.beta);
        let shape = || format!("{} m={} n={} k={}", g.during, g.m, g.n, g.k);
        let f32_only =
            g.ab_type == sys::cudaDataType::CUDA_R_32F && g.c_type == sys::cudaDataType::CUDA_R_32F;
        // SAFETY: the callers checked every buffer's length against the shape, so each operand's
        // column-major extent (ld * (cols - 1) + rows) lies inside its buffer, in the element
        // type named beside it; the pointers stay valid while their guards live in the caller,
        // and the handle is on this device's stream.
        unsafe {
            if f32_only {
                cublas::sgemm(
                    *blas.handle(),
                    g.ta,
                    g.tb,
                    int("m", g.m)?,
                    int("n", g.n)?,
                    int("k", g.k)?,
                    &alpha,
                    g.a as *const f32,
                    int("lda", g.lda)?,
                    g.b as *const f32,
                    int("ldb", g.ldb)?,
                    &beta,
                    g.c as *mut f32,
                    int("ldc", g.ldc)?,
                )
            } else {
                cublas::gemm_ex(
                    *blas.handle(),
                    g.ta,
                    g.tb,
                    int("m", g.m)?,
                    int("n", g.n)?,
                    int("k", g.k)?,
                    &alpha as *const f32 as *const c_void,
                    g.a as *const c_void,
                    g.ab_type,
                    int("lda", g.lda)?,
                    g.b as *const c_void,
                    g.ab_type,
                    int("ldb", g.ldb)?,
                    &beta as *const f32 as *const c_void,
                    g.c as *mut c_void,
                    g.c_type,
                    int("ldc", g.ldc)?,
                    sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                    sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
                )
            }
        }
        .map_err(|source| Error::Cublas {
            during: shape(),
            source,
        })
    }

    /// `out = inp W^T`: inp `[N, IC]`, weight `[OC, IC]`, out `[N, OC]` (overwritten), all in
    /// the storage type `T` (bf16: GemmEx with f32 accumulation, the result rounded once).
    pub fn matmul_forward<T: Storage>(
        &self,
        out: &mut impl DevicePtrMut<T>,
        inp: &impl DevicePtr<T>,
        weight: &impl DevicePtr<T>,
        ic: usize,
        oc: usize,
    ) -> Result<()> {
        let n = self.check_matmul(inp.len(), weight.len(), ic, oc)?;
        check("out", out.len(), n * oc, format!("[{n}, {oc}]"))?;
        let s = self.stream();
        let (x, _x) = inp.device_ptr(s);
        let (w, _w) = weight.device_ptr(s);
        let (o, _o) = out.device_ptr_mut(s);
        // out^T (OC x N) = W (OC x IC, stored IC x OC: op T) . inp^T (IC x N).
        self.sgemm(Sgemm {
            during: "matmul_forward",
            ta: CUBLAS_OP_T,
            tb: CUBLAS_OP_N,
            m: oc,
            n,
            k: ic,
            a: w,
            lda: ic,
            b: x,
            ldb: ic,
            beta: 0.0,
            c: o,
            ldc: oc,
            ab_type: cuda_type::<T>(),
            c_type: cuda_type::<T>(),
        })
    }

    /// `dinp += dout W` and `dweight += dout^T inp`: `dweight` f32 whatever the storage type
    /// `T` of the others (a parameter gradient; bf16 operands accumulate into it in f32).
    #[allow(clippy::too_many_arguments)]
    pub fn matmul_backward<T: Storage>(
        &self,
        dinp: &mut impl DevicePtrMut<T>,
        dweight: &mut impl DevicePtrMut<f32>,
        dout: &impl DevicePtr<T>,
        inp: &impl DevicePtr<T>,
        weight: &impl DevicePtr<T>,
        ic: usize,
        oc: usize,
    ) -> Result<()> {
        let n = self.check_matmul(inp.len(), weight.len(), ic, oc)?;
        check("dweight", dweight.len(), oc * ic, format!("[{oc}, {ic}]"))?;
        check("dinp", dinp.len(), n * ic, format!("[{n}, {ic}]"))?;
        check("dout", dout.len(), n * oc, format!("[{n}, {oc}]"))?;
        let s = self.stream();
        let (x, _x) = inp.device_ptr(s);
        let (w, _w) = weight.device_ptr(s);
        let (dy, _dy) = dout.device_ptr(s);
        let (dx, _dx) = dinp.device_ptr_mut(s);
        let (dw, _dw) = dweight.device_ptr_mut(s);
        // dinp^T (IC x N) += W^T (IC x OC, stored so: op N) . dout^T (OC x N, stored so: op N).
        self.sgemm(Sgemm {
            during: "matmul_backward dinp",
            ta: CUBLAS_OP_N,
            tb: CUBLAS_OP_N,
            m: ic,
            n,
            k: oc,
            a: w,
            lda: ic,
            b: dy,
            ldb: oc,
            beta: 1.0,
            c: dx,
            ldc: ic,
            ab_type: cuda_type::<T>(),
            c_type: cuda_type::<T>(),
        })?;
        // dweight^T (IC x OC) += inp^T (IC x N, stored so: op N) . dout (N x OC, stored OC x N:
        // op T).
        self.sgemm(Sgemm {
            during: "matmul_backward dweight",
            ta: CUBLAS_OP_N,
            tb: CUBLAS_OP_T,
            m: ic,
            n: oc,
            k: n,
            a: x,
            lda: ic,
            b: dy,
            ldb: oc,
            beta: 1.0,
            c: dw,
            ldc: ic,
            ab_type: cuda_type::<T>(),
            c_type: sys::cudaDataType::CUDA_R_32F,
        })
    }

    /// The rows `N` of a matmul's input; every shape error named.
    fn check_matmul(&self, inp: usize, weight: usize, ic: usize, oc: usize) -> Result<usize> {
        if ic == 0 || oc == 0 {
            return Err(Error::Empty("matmul weight with no channels"));
        }
        check("weight", weight, oc * ic, format!("[{oc}, {ic}]"))?;
        if inp == 0 {
            return Err(Error::Empty("no rows"));
        }
        if !inp.is_multiple_of(ic) {
            return Err(Error::ShapeMismatch {
                tensor: "inp",
                expected: inp.next_multiple_of(ic),
                actual: inp,
                shape: format!("[N, {ic}]"),
            });
        }
        Ok(inp / ic)
    }
}
