//! Training batches: fixed windows of the token stream, shuffled per epoch from a seed, with a
//! tiny resumable state.

use crate::{Error, Result};

/// Where a [`Batcher`] stands; saved in checkpoints so a resumed run continues with the same
/// batches.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct BatcherState {
    /// Completed passes over the windows.
    pub epoch: u64,
    /// Windows of the current epoch already handed out.
    pub pos: usize,
    pub seed: u64,
}

/// Fixed-length training windows over a token stream, shuffled per epoch.
///
/// Window `i` is `tokens[i*context ..= (i+1)*context]` (context+1 tokens: inputs are the first
/// `context`, targets the last `context`), so every token is predicted exactly once per epoch. The
/// order of an epoch is a Fisher–Yates shuffle driven by a SplitMix64 generator seeded from
/// (seed, epoch): self-contained, so the order cannot change with a `rand` upgrade.
pub struct Batcher<'a> {
    tokens: &'a [u32],
    context: usize,
    batch_size: usize,
    seed: u64,
    epoch: u64,
    pos: usize,
    order: Vec<u32>,
}

impl<'a> Batcher<'a> {
    /// Errors with [`Error::Config`] when the stream is shorter than one window or a size is 0.
    pub fn new(tokens: &'a [u32], context: usize, batch_size: usize, seed: u64) -> Result<Self> {
        if context == 0 || batch_size == 0 {
            return Err(Error::Config(format!(
                "context ({context}) and batch_size ({batch_size}) must be positive"
            )));
        }
        if tokens.len() < context + 1 {
            return Err(Error::Config(format!(
                "training text has {} tokens, fewer than one window of context {context} + 1",
                tokens.len()
            )));
        }
        let n = (tokens.len() - 1) / context;
        if n > u32::MAX as usize {
            return Err(Error::Config(format!(
                "{n} windows is too many for one epoch order"
            )));
        }
        let mut b = Batcher {
            tokens,
            context,
            batch_size,
            seed,
            epoch: 0,
            pos: 0,
            order: Vec::new(),
        };
        b.order = epoch_order(n, seed, 0);
        Ok(b)
    }

    pub fn state(&self) -> BatcherState {
        BatcherState {
            epoch: self.epoch,
            pos: self.pos,
            seed: self.seed,
        }
    }

    /// Continue from a saved state. Errors when the state cannot belong to this stream
    /// (position past the end of an epoch).
    pub fn restore(&mut self, st: &BatcherState) -> Result<()> {
        let n = self.windows_per_epoch();
        if st.pos > n {
            return Err(Error::Config(format!(
                "batcher state position {} is past the {n} windows of an epoch: \
                 the checkpoint was made on different data or context",
                st.pos
            )));
        }
        self.seed = st.seed;
        self.epoch = st.epoch;
        self.pos = st.pos;
        self.order = epoch_order(n, self.seed, self.epoch);
        Ok(())
    }

    /// Next batch as flat row-major (inputs, targets), each `batch_size * context` ids. Epochs
    /// roll over inside a batch when needed, so every batch is full.
    pub fn next_batch(&mut self) -> (Vec<u32>, Vec<u32>) {
        let c = self.context;
        let mut inputs = Vec::with_capacity(self.batch_size * c);
        let mut targets = Vec::with_capacity(self.batch_size * c);
        for _ in 0..self.batch_size {
            if self.pos == self.order.len() {
                self.epoch += 1;
                self.pos = 0;
                self.order = epoch_order(self.order.len(), self.seed, self.epoch);
            }
            let start = self.order[self.pos] as usize * c;
            self.pos += 1;
            let w = &self.tokens[start..start + c + 1];
            inputs.extend_from_slice(&w[..c]);
            targets.extend_from_slice(&w[1..]);
        }
        (inputs, targets)
    }

    pub fn windows_per_epoch(&self) -> usize {
        self.order.len()
    }

    pub fn context(&self) -> usize {
        self.context
    }

    pub fn batch_size(&self) -> usize {
        self.batch_size
    }
}

fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn epoch_order(n: usize, seed: u64, epoch: u64) -> Vec<u32> {
    let mut state = seed ^ epoch.wrapping_mul(0xD1B5_4A32_D192_ED03);
    // Warm up so nearby (seed, epoch) pairs diverge immediately.
    splitmix64(&mut state);
    let mut order: Vec<u32> = (0..n as u32).collect();
    for i in (1..n).rev() {
        // Multiply-shift maps a 64-bit draw into [0, i] without modulo bias worth caring about.
        let j = ((splitmix64(&mut state) as u128 * (i as u128 + 1)) >> 64) as usize;
        order.swap(i, j);
    }
    order
}
