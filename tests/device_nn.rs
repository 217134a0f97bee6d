//! The model's element-wise and row ops on the emulated device (`kernels/model_ops.cu`) against
//! their CPU twins in `model::ops`: the sums over rows (embedding and RMSNorm weight gradients) and
//! the purely element-wise ops without transcendentals agree to the bit; RMSNorm's row sums and
//! SwiGLU's exponential to a few ulps.
mod common;

use common::emulated;
use cudarc::driver::CudaSlice;
use distill_kernels::model::ops;
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

fn down(s: &CudaSlice<f32>) -> Vec<f32> {
    emulated().stream().clone_dtoh(s).unwrap()
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// Every element within `ulps` units in the last place of `want` (relative to the larger of the
/// two magnitudes and `floor`, for values near zero that are differences of larger terms).
fn assert_close(what: &str, got: &[f32], want: &[f32], ulps: f32, floor: f32) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let scale = g.abs().max(w.abs()).max(floor);
        assert!(
            (g - w).abs() <= ulps * f32::EPSILON * scale,
            "{what}[{i}]: device {g} vs CPU {w}"
        );
    }
}

#[test]
fn embedding_forward_and_backward_match_the_cpu_bit_for_bit() {
    let dev = emulated();
    let (vocab, c, n) = (50, 67, 300); // tokens repeat: the backward sums rows in position order
    let mut rng = StdRng::seed_from_u64(1);
    let wte = normals(&mut rng, vocab * c, 1.0);
    let tokens: Vec<u32> = (0..n).map(|_| rng.gen_range(0..vocab as u32)).collect();
    let mut out = vec![0.0; n * c];
    ops::embedding_forward(&mut out, &tokens, &wte, c);
    let mut d_out = up(&vec![f32::NAN; n * c]);
    let d_tokens = up(&tokens);
    dev.embedding_forward(&mut d_out, &d_tokens, &tokens, &up(&wte), c)
        .unwrap();
    assert!(bits(&down(&d_out)) == bits(&out));

    let dout = normals(&mut rng, n * c, 1.0);
    let mut dwte = normals(&mut rng, vocab * c, 0.1);
    let mut d_dwte = up(&dwte);
    ops::embedding_backward(&mut dwte, &tokens, &dout, c);
    dev.embedding_backward(&mut d_dwte, &d_tokens, &tokens, &up(&dout), c)
        .unwrap();
    assert!(bits(&down(&d_dwte)) == bits(&dwte));
}

#[test]
fn rmsnorm_forward_and_backward_match_the_cpu() {
    let dev = emulated();
    for (rows, c) in [(5, 64), (3, 1000), (2, 2500)] {
        let mut rng = StdRng::seed_from_u64(c as u64);
        let x = normals(&mut rng, rows * c, 2.0);
        let w = normals(&mut rng, c, 1.0);
        let (mut out, mut rstd) = (vec![0.0; rows * c], vec![0.0; rows]);
        ops::rmsnorm_forward(&mut out, &mut rstd, &x, &w, 1e-5);
        let (dx_, dw_) = (up(&x), up(&w));
        let (mut d_out, mut d_rstd) = (up(&vec![f32::NAN; rows * c]), up(&vec![f32::NAN; rows]));
        dev.rmsnorm_forward(&mut d_out, &mut d_rstd, &dx_, &dw_, 1e-5)
            .unwrap();
        // The row's sum of squares is a tree on the device and a left fold on the CPU.
        assert_close("rstd", &down(&d_rstd), &rstd, 4.0, 0.0);
        assert_close("out", &down(&d_out), &out, 8.0, 0.0);

        // Backward from the CPU's rstd, so that only the row sum differs for dinp and dweight
        // is the same fold.
        let dy = normals(&mut rng, rows * c, 1.0);
        let mut dinp = normals(&mut rng, rows * c, 0.1);
        let mut dweight = normals(&mut rng, c, 0.1);
        let (mut d_dinp, mut d_dweight) = (up(&dinp), up(&dweight));
        ops::rmsnorm_backward(&mut dinp, &mut dweight, &dy, &x, &w, &rstd);
        dev.rmsnorm_backward(
            &mut d_dinp,
            &mut d_dweight,
            &up(&dy),
            &dx_,
            &dw_,
            &up(&rstd),
        )
        .unwrap();
        assert!(
            bits(&down(&d_dweight)) == bits(&dweight),
            "dweight ({rows} x {c})"
        );
        assert_close("dinp", &down(&d_dinp), &dinp, 64.0, 1.0);
    }
}

#[test]
fn swiglu_and_residual_match_the_cpu() {
    let dev = emulated();
    let n = 10_007;
    let mut rng = StdRng::seed_from_u64(7);
    let (g, u, d) = (
        normals(&mut rng, n, 8.0),
        normals(&mut rng, n, 1.0),
        normals(&mut rng, n, 1.0),
    );
    let (dg_, du_, dd_) = (up(&g), up(&u), up(&d));
    let mut out = vec![0.0; n];
    ops::swiglu_forward(&mut out, &g, &u);
    let mut d_out = up(&vec![f32::NAN; n]);
    dev.swiglu_forward(&mut d_out, &dg_, &du_).unwrap();
    // expf differs between the device and the CPU's libm by an ulp or two.
    assert_close("swiglu out", &down(&d_out), &out, 8.0, 1e-30);
    let (mut dgate, mut dup) = (normals(&mut rng, n, 0.1), normals(&mut rng, n, 0.1));
    let (mut d_dgate, mut d_dup) = (up(&dgate), up(&dup));
    ops::swiglu_backward(&mut dgate, &mut dup, &d, &g, &u);
    dev.swiglu_backward(&mut d_dgate, &mut d_dup, &dd_, &dg_, &du_)
        .unwrap();
    assert_close("dgate", &down(&d_dgate), &dgate, 16.0, 0.1);
    assert_close("dup", &down(&d_dup), &dup, 16.0, 0.1);

    let mut sum = vec![0.0; n];
    ops::residual_forward(&mut sum, &g, &u);
    let mut d_sum = up(&vec![f32::NAN; n]);
    dev.residual_forward(&mut d_sum, &dg_, &du_).unwrap();
    assert!(bits(&down(&d_sum)) == bits(&sum));
    let (mut da, mut db) = (normals(&mut rng, n, 1.0), normals(&mut rng, n, 1.0));
    let (mut d_da, mut d_db) = (up(&da), up(&db));
    ops::residual_backward(&mut da, &mut db, &d);
    dev.residual_backward(&mut d_da, &mut d_db, &dd_).unwrap();
    assert!(bits(&down(&d_da)) == bits(&da) && bits(&down(&d_db)) == bits(&db));
}

#[test]
fn bias_forward_and_backward_match_the_cpu_bit_for_bit() {
    let dev = emulated();
    let (n, c) = (301, 70); // more rows than a block's threads, a width that is no power of 2
    let mut rng = StdRng::seed_from_u64(5);
    let bias = normals(&mut rng, c, 1.0);
    let mut out = normals(&mut rng, n * c, 2.0);
    let mut d_out = up(&out);
    ops::bias_forward(&mut out, &bias, c);
    dev.bias_forward(&mut d_out, &up(&bias)).unwrap();
    assert!(bits(&down(&d_out)) == bits(&out));

    let dout = normals(&mut rng, n * c, 1.0);
    let mut dbias = normals(&mut rng, c, 0.1);
    let mut d_dbias = up(&dbias);
    ops::bias_backward(&mut dbias, &dout, c);
    dev.bias_backward(&mut d_dbias, &up(&dout)).unwrap();
    assert!(bits(&down(&d_dbias)) == bits(&dbias));
    // A tensor that is not whole rows of the bias is an error naming it.
    let e = dev
        .bias_forward(&mut up(&vec![0.0f32; 2 * c + 1]), &up(&bias))
        .unwrap_err();
    assert!(e.to_string().contains("out"), "{e}");
}

#[test]
fn bad_shapes_and_tokens_are_errors_naming_the_tensor() {
    let dev = emulated();
    let wte = up(&[0.0f32; 10 * 4]);
    let mut out = up(&[0.0f32; 3 * 4]);
    let tokens = [1u32, 2, 10];
    let e = dev
        .embedding_forward(&mut out, &up(&tokens), &tokens, &wte, 4)
        .unwrap_err()
        .to_string();
    assert!(e.contains("10 at position 2"), "{e}");
    let ok_tokens = [1u32, 2, 3];
    let mut short = up(&[0.0f32; 11]);
    let e = dev
        .embedding_forward(&mut short, &up(&ok_tokens), &ok_tokens, &wte, 4)
        .unwrap_err()
        .to_string();
    assert!(e.contains("out"), "{e}");
    let (mut o, mut r) = (up(&[0.0f32; 8]), up(&[0.0f32; 2]));
    let e = dev
        .rmsnorm_forward(&mut o, &mut r, &up(&[1.0f32; 7]), &up(&[1.0f32; 4]), 1e-5)
        .unwrap_err()
        .to_string();
    assert!(e.contains("inp"), "{e}");
    let mut da = up(&[0.0f32; 5]);
    let mut db = up(&[0.0f32; 6]);
    let e = dev
        .residual_backward(&mut da, &mut db, &up(&[0.0f32; 5]))
        .unwrap_err()
        .to_string();
    assert!(e.contains("db"), "{e}");
}

#[test]
fn rope_forward_and_backward_match_the_cpu_bit_for_bit() {
    let dev = emulated();
    let mut rng = StdRng::seed_from_u64(9);
    // (batch, seq, heads, head_dim): one token, one head, odd sequence lengths, head sizes 2..128
    // that are not powers of two; tables built for a longer sequence than the one rotated.
    for &(b, seq, heads, hd) in &[(1, 1, 1, 2), (2, 7, 3, 6), (3, 5, 1, 34), (1, 13, 2, 128)] {
        let (cos, sin) = ops::rope_tables::<f32>(seq + 3, hd, 10000.0);
        let x = normals(&mut rng, b * seq * heads * hd, 1.0);
        let (d_cos, d_sin) = (up(&cos), up(&sin));
        let mut want = x.clone();
        ops::rope_forward(&mut want, &cos, &sin, seq, heads, hd);
        let mut d_x = up(&x);
        dev.rope_forward(&mut d_x, &d_cos, &d_sin, seq, heads, hd)
            .unwrap();
        assert!(
            bits(&down(&d_x)) == bits(&want),
            "rope_forward {b}x{seq}x{heads}x{hd}"
        );
        let mut want_b = x.clone();
        ops::rope_backward(&mut want_b, &cos, &sin, seq, heads, hd);
        let mut d_g = up(&x);
        dev.rope_backward(&mut d_g, &d_cos, &d_sin, seq, heads, hd)
            .unwrap();
        assert!(
            bits(&down(&d_g)) == bits(&want_b),
            "rope_backward {b}x{seq}x{heads}x{hd}"
        );
        // The backward undoes the forward (a rotation): to rounding.
        let mut round_trip = want.clone();
        ops::rope_backward(&mut round_trip, &cos, &sin, seq, heads, hd);
        assert_close("rope round trip", &round_trip, &x, 8.0, 1.0);
    }
}

#[test]
fn rope_rejects_bad_shapes_with_the_tensor_named() {
    let dev = emulated();
    let (cos, sin) = ops::rope_tables::<f32>(4, 8, 10000.0);
    let (d_cos, d_sin) = (up(&cos), up(&sin));
    let mut x = up(&vec![0.0f32; 2 * 4 * 8]);
    let e = dev
        .rope_forward(&mut x, &d_cos, &d_sin, 5, 2, 8)
        .unwrap_err();
    assert!(e.to_string().contains("cos"), "{e}");
    let e = dev
        .rope_forward(&mut x, &d_cos, &d_sin, 4, 3, 8)
        .unwrap_err();
    assert!(e.to_string().contains("x"), "{e}");
    let e = dev
        .rope_forward(&mut x, &d_cos, &d_sin, 4, 2, 7)
        .unwrap_err();
    assert!(e.to_string().contains("head_dim"), "{e}");
}

#[test]
fn copy_rows_moves_a_block_between_row_strides() {
    let dev = emulated();
    let (rows, width, src_stride, dst_stride) = (5, 3, 7, 4);
    let src: Vec<f32> = (0..rows * src_stride).map(|i| i as f32).collect();
    // The destination starts one column in: the block's first element, not the buffer's.
    let start = 1;
    let dst_len = start + (rows - 1) * dst_stride + width;
    let mut d_dst = up(&vec![-1.0f32; dst_len]);
    let d_src = up(&src);
    {
        let mut view = d_dst.slice_mut(start..dst_len);
        dev.copy_rows(&mut view, dst_stride, &d_src, src_stride, rows, width)
            .unwrap();
    }
    let got = down(&d_dst);
    let mut want = vec![-1.0f32; dst_len];
    for r in 0..rows {
        for j in 0..width {
            want[start + r * dst_stride + j] = src[r * src_stride + j];
        }
    }
    assert_eq!(bits(&got), bits(&want), "copied {got:?}");

    // A stride below the width, or a buffer too short for the block, is an error naming it.
    let e = dev
        .copy_rows(&mut d_dst, 2, &d_src, src_stride, rows, width)
        .unwrap_err();
    assert!(e.to_string().contains("dst: 2"), "{e}");
    let short = up(&vec![0.0f32; (rows - 1) * src_stride + width - 1]);
    let e = dev
        .copy_rows(&mut d_dst, dst_stride, &short, src_stride, rows, width)
        .unwrap_err();
    assert!(e.to_string().contains("src"), "{e}");
}
