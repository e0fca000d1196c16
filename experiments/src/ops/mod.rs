//! Tensor ops of the model families' forward passes whose backward is known to be right, one
//! fused op a file.
//!
//! candle's ready-made `LayerNorm`, `ops::softmax_last_dim`, fused `rms_norm` and sdpa are
//! forward-only (`apply_op*_no_bwd`): a model built on them trains with those parameters silently
//! frozen (shared/facts.md). Everything here either runs as a fused CPU op with a hand-written
//! backward, or is composed from candle primitives whose backward candle implements (arithmetic,
//! `exp`, `log`, reductions, `matmul`, `gather`), so gradients flow to every input. Each op has a
//! finite-difference check in `tests/gradients.rs`, in f64 and f32.
//!
//! On the CPU the fused ops are one kernel instead of 5–10 primitive ops, each of which costs an
//! allocation and a thread-pool barrier (on small models that overhead, not arithmetic, dominated
//! a step). On other devices each op falls back to a portable composition (`*_portable`); the
//! gradient tests check both. The same kernels (`pub(crate)` items) are what the manual CPU
//! backward of [`crate::backward`] calls.
//!
//! - [`layer_norm`] (GPT-2), [`rms_norm`] (Llama);
//! - [`gelu_new`] (GPT-2's MLP), [`swiglu`] (Llama's gated MLP);
//! - [`rope`] (Llama's rotary position embedding, Hugging Face's rotate-half layout);
//! - [`softmax_last`] and the causal softmax inside [`causal_attention`];
//! - [`cross_entropy`] and [`nll_sum`];
//! - [`linear_nt`] (linear layers in candle's `[out, in]` weight layout).
//!
//! Two deliberate shortcuts, both exact for the gradient:
//! - the row maximum subtracted for numerical stability is *detached*: softmax and log-sum-exp are
//!   shift-invariant, so its true gradient contribution is zero and skipping it saves a backward op;
//! - off the CPU, [`gelu_new`] uses candle's tanh-GELU (the same formula as transformers'
//!   `gelu_new`), whose backward candle implements with 6-digit constants (relative error below
//!   1e-6, a few f32 ulps); the CPU op has the exact derivative.

#[macro_use]
pub(crate) mod simd;

mod attention;
mod cross_entropy;
mod gelu;
mod layer_norm;
mod linear;
pub(crate) mod reduce;
mod rms_norm;
mod rope;
mod softmax;
mod swiglu;

use candle_core::{CpuStorage, DType, Layout, Tensor, WithDType};

pub use attention::{causal_attention, repeat_kv};
pub use cross_entropy::{cross_entropy, cross_entropy_portable, nll_sum};
pub use gelu::gelu_new;
pub use layer_norm::{layer_norm, layer_norm_portable};
pub use linear::linear_nt;
pub use rms_norm::{rms_norm, rms_norm_portable};
pub use rope::{rope, rope_portable, RopeTables};
pub use simd::{exp_f32, tanh_f32};
pub use softmax::{softmax_last, softmax_last_portable};
pub use swiglu::{swiglu, swiglu_portable};

pub(crate) use cross_entropy::{ce_bwd_from_exp_f32, ce_fwd_exp_inplace_f32};
pub(crate) use gelu::{gelu_grad_map, gelu_map};
pub(crate) use layer_norm::{layer_norm_bwd_rows, layer_norm_rows};
pub(crate) use reduce::col_sum;
pub(crate) use rms_norm::{rms_norm_bwd_rows, rms_norm_rows};
pub(crate) use rope::{rope_bwd_inplace_f32, rope_inplace_f32};
pub(crate) use softmax::{causal_softmax_f32, softmax_bwd_f32};
pub(crate) use swiglu::{swiglu_bwd_f32, swiglu_f32};

/// Whether the fused CPU kernels take this tensor (f32 or f64 on the CPU).
fn fused_cpu(x: &Tensor) -> bool {
    x.device().is_cpu() && matches!(x.dtype(), DType::F32 | DType::F64)
}

/// The elements of a contiguous CPU tensor, as the fused ops receive it.
fn contiguous_slice<'a, T: WithDType>(
    s: &'a CpuStorage,
    l: &Layout,
) -> candle_core::Result<&'a [T]> {
    let data = s.as_slice::<T>()?;
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&data[a..b]),
        None => candle_core::bail!("fused op expects a contiguous input"),
    }
}

/// Elements per parallel task of the elementwise kernels.
const ELEMWISE_CHUNK: usize = 1 << 14;

/// Rows per parallel task: enough work per task (~32k elements) that rayon's overhead vanishes.
pub(crate) fn rows_per_task(c: usize) -> usize {
    (32_768 / c.max(1)).max(1)
}
