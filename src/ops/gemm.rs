//! The CPU matrix products, generic over the float type ([`Real`]): `y =
//! x·Wᵀ` (`xwt_ld`, W stored `[n, k]` as `nn.Linear`) and `y = x·W` (`xw`,
//! W `[k, n]`), register-blocked, compiled for AVX2+FMA when the CPU has it
//! (checked at run time), split over rows across threads when large. Used
//! by the CPU ops backend (`CpuOps`'s
//! `matmul` / `matmul_t`), so both run the same code.
// The kernels walk several parallel arrays with one index.
#![allow(clippy::needless_range_loop)]
use rayon::prelude::*;

use crate::real::Real;

#[inline(always)]
pub(crate) fn madd<R: Real, const F: bool>(a: R, b: R, c: R) -> R {
    if F {
        a.mul_add(b, c)
    } else {
        a * b + c
    }
}

#[inline(always)]
pub(crate) fn dot_imp<R: Real, const F: bool>(a: &[R], b: &[R]) -> R {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut acc = [R::ZERO; 8];
    let ca = a.chunks_exact(8);
    let cb = b.chunks_exact(8);
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for l in 0..8 {
            acc[l] = madd::<R, F>(x[l], y[l], acc[l]);
        }
    }
    let mut s = R::ZERO;
    for (x, y) in ra.iter().zip(rb) {
        s = madd::<R, F>(*x, *y, s);
    }
    ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7])) + s
}

/// Output columns per packed panel of [`xwt_imp`].
const NB: usize = 16;

/// `acc[q][l] += Σ_i x_q[i] · p[i][l]` for up to four rows `x_q` and a panel
/// `p` (`[k][NB]`).
#[inline(always)]
fn panel4<R: Real, const F: bool, const M: usize>(
    xs: [&[R]; M],
    p: &[R],
    k: usize,
) -> [[R; NB]; M] {
    let mut acc = [[R::ZERO; NB]; M];
    for i in 0..k {
        let pv: &[R; NB] = p[i * NB..(i + 1) * NB].try_into().expect("panel row");
        for q in 0..M {
            let xv = xs[q][i];
            for l in 0..NB {
                acc[q][l] = madd::<R, F>(xv, pv[l], acc[q][l]);
            }
        }
    }
    acc
}

/// `y[t, j] = Σ_i x[t, i] · w[j, i]` (w stored `[n, k]`, e.g. `nn.Linear`).
/// Blocks of [`NB`] output columns are transposed into a `[k][NB]` panel,
/// then four rows at a time accumulate in registers.
#[inline(always)]
fn xwt_imp<R: Real, const F: bool>(
    x: &[R],
    ldx: usize,
    rows: usize,
    k: usize,
    w: &[R],
    n: usize,
    y: &mut [R],
) {
    let mut pack = vec![R::ZERO; k * NB];
    let mut j0 = 0;
    while j0 < n {
        let nb = NB.min(n - j0);
        for l in 0..NB {
            if l < nb {
                let wr = &w[(j0 + l) * k..(j0 + l + 1) * k];
                for (i, &v) in wr.iter().enumerate() {
                    pack[i * NB + l] = v;
                }
            } else {
                for i in 0..k {
                    pack[i * NB + l] = R::ZERO;
                }
            }
        }
        let mut t = 0;
        while t + 4 <= rows {
            let xs = [
                &x[t * ldx..t * ldx + k],
                &x[(t + 1) * ldx..(t + 1) * ldx + k],
                &x[(t + 2) * ldx..(t + 2) * ldx + k],
                &x[(t + 3) * ldx..(t + 3) * ldx + k],
            ];
            let acc = panel4::<R, F, 4>(xs, &pack, k);
            for (q, a) in acc.iter().enumerate() {
                y[(t + q) * n + j0..(t + q) * n + j0 + nb].copy_from_slice(&a[..nb]);
            }
            t += 4;
        }
        while t < rows {
            let acc = panel4::<R, F, 1>([&x[t * ldx..t * ldx + k]], &pack, k);
            y[t * n + j0..t * n + j0 + nb].copy_from_slice(&acc[0][..nb]);
            t += 1;
        }
        j0 += nb;
    }
}

/// `y[t, :] = Σ_i x[t, i] · w[i, :]` (w stored `[k, n]`); zero inputs skipped.
#[inline(always)]
fn xw_imp<R: Real, const F: bool>(
    x: &[R],
    ldx: usize,
    rows: usize,
    k: usize,
    w: &[R],
    n: usize,
    y: &mut [R],
) {
    const KB: usize = 64;
    y[..rows * n].iter_mut().for_each(|v| *v = R::ZERO);
    let mut i0 = 0;
    while i0 < k {
        let i1 = (i0 + KB).min(k);
        for t in 0..rows {
            let yr = &mut y[t * n..(t + 1) * n];
            let xr = &x[t * ldx..t * ldx + k];
            let mut i = i0;
            while i + 4 <= i1 {
                let (a0, a1, a2, a3) = (xr[i], xr[i + 1], xr[i + 2], xr[i + 3]);
                if a0 != R::ZERO || a1 != R::ZERO || a2 != R::ZERO || a3 != R::ZERO {
                    let w0 = &w[i * n..(i + 1) * n];
                    let w1 = &w[(i + 1) * n..(i + 2) * n];
                    let w2 = &w[(i + 2) * n..(i + 3) * n];
                    let w3 = &w[(i + 3) * n..(i + 4) * n];
                    for j in 0..n {
                        let s = madd::<R, F>(a0, w0[j], yr[j]);
                        let s = madd::<R, F>(a1, w1[j], s);
                        let s = madd::<R, F>(a2, w2[j], s);
                        yr[j] = madd::<R, F>(a3, w3[j], s);
                    }
                }
                i += 4;
            }
            while i < i1 {
                let a = xr[i];
                if a != R::ZERO {
                    for (yv, wv) in yr.iter_mut().zip(&w[i * n..(i + 1) * n]) {
                        *yv = madd::<R, F>(a, *wv, *yv);
                    }
                }
                i += 1;
            }
        }
        i0 = i1;
    }
}

pub(crate) fn has_avx2_fma() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Defines `$name::<R>(args)` calling `$imp::<R, FMA>` compiled for AVX2+FMA
/// when the CPU has them, else for the baseline target.
macro_rules! dispatched {
    ($name:ident($($a:ident : $t:ty),* $(,)?) => $imp:ident) => {
        fn $name<R: $crate::real::Real>($($a: $t),*) {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx2,fma")]
                unsafe fn fast<R: $crate::real::Real>($($a: $t),*) {
                    $imp::<R, true>($($a),*)
                }
                if $crate::ops::gemm::has_avx2_fma() {
                    // SAFETY: the CPU reports avx2 and fma (checked just above).
                    return unsafe { fast::<R>($($a),*) };
                }
            }
            $imp::<R, false>($($a),*)
        }
    };
}

dispatched!(xwt_d(x: &[R], ldx: usize, rows: usize, k: usize, w: &[R], n: usize, y: &mut [R]) => xwt_imp);
dispatched!(xw_d(x: &[R], ldx: usize, rows: usize, k: usize, w: &[R], n: usize, y: &mut [R]) => xw_imp);

/// Multiply-adds above which one matrix product is split across threads.
const PAR_WORK: usize = 1 << 21;

/// Splits a product over row blocks when it is big enough to be worth it;
/// row `t` of x starts at `t·ldx`.
#[allow(clippy::too_many_arguments)]
fn par_split<R: Real>(
    x: &[R],
    ldx: usize,
    rows: usize,
    k: usize,
    n: usize,
    y: &mut [R],
    f: impl Fn(&[R], usize, &mut [R]) + Sync + Send,
) {
    if rows == 0 {
        return;
    }
    let threads = rayon::current_num_threads();
    if rows * k * n < PAR_WORK || rows < 8 || threads < 2 {
        f(x, rows, &mut y[..rows * n]);
        return;
    }
    let per = rows.div_ceil(threads * 2).div_ceil(4) * 4;
    y[..rows * n]
        .par_chunks_mut(per * n)
        .enumerate()
        .for_each(|(c, yc)| {
            let r0 = c * per;
            f(&x[r0 * ldx..], yc.len() / n, yc);
        });
}

/// `y = x · wᵀ` with `w` stored `[n, k]` (x: `[rows, k]`, y: `[rows, n]`),
/// row `t` of x at `x[t·ldx ..][..k]`.
pub(crate) fn xwt_ld<R: Real>(
    x: &[R],
    ldx: usize,
    rows: usize,
    k: usize,
    w: &[R],
    n: usize,
    y: &mut [R],
) {
    par_split(x, ldx, rows, k, n, y, |xc, r, yc| {
        xwt_d(xc, ldx, r, k, w, n, yc)
    });
}

/// `y = x · w` with `w` stored `[k, n]` (x: `[rows, k]`, y: `[rows, n]`).
pub(crate) fn xw<R: Real>(x: &[R], rows: usize, k: usize, w: &[R], n: usize, y: &mut [R]) {
    par_split(x, k, rows, k, n, y, |xc, r, yc| xw_d(xc, k, r, k, w, n, yc));
}
