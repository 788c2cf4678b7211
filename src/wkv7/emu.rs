//! WKV-7 on the emulated backend: the CUDA kernels of `kernels/wkv7_v*.cu`
//! compiled for the CPU, run on host buffers (any [`Version`]).
use super::{Dims, Dir, GradInputs, Grads, Inputs, Outputs, Version};
use crate::dtype::IoType;
use crate::error::Result;

fn addr<T>(s: &[T]) -> u64 {
    s.as_ptr() as u64
}
fn addr_mut<T>(s: &mut [T]) -> u64 {
    s.as_mut_ptr() as u64
}

/// Forward on host buffers (lengths already checked by the caller).
pub fn forward<X: IoType>(ver: Version, d: &Dims, x: &Inputs<X>) -> Result<Outputs<X>> {
    let name = ver.kernel_name(Dir::Fwd, X::DTYPE, d.n)?;
    let mut y = vec![X::default(); d.seq_len()];
    let mut h_t = vec![0f32; d.state_len()];
    let mut p = ver.base_params(d);
    set_inputs(&mut p, x);
    p.y = addr_mut(&mut y);
    p.h_t = addr_mut(&mut h_t);
    let (g, b) = ver.launch_dims(d);
    // SAFETY: every pointer in `p` refers to a live Vec/slice of the length
    // params.h documents for these sizes (inputs checked by the caller,
    // outputs allocated above); ckpt and scratch are null (not used).
    unsafe { crate::emu::launch_wkv7(&name, g, b, &p)? };
    Ok(Outputs { y, h_t })
}

/// Forward (saving chunk states) then backward, on host buffers.
pub fn forward_backward<X: IoType>(
    ver: Version,
    d: &Dims,
    x: &Inputs<X>,
    gi: &GradInputs<X>,
) -> Result<(Outputs<X>, Grads<X>)> {
    let fwd = ver.kernel_name(Dir::Fwd, X::DTYPE, d.n)?;
    let bwd = ver.kernel_name(Dir::Bwd, X::DTYPE, d.n)?;
    let sl = d.seq_len();
    let mut y = vec![X::default(); sl];
    let mut h_t = vec![0f32; d.state_len()];
    let mut ckpt = vec![0f32; ver.ckpt_len(d)];
    let mut scratch = vec![0f32; ver.scratch_len(d)];
    let z = || vec![X::default(); sl];
    let mut g = Grads {
        dr: z(),
        dw: z(),
        dk: z(),
        dv: z(),
        da: z(),
        db: z(),
        dh0: vec![0f32; d.state_len()],
    };
    let mut p = ver.base_params(d);
    set_inputs(&mut p, x);
    p.y = addr_mut(&mut y);
    p.h_t = addr_mut(&mut h_t);
    p.ckpt = addr_mut(&mut ckpt);
    p.dy = addr(gi.dy);
    p.dh_t = gi.dh_t.map_or(0, addr);
    p.dr = addr_mut(&mut g.dr);
    p.dw = addr_mut(&mut g.dw);
    p.dk = addr_mut(&mut g.dk);
    p.dv = addr_mut(&mut g.dv);
    p.da = addr_mut(&mut g.da);
    p.db = addr_mut(&mut g.db);
    p.dh0 = addr_mut(&mut g.dh0);
    p.scratch = addr_mut(&mut scratch);
    let (gd, bd) = ver.launch_dims(d);
    // SAFETY: as in `forward`; additionally ckpt and scratch (lengths from
    // `ver`, as params.h documents for that version) and every gradient buffer are allocated
    // above with exactly the documented sizes, and dy / dh_t were checked.
    unsafe {
        crate::emu::launch_wkv7(&fwd, gd, bd, &p)?;
        crate::emu::launch_wkv7(&bwd, gd, bd, &p)?;
    }
    Ok((Outputs { y, h_t }, g))
}

/// Runs the emulated `ver` kernel for `dir` and `dtype` with parameters
/// whose pointers are host addresses: the emulator's counterpart of
/// `super::cuda::Wkv7Kernels::launch_raw` (feature `cuda`), with the same checks of the
/// sizes, `chunk` and `n_chunks` ([`super::raw_dims`]).
///
/// # Safety
/// Every non-zero address in `p` must be host memory of the size
/// `kernels/params.h` documents for the sizes in `p` and version `ver`,
/// valid for the duration of the call, with the outputs not aliased.
pub unsafe fn launch_raw(
    ver: Version,
    dir: Dir,
    dtype: crate::dtype::DType,
    p: &crate::params::Wkv7Params,
) -> Result<()> {
    let d = super::raw_dims(ver, p)?;
    let name = ver.kernel_name(dir, dtype, d.n)?;
    let (g, b) = ver.launch_dims(&d);
    // SAFETY: forwarded from the caller; the sizes were checked above.
    unsafe { crate::emu::launch_wkv7(&name, g, b, p) }
}

fn set_inputs<X>(p: &mut crate::params::Wkv7Params, x: &Inputs<X>) {
    p.r = addr(x.r);
    p.w = addr(x.w);
    p.k = addr(x.k);
    p.v = addr(x.v);
    p.a = addr(x.a);
    p.b = addr(x.b);
    p.h0 = x.h0.map_or(0, addr);
}

fn check_at_least(name: &str, len: usize, want: usize) -> Result<()> {
    if len < want {
        return Err(crate::error::Error::Shape {
            name: name.into(),
            expected: vec![want],
            got: vec![len],
        });
    }
    Ok(())
}

/// Forward that writes `y`, the chunk checkpoints and (when given) the
/// final state `h_t` into the caller's buffers (for [`backward_ckpt`]);
/// `x.h0` is read, never written.
/// `ckpt` ≥ [`Version::ckpt_len`].
pub fn forward_ckpt(
    ver: Version,
    d: &Dims,
    x: &Inputs<f32>,
    y: &mut [f32],
    ckpt: &mut [f32],
    h_t: Option<&mut [f32]>,
) -> Result<()> {
    x.check(d)?;
    let ver = ver.effective(d, x.w);
    check_at_least("y", y.len(), d.seq_len())?;
    check_at_least("ckpt", ckpt.len(), ver.ckpt_len(d))?;
    if let Some(ht) = &h_t {
        check_at_least("h_t", ht.len(), d.state_len())?;
    }
    let name = ver.kernel_name(Dir::Fwd, crate::dtype::DType::F32, d.n)?;
    let mut p = ver.base_params(d);
    set_inputs(&mut p, x);
    p.y = addr_mut(y);
    p.ckpt = addr_mut(ckpt);
    p.h_t = h_t.map_or(0, addr_mut);
    let (g, b) = ver.launch_dims(d);
    // SAFETY: the inputs were checked against `d` above, y, ckpt and h_t
    // (when given; a distinct &mut from h0) hold at least the documented
    // lengths; scratch is null (unused by the forward); all buffers outlive
    // the synchronous call.
    unsafe { crate::emu::launch_wkv7(&name, g, b, &p) }
}

/// Backward from the checkpoints [`forward_ckpt`] wrote for the same
/// inputs (no forward recompute), zero gradient on the final state.
/// `grads` = dr … db `[B, T, H, N]`, `dh0` `[B, H, N, N]` (overwritten);
/// `scratch` ≥ [`Version::scratch_len`].
#[allow(clippy::too_many_arguments)]
pub fn backward_ckpt(
    ver: Version,
    d: &Dims,
    x: &Inputs<f32>,
    ckpt: &[f32],
    dy: &[f32],
    grads: [&mut [f32]; 6],
    dh0: &mut [f32],
    scratch: &mut [f32],
) -> Result<()> {
    x.check(d)?;
    let ver = ver.effective(d, x.w);
    check_at_least("ckpt", ckpt.len(), ver.ckpt_len(d))?;
    check_at_least("scratch", scratch.len(), ver.scratch_len(d))?;
    check_at_least("dy", dy.len(), d.seq_len())?;
    check_at_least("dh0", dh0.len(), d.state_len())?;
    for g in &grads {
        check_at_least("gradient", g.len(), d.seq_len())?;
    }
    let name = ver.kernel_name(Dir::Bwd, crate::dtype::DType::F32, d.n)?;
    let mut p = ver.base_params(d);
    set_inputs(&mut p, x);
    p.ckpt = ckpt.as_ptr() as u64;
    p.dy = addr(dy);
    let [dr, dw, dk, dv, da, db] = grads;
    p.dr = addr_mut(dr);
    p.dw = addr_mut(dw);
    p.dk = addr_mut(dk);
    p.dv = addr_mut(dv);
    p.da = addr_mut(da);
    p.db = addr_mut(db);
    p.dh0 = addr_mut(dh0);
    p.scratch = addr_mut(scratch);
    let (g, b) = ver.launch_dims(d);
    // SAFETY: every length was checked above against what params.h documents
    // for this version and `d`; the gradient buffers are distinct &mut
    // borrows; ckpt is only read; dh_t is null (zero final-state gradient).
    unsafe { crate::emu::launch_wkv7(&name, g, b, &p) }
}
