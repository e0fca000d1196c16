//! The arithmetic the fused kernels share: the float types they run on, `exp`/`tanh` in f32
//! that vectorise, sums and maxima in 8 lanes, and [`simd_kernel!`], which compiles a kernel for
//! the baseline target and for AVX2+FMA and picks one at run time.

use candle_core::WithDType;

/// Float types the fused kernels run on (f32, f64); statistics are accumulated in f64.
pub(crate) trait Real: WithDType {
    fn exp_(self) -> Self;
    fn tanh_(self) -> Self;
}
impl Real for f32 {
    #[inline(always)]
    fn exp_(self) -> Self {
        exp_f32(self)
    }
    #[inline(always)]
    fn tanh_(self) -> Self {
        tanh_f32(self)
    }
}
impl Real for f64 {
    #[inline(always)]
    fn exp_(self) -> Self {
        self.exp()
    }
    #[inline(always)]
    fn tanh_(self) -> Self {
        self.tanh()
    }
}

/// `e^x` in f32 without a libm call: branch-free (so loops over it vectorise), Cody–Waite range
/// reduction `x = n·ln2 + r`, |r| ≤ ln2/2, then a degree-7 Taylor polynomial (truncation error
/// below 5e-9 relative; overall within 2 ulp of `f32::exp`). libm's scalar `expf` was most of the
/// time of the softmax, cross-entropy and GELU kernels. Underflows to 0 below −87.3 (so −∞ gives
/// 0, as a mask needs), saturates to `f32::MAX`·2 = ∞ above 88.7, and keeps NaN.
#[inline(always)]
pub fn exp_f32(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_145_75; // ln 2 split so n·LN2_HI is exact for |n| < 2^8
    const LN2_LO: f32 = 1.428_606_8e-6;
    const ROUND: f32 = 12_582_912.0; // 1.5·2^23: adding it rounds to an integer (to nearest)
    let xc = x.clamp(-87.3, 88.7);
    let n = (xc * LOG2E + ROUND) - ROUND;
    let r = (xc - n * LN2_HI) - n * LN2_LO;
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0
                    + r * (1.0 / 24.0
                        + r * (1.0 / 120.0 + r * (1.0 / 720.0 + r * (1.0 / 5040.0)))))));
    // 2^n built in the exponent bits; n is in [-126, 128], 128 only past the clamp's top, where
    // 2^127·2·p overflows to ∞ as exp does.
    let ni = n as i32;
    let half = ni >> 1;
    let s1 = f32::from_bits(((half + 127) as u32) << 23);
    let s2 = f32::from_bits((((ni - half) + 127) as u32) << 23);
    let y = p * s1 * s2;
    if x < -87.3 {
        0.0
    } else if x > 88.7 {
        f32::INFINITY
    } else {
        y
    }
}

/// `tanh` in f32 from [`exp_f32`]: `sign(x)·(1 − e)/(1 + e)`, `e = e^{−2|x|}` (absolute error a
/// few 1e-8; NaN stays NaN).
#[inline(always)]
pub fn tanh_f32(x: f32) -> f32 {
    let e = exp_f32(-2.0 * x.abs());
    ((1.0 - e) / (1.0 + e)).copysign(x)
}

/// Whether this CPU has AVX2 and FMA (x86-64; cached by std after the first call).
#[inline(always)]
pub(crate) fn avx2_fma() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Defines a kernel twice, for the baseline target and for AVX2+FMA, and picks at run time:
/// the default x86-64 target only has SSE2, so the exp/tanh loops would otherwise run 4 lanes
/// wide instead of 8. The body is an ordinary generic function inlined into both.
macro_rules! simd_kernel {
    ($(#[$m:meta])* fn $name:ident<$T:ident>($($a:ident: $t:ty),* $(,)?) $body:block) => {
        $(#[$m])*
        #[inline(always)]
        fn $name<$T: $crate::ops::simd::Real>($($a: $t),*) {
            #[inline(always)]
            fn body<$T: $crate::ops::simd::Real>($($a: $t),*) $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx2,fma")]
                unsafe fn avx2<$T: $crate::ops::simd::Real>($($a: $t),*) {
                    body::<$T>($($a),*)
                }
                if $crate::ops::simd::avx2_fma() {
                    // SAFETY: the CPU has the features `avx2` was compiled for.
                    return unsafe { avx2::<$T>($($a),*) };
                }
            }
            body::<$T>($($a),*)
        }
    };
}

/// Sum of a slice in f64, with 8 running partial sums in the slice's type per block of 512 (so the
/// loop vectorises) folded into f64 between blocks (so long rows keep f64 accuracy).
#[inline(always)]
pub(crate) fn sum_f64<T: Real>(xs: &[T]) -> f64 {
    let mut total = 0f64;
    for block in xs.chunks(512) {
        let mut acc = [T::from_f64(0.0); 8];
        let lanes = block.chunks_exact(8);
        let rest = lanes.remainder();
        for l in lanes {
            for k in 0..8 {
                acc[k] += l[k];
            }
        }
        total += acc.iter().map(|a| a.to_f64()).sum::<f64>();
        total += rest.iter().map(|a| a.to_f64()).sum::<f64>();
    }
    total
}

/// Dot product of two slices in f64, accumulated like [`sum_f64`] (8 lanes in the slices' type
/// per block of 512, folded into f64 between blocks).
#[inline(always)]
pub(crate) fn dot_f64<T: Real>(xs: &[T], ys: &[T]) -> f64 {
    let mut total = 0f64;
    for (xb, yb) in xs.chunks(512).zip(ys.chunks(512)) {
        let mut acc = [T::from_f64(0.0); 8];
        let lanes = xb.chunks_exact(8).zip(yb.chunks_exact(8));
        for (xl, yl) in lanes {
            for k in 0..8 {
                acc[k] += xl[k] * yl[k];
            }
        }
        let done = xb.len().min(yb.len()) / 8 * 8;
        for (&x, &y) in xb[done..].iter().zip(&yb[done..]) {
            total += x.to_f64() * y.to_f64();
        }
        total += acc.iter().map(|a| a.to_f64()).sum::<f64>();
    }
    total
}

/// Maximum of a non-empty slice (8 lanes, so the loop vectorises); NaN-free inputs assumed, as
/// everywhere a maximum is only subtracted for stability.
#[inline(always)]
pub(crate) fn max_of<T: Real>(xs: &[T]) -> T {
    let mut acc = [xs[0]; 8];
    let lanes = xs.chunks_exact(8);
    let rest = lanes.remainder();
    for l in lanes {
        for k in 0..8 {
            acc[k] = if l[k] > acc[k] { l[k] } else { acc[k] };
        }
    }
    let mut m = acc[0];
    for &v in acc[1..].iter().chain(rest) {
        if v > m {
            m = v;
        }
    }
    m
}
