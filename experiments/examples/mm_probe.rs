// Scratch probe (not committed): GFLOP/s of tiny's matmul shapes in candle.
use candle_core::{Device, Tensor};
use std::time::Instant;

fn t(f: &dyn Fn() -> Tensor, flops: f64) -> f64 {
    for _ in 0..3 {
        let _ = f();
    }
    let mut best = f64::MAX;
    for _ in 0..15 {
        let s = Instant::now();
        let _ = f();
        best = best.min(s.elapsed().as_secs_f64());
    }
    flops / best / 1e9
}

fn main() {
    let d = Device::Cpu;
    let r = |a: usize, b: usize| Tensor::randn(0f32, 1.0, (a, b), &d).unwrap();
    let n = 1024;
    // (name, Out, K)
    for (name, out, k) in [
        ("c_attn", 768, 256),
        ("attn_proj", 256, 256),
        ("c_fc", 1024, 256),
        ("mlp_proj", 256, 1024),
        ("head", 8192, 256),
    ] {
        let x = r(n, k);
        let w = r(out, k);
        let g = r(n, out);
        let fl = 2.0 * (n * out * k) as f64;
        let fwd = t(&|| x.matmul(&w.t().unwrap()).unwrap(), fl);
        let dx = t(&|| g.matmul(&w).unwrap(), fl);
        let dw = t(&|| g.t().unwrap().matmul(&x).unwrap(), fl);
        // alternatives: dwᵀ = xᵀ·g (K, Out) ; contiguous transposed g
        let gt = g.t().unwrap().contiguous().unwrap();
        let dw_c = t(&|| gt.matmul(&x).unwrap(), fl);
        let dwt = t(&|| x.t().unwrap().matmul(&g).unwrap(), fl);
        let xt = x.t().unwrap().contiguous().unwrap();
        let dwt_c = t(&|| xt.matmul(&g).unwrap(), fl);
        println!("{name:10} N{n} Out{out} K{k}: fwd {fwd:6.1}  dx {dx:6.1}  dw=gT.x {dw:6.1}  dw(gT contig) {dw_c:6.1}  dwT=xT.g {dwt:6.1}  dwT(xT contig) {dwt_c:6.1} GFLOP/s");
    }
    // attention, (32, 128, 64)
    let bh = 32;
    let tt = 128;
    let hd = 64;
    let r3 = |a: usize, b: usize| Tensor::randn(0f32, 1.0, (bh, a, b), &d).unwrap();
    let q = r3(tt, hd);
    let k = r3(tt, hd);
    let att = r3(tt, tt);
    let g = r3(tt, hd);
    let fl = 2.0 * (bh * tt * tt * hd) as f64;
    let s = t(&|| q.matmul(&k.t().unwrap()).unwrap(), fl);
    let o = t(&|| att.matmul(&k).unwrap(), fl);
    let dv = t(&|| att.t().unwrap().matmul(&g).unwrap(), fl);
    let datt = t(&|| g.matmul(&k.t().unwrap()).unwrap(), fl);
    let dk = t(&|| att.t().unwrap().matmul(&q).unwrap(), fl);
    println!("attn 32x128x128x64: qkT {s:6.1}  att.v {o:6.1}  attT.g {dv:6.1}  g.vT {datt:6.1}  dsT.q {dk:6.1}");
}
