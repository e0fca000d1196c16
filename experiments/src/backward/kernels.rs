//! The kernels both tapes share: GEMM into strided matrix views, linear layers forward and
//! backward with weight gradients written straight into their `[out, in]` layout, residual adds,
//! the layer-norm backward, and causal attention (grouped-query included) per (batch, head) in
//! parallel.
//!
//! Writes go through [`MatMut`], a strided view that owns the unique right to write its
//! elements for the lifetime of the `&mut [f32]` it came from. The parallel attention loops hand
//! every task its own tiles, cut by [`MatMut::grid`] from one view into disjoint row × column
//! blocks: no task ever holds a Rust reference to memory another task writes (an earlier version
//! gave each task a `&mut [f32]` running from its offset to the end of the buffer, so concurrent
//! tasks held overlapping `&mut` slices — undefined behaviour even though the elements they wrote
//! were disjoint). GEMM receives the tile's raw pointer and strides.

use std::marker::PhantomData;

use rayon::prelude::*;

use crate::ops::{causal_softmax_f32, col_sum, layer_norm_bwd_rows, softmax_bwd_f32};

/// A read-only matrix view: data, row stride, column stride (elements).
#[derive(Clone, Copy)]
pub(crate) struct Mat<'a> {
    d: &'a [f32],
    rs: usize,
    cs: usize,
}

pub(crate) fn mat(d: &[f32], rs: usize, cs: usize) -> Mat<'_> {
    Mat { d, rs, cs }
}

/// Checks that an (r, c) view with strides (rs, cs) fits in `len` elements.
fn fits(len: usize, r: usize, c: usize, rs: usize, cs: usize) -> bool {
    r == 0 || c == 0 || (r - 1) * rs + (c - 1) * cs < len
}

/// A writable `rows × cols` matrix with row stride `rs` and unit column stride: the unique
/// write access to those elements for `'a`. Made from a `&'a mut [f32]` ([`MatMut::new`], bounds
/// checked) or by splitting another `MatMut` into disjoint tiles ([`MatMut::grid`],
/// [`MatMut::split_cols`]); there is no way to make two views of one element.
pub(crate) struct MatMut<'a> {
    ptr: *mut f32,
    rows: usize,
    cols: usize,
    rs: usize,
    _borrow: PhantomData<&'a mut [f32]>,
}

// SAFETY: a `MatMut` is the only access path to its elements while it lives (it holds the
// buffer's unique borrow for `'a`, and tiles split from it cover disjoint elements), so moving it
// to another thread moves that exclusive access along, like moving a `&mut [f32]`.
unsafe impl Send for MatMut<'_> {}

impl<'a> MatMut<'a> {
    /// The `rows × cols` matrix with row stride `rs` at the start of `d`.
    pub(crate) fn new(d: &'a mut [f32], rows: usize, cols: usize, rs: usize) -> Self {
        assert!(
            cols <= rs || rows <= 1,
            "MatMut: {cols} columns do not fit a row stride of {rs}"
        );
        assert!(
            fits(d.len(), rows, cols, rs, 1),
            "MatMut: {rows} x {cols} (row stride {rs}) exceeds {} elements",
            d.len()
        );
        MatMut {
            ptr: d.as_mut_ptr(),
            rows,
            cols,
            rs,
            _borrow: PhantomData,
        }
    }

    /// A contiguous row-major `rows × cols` matrix filling `d`.
    pub(crate) fn dense(d: &'a mut [f32], cols: usize) -> Self {
        let rows = d.len().checked_div(cols).unwrap_or(0);
        Self::new(d, rows, cols, cols)
    }

    /// Cuts the matrix into tiles of `tile_rows × tile_cols` (which must divide its size): the
    /// result is indexed `[row block][column block]`. Row blocks cover disjoint rows and column
    /// blocks disjoint columns, so the tiles are pairwise disjoint and may be written in parallel.
    #[allow(clippy::manual_is_multiple_of)] // is_multiple_of needs Rust 1.87; MSRV is 1.85
    pub(crate) fn grid(self, tile_rows: usize, tile_cols: usize) -> Vec<Vec<MatMut<'a>>> {
        assert!(
            tile_rows > 0
                && tile_cols > 0
                && self.rows % tile_rows == 0
                && self.cols % tile_cols == 0,
            "MatMut::grid: {} x {} does not split into {tile_rows} x {tile_cols} tiles",
            self.rows,
            self.cols
        );
        (0..self.rows / tile_rows)
            .map(|rb| {
                (0..self.cols / tile_cols)
                    .map(|cb| MatMut {
                        // Row rb·tile_rows, column cb·tile_cols of this matrix: inside it, as rb
                        // and cb are below the block counts.
                        ptr: self
                            .ptr
                            .wrapping_add(rb * tile_rows * self.rs + cb * tile_cols),
                        rows: tile_rows,
                        cols: tile_cols,
                        rs: self.rs,
                        _borrow: PhantomData,
                    })
                    .collect()
            })
            .collect()
    }

    /// Splits the columns into blocks of `width` (which must divide them), left to right.
    pub(crate) fn split_cols(self, width: usize) -> Vec<MatMut<'a>> {
        let rows = self.rows;
        self.grid(rows.max(1), width)
            .into_iter()
            .next()
            .unwrap_or_default()
    }
}

/// `dst = a (m × k) · b (k × n)`, or `dst += a · b` with `acc`, for dst `m × n`. `threads > 1`
/// splits the product over the rayon pool (1 inside an already parallel loop).
pub(crate) fn gemm_into(
    dst: &mut MatMut<'_>,
    k: usize,
    acc: bool,
    a: Mat<'_>,
    b: Mat<'_>,
    threads: usize,
) {
    let (m, n) = (dst.rows, dst.cols);
    assert!(fits(a.d.len(), m, k, a.rs, a.cs), "gemm: lhs too small");
    assert!(fits(b.d.len(), k, n, b.rs, b.cs), "gemm: rhs too small");
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !acc {
            for r in 0..m {
                // SAFETY: row r of dst lies inside the checked view; `dst` is its only access
                // path (see `MatMut`), borrowed mutably here.
                unsafe { std::slice::from_raw_parts_mut(dst.ptr.add(r * dst.rs), n) }.fill(0.0);
            }
        }
        return;
    }
    let par = if threads > 1 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: dst is an m × n view with row stride rs inside the buffer it was made from (checked
    // by `MatMut::new`, kept by `grid`), written only through this `&mut MatMut`; the inputs were
    // checked above to lie inside their slices, which are shared borrows and so cannot overlap
    // the exclusively borrowed destination.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.ptr,
            1,
            dst.rs as isize,
            acc,
            a.d.as_ptr(),
            a.cs as isize,
            a.rs as isize,
            b.d.as_ptr(),
            b.cs as isize,
            b.rs as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            par,
        )
    }
}

/// `x (N × K) · wᵀ (+ bias)` for w `[out, k]`.
pub(crate) fn linear_fwd(
    x: &[f32],
    w: &[f32],
    bias: Option<&[f32]>,
    k: usize,
    out: usize,
    threads: usize,
) -> Vec<f32> {
    let n = x.len() / k.max(1);
    let mut y = match bias {
        Some(b) => {
            let mut y = Vec::with_capacity(n * out);
            for _ in 0..n {
                y.extend_from_slice(b);
            }
            y
        }
        None => vec![0f32; n * out],
    };
    gemm_into(
        &mut MatMut::dense(&mut y, out),
        k,
        bias.is_some(),
        mat(x, k, 1),
        mat(w, 1, k),
        threads,
    );
    y
}

/// A linear layer's (dw `[out, k]`, db when it has a bias), when it trains.
pub(crate) type LinGrads = Option<(Vec<f32>, Option<Vec<f32>>)>;

/// Gradients of `x · wᵀ (+ b)` from `g` (N × out): `dx` (N × k) written into `dx` (or added,
/// with `add`), and dw `[out, k]` (+ db) when `want_w`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn linear_bwd_into(
    x: &[f32],
    w: &[f32],
    g: &[f32],
    k: usize,
    out: usize,
    dx: Option<(&mut [f32], bool)>,
    want_w: bool,
    has_bias: bool,
    threads: usize,
) -> LinGrads {
    let n = g.len() / out.max(1);
    if let Some((dx, add)) = dx {
        gemm_into(
            &mut MatMut::dense(dx, k),
            out,
            add,
            mat(g, out, 1),
            mat(w, k, 1),
            threads,
        );
    }
    want_w.then(|| {
        let mut dw = vec![0f32; out * k];
        gemm_into(
            &mut MatMut::dense(&mut dw, k),
            n,
            false,
            mat(g, 1, out),
            mat(x, k, 1),
            threads,
        );
        (dw, has_bias.then(|| col_sum(g, out, 0, out)))
    })
}

/// [`linear_bwd_into`] with a fresh dx.
#[allow(clippy::too_many_arguments)]
pub(crate) fn linear_bwd(
    x: &[f32],
    w: &[f32],
    g: &[f32],
    k: usize,
    out: usize,
    want_w: bool,
    has_bias: bool,
    threads: usize,
) -> (Vec<f32>, LinGrads) {
    let n = g.len() / out.max(1);
    let mut dx = vec![0f32; n * k];
    let r = linear_bwd_into(
        x,
        w,
        g,
        k,
        out,
        Some((&mut dx, false)),
        want_w,
        has_bias,
        threads,
    );
    (dx, r)
}

/// Layer norm backward: adds dx into `dx_acc` (if given) and returns (dw, db) when trained.
pub(crate) fn ln_bwd(
    x: &[f32],
    w: &[f32],
    g: &[f32],
    eps: f64,
    dx_acc: Option<&mut [f32]>,
    want_w: bool,
) -> Option<(Vec<f32>, Vec<f32>)> {
    let c = w.len();
    let both = layer_norm_bwd_rows(x, w, g, eps); // rows of [dx | g ⊙ x̂]
    if let Some(acc) = dx_acc {
        acc.par_chunks_mut(c * 256)
            .zip(both.par_chunks(2 * c * 256))
            .for_each(|(a, bo)| {
                for (arow, brow) in a.chunks_exact_mut(c).zip(bo.chunks_exact(2 * c)) {
                    for (av, &bv) in arow.iter_mut().zip(&brow[..c]) {
                        *av += bv;
                    }
                }
            });
    }
    want_w.then(|| (col_sum(&both, 2 * c, c, c), col_sum(g, c, 0, c)))
}

/// `acc += x`, elementwise, in parallel.
pub(crate) fn add_into(acc: &mut [f32], x: &[f32]) {
    acc.par_chunks_mut(1 << 15)
        .zip(x.par_chunks(1 << 15))
        .for_each(|(a, b)| {
            for (av, &bv) in a.iter_mut().zip(b) {
                *av += bv;
            }
        });
}

// ---- attention --------------------------------------------------------------------------------

/// Sizes of one attention: B windows of T positions, `nh` query heads and `nkv` key/value heads
/// (`nh / nkv` query heads share one; GPT-2 has `nkv = nh`), head width `hd`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct AttnShape {
    pub(crate) b: usize,
    pub(crate) t: usize,
    pub(crate) nh: usize,
    pub(crate) nkv: usize,
    pub(crate) hd: usize,
}

impl AttnShape {
    fn n_rep(&self) -> usize {
        self.nh / self.nkv
    }

    fn scale(&self) -> f32 {
        1.0 / (self.hd as f32).sqrt()
    }
}

/// Where the heads of q, k or v live: in `d`, row `b·T + t` at `rs` elements apart, head h in
/// columns `off + h·hd ..`. GPT-2 reads all three in place from its qkv projection this way.
#[derive(Clone, Copy)]
pub(crate) struct Heads<'a> {
    pub(crate) d: &'a [f32],
    pub(crate) rs: usize,
    pub(crate) off: usize,
}

impl<'a> Heads<'a> {
    /// Head `h` of window `bi`: a T × hd view (`trans`: read transposed, hd × T).
    fn view(&self, s: &AttnShape, bi: usize, h: usize, trans: bool) -> Mat<'a> {
        let d = &self.d[bi * s.t * self.rs + self.off + h * s.hd..];
        if trans {
            mat(d, 1, self.rs)
        } else {
            mat(d, self.rs, 1)
        }
    }
}

/// Causal attention forward: per (window, query head), scores `q kᵀ`, the scaled causal softmax
/// (kept, B·nh × T × T) and `y = P v` written into the head's columns of `y` (N × nh·hd).
pub(crate) fn attention_fwd(
    s: &AttnShape,
    q: Heads<'_>,
    k: Heads<'_>,
    v: Heads<'_>,
    y: &mut [f32],
) -> Vec<f32> {
    let (t, hd, nh) = (s.t, s.hd, s.nh);
    let mut p = vec![0f32; s.b * nh * t * t];
    let tiles: Vec<MatMut<'_>> = MatMut::dense(y, nh * hd)
        .grid(t, hd)
        .into_iter()
        .flatten()
        .collect();
    let n_rep = s.n_rep();
    let scale = s.scale();
    p.par_chunks_mut(t * t)
        .zip(tiles)
        .enumerate()
        .for_each(|(bh, (pm, mut yt))| {
            let (bi, h) = (bh / nh, bh % nh);
            let g = h / n_rep;
            let mut pv = MatMut::dense(pm, t);
            gemm_into(
                &mut pv,
                hd,
                false,
                q.view(s, bi, h, false),
                k.view(s, bi, g, true),
                1,
            );
            causal_softmax_f32(pm, t, scale);
            gemm_into(&mut yt, t, false, mat(pm, t, 1), v.view(s, bi, g, false), 1);
        });
    p
}

/// The three gradient tiles one attention-backward task writes: dq for the `n_rep` query heads
/// of one key/value head (T × n_rep·hd), and that head's dk and dv (T × hd each).
pub(crate) struct AttnGradTiles<'a> {
    pub(crate) dq: MatMut<'a>,
    pub(crate) dk: MatMut<'a>,
    pub(crate) dv: MatMut<'a>,
}

/// Causal attention backward from `dy` (heads as in `y`), with the probabilities `p` of
/// [`attention_fwd`]. One task per (window, key/value head), in the order of `tiles`
/// (`bi · nkv + g`); it loops over the query heads sharing that key/value head, so the dk and dv
/// of the group are summed inside the task and no two tasks write the same element.
pub(crate) fn attention_bwd(
    s: &AttnShape,
    q: Heads<'_>,
    k: Heads<'_>,
    v: Heads<'_>,
    p: &[f32],
    dy: Heads<'_>,
    tiles: Vec<AttnGradTiles<'_>>,
) {
    let (t, hd, nkv) = (s.t, s.hd, s.nkv);
    let n_rep = s.n_rep();
    let scale = s.scale();
    assert_eq!(
        tiles.len(),
        s.b * nkv,
        "attention backward: one tile set per task"
    );
    assert_eq!(
        p.len(),
        s.b * s.nh * t * t,
        "attention backward: probabilities"
    );
    tiles
        .into_par_iter()
        .enumerate()
        .for_each(|(task, AttnGradTiles { dq, mut dk, mut dv })| {
            let (bi, g) = (task / nkv, task % nkv);
            let mut ds = vec![0f32; t * t];
            for (r, mut dqh) in dq.split_cols(hd).into_iter().enumerate() {
                let h = g * n_rep + r;
                let pm = &p[(bi * s.nh + h) * t * t..(bi * s.nh + h + 1) * t * t];
                let dyh = dy.view(s, bi, h, false);
                // dP = dy vᵀ
                gemm_into(
                    &mut MatMut::dense(&mut ds, t),
                    hd,
                    false,
                    dyh,
                    v.view(s, bi, g, true),
                    1,
                );
                // dv (+)= Pᵀ dy
                gemm_into(&mut dv, t, r > 0, mat(pm, 1, t), dyh, 1);
                // dS = scale · P ⊙ (dP − Σ dP ⊙ P), the gradient of the raw scores
                softmax_bwd_f32(&mut ds, pm, t, scale);
                // dq = dS k
                gemm_into(
                    &mut dqh,
                    t,
                    false,
                    mat(&ds, t, 1),
                    k.view(s, bi, g, false),
                    1,
                );
                // dk (+)= dSᵀ q
                gemm_into(
                    &mut dk,
                    t,
                    r > 0,
                    mat(&ds, 1, t),
                    q.view(s, bi, h, false),
                    1,
                );
            }
        });
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every tile of a grid covers exactly its own block, and together they cover the matrix
    /// once: written in parallel, each element ends up with the id of the one tile owning it,
    /// and elements outside the view (beyond `cols` in each row) are never touched.
    #[test]
    fn grid_tiles_are_disjoint_and_cover_the_view() {
        let (rows, cols, rs) = (12, 10, 13);
        let mut buf = vec![-1f32; rows * rs];
        let tiles: Vec<(usize, MatMut<'_>)> = MatMut::new(&mut buf, rows, cols, rs)
            .grid(4, 5)
            .into_iter()
            .flatten()
            .enumerate()
            .collect();
        assert_eq!(tiles.len(), 3 * 2);
        tiles.into_par_iter().for_each(|(id, mut tile)| {
            let a = vec![id as f32; tile.rows];
            let ones = vec![1f32; tile.cols];
            // dst = a (rows × 1) · ones (1 × cols): every element of the tile becomes `id`.
            gemm_into(&mut tile, 1, false, mat(&a, 1, 1), mat(&ones, 1, 1), 1);
        });
        for r in 0..rows {
            for c in 0..rs {
                let got = buf[r * rs + c];
                let want = if c < cols {
                    ((r / 4) * 2 + c / 5) as f32
                } else {
                    -1.0
                };
                assert_eq!(got, want, "element ({r}, {c})");
            }
        }
    }

    #[test]
    #[should_panic(expected = "exceeds")]
    fn a_view_larger_than_its_buffer_is_refused() {
        let mut buf = vec![0f32; 20];
        let _ = MatMut::new(&mut buf, 3, 7, 7);
    }

    #[test]
    #[should_panic(expected = "does not split")]
    fn a_grid_that_does_not_divide_the_view_is_refused() {
        let mut buf = vec![0f32; 20];
        let _ = MatMut::dense(&mut buf, 5).grid(3, 5);
    }

    #[test]
    fn split_cols_gives_adjacent_column_blocks() {
        let mut buf = vec![0f32; 2 * 6];
        let blocks = MatMut::dense(&mut buf, 6).split_cols(2);
        assert_eq!(blocks.len(), 3);
        for (i, mut b) in blocks.into_iter().enumerate() {
            assert_eq!((b.rows, b.cols), (2, 2));
            let a = [i as f32 + 1.0; 2];
            gemm_into(&mut b, 1, false, mat(&a, 1, 1), mat(&[1.0, 1.0], 1, 1), 1);
        }
        assert_eq!(buf, vec![1., 1., 2., 2., 3., 3., 1., 1., 2., 2., 3., 3.]);
    }
}

// ---- LoRA ---------------------------------------------------------------------------------------

/// One LoRA adapter's weights for a pass: A `[r, k]`, B `[out, r]` and the scale `alpha / r`.
#[derive(Clone, Copy)]
pub(crate) struct LoraW<'a> {
    pub(crate) a: &'a [f32],
    pub(crate) b: &'a [f32],
    pub(crate) r: usize,
    pub(crate) scale: f32,
}

/// Adds the adapter's update `s·(x·Aᵀ)·Bᵀ` to `y` (N × out) and returns `u = s·x·Aᵀ` (N × r),
/// what [`lora_bwd`] needs.
pub(crate) fn lora_fwd(
    x: &[f32],
    l: &LoraW<'_>,
    k: usize,
    out: usize,
    y: &mut [f32],
    threads: usize,
) -> Vec<f32> {
    let mut u = linear_fwd(x, l.a, None, k, l.r, threads);
    for v in &mut u {
        *v *= l.scale;
    }
    let d = linear_fwd(&u, l.b, None, l.r, out, threads);
    add_into(y, &d);
    u
}

/// Backward of [`lora_fwd`] from `g` = d(y) (N × out): adds the input's share into `dx` (N × k)
/// and returns (dA `[r, k]`, dB `[out, r]`) when `want_w`. With `u = s·x·Aᵀ`: dB = gᵀ·u,
/// d(x·Aᵀ) = s·g·B, dA = d(x·Aᵀ)ᵀ·x and dx += d(x·Aᵀ)·A.
#[allow(clippy::too_many_arguments)]
pub(crate) fn lora_bwd(
    x: &[f32],
    u: &[f32],
    l: &LoraW<'_>,
    g: &[f32],
    k: usize,
    out: usize,
    dx: &mut [f32],
    want_w: bool,
    threads: usize,
) -> Option<(Vec<f32>, Vec<f32>)> {
    let (mut du, rb) = linear_bwd(u, l.b, g, l.r, out, want_w, false, threads);
    for v in &mut du {
        *v *= l.scale;
    }
    let ra = linear_bwd_into(
        x,
        l.a,
        &du,
        k,
        l.r,
        Some((dx, true)),
        want_w,
        false,
        threads,
    );
    match (ra, rb) {
        (Some((da, _)), Some((db, _))) => Some((da, db)),
        _ => None,
    }
}
