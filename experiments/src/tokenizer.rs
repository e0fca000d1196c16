//! Tokenizers: load a Hugging Face `tokenizer.json`, or train a GPT-2-style byte-level BPE.
//!
//! Everything else in the crate sees text only through [`Tok`], so a pretrained GPT-2 directory and
//! a tokenizer trained for a from-scratch base behave the same. A trained tokenizer is saved as a
//! standard `tokenizer.json`, so checkpoints stay loadable by `transformers`. [`Tok::fingerprint`]
//! is a hash of the tokenizer's canonical JSON: the token cache ([`crate::data`]) is keyed on it, so
//! two trials share encoded text exactly when their tokenizers are identical.

use std::collections::HashSet;
use std::path::Path;

use sha2::{Digest, Sha256};
use tokenizers::models::bpe::{BpeTrainer, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{
    AddedToken, DecoderWrapper, NormalizerWrapper, PostProcessorWrapper, PreTokenizerWrapper,
    Tokenizer, TokenizerBuilder,
};

use crate::{Error, Result};

/// GPT-2's document separator; trained tokenizers always contain it.
pub const EOT: &str = "<|endoftext|>";

/// A loaded or trained tokenizer plus the hash that identifies it.
#[derive(Clone)]
pub struct Tok {
    inner: Tokenizer,
    fingerprint: String,
}

impl std::fmt::Debug for Tok {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tok")
            .field("vocab_size", &self.vocab_size())
            .field("fingerprint", &self.fingerprint)
            .finish()
    }
}

impl Tok {
    /// Load a `tokenizer.json`. A missing, unreadable or malformed file is an [`Error::Input`]
    /// naming it, because the usual cause is a wrong or truncated base-model directory.
    pub fn load(path: &Path) -> Result<Tok> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| Error::input(path, format!("cannot read tokenizer: {e}")))?;
        // tokenizers panics on some malformed files (a truncated `decoder`) instead of erring.
        let inner: Tokenizer = std::panic::catch_unwind(|| text.parse::<Tokenizer>())
            .map_err(|p| {
                let why = p
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default();
                Error::input(path, format!("malformed tokenizer.json: {why}"))
            })?
            .map_err(|e| Error::input(path, format!("malformed tokenizer.json: {e}")))?;
        let tok = Tok::from_tokenizer(inner)
            .map_err(|e| Error::input(path, format!("unusable tokenizer: {e}")))?;
        if tok.vocab_size() == 0 {
            return Err(Error::input(path, "tokenizer has an empty vocabulary"));
        }
        Ok(tok)
    }

    /// Train a GPT-2-style byte-level BPE on `texts`.
    ///
    /// Byte-level pre-tokenizer without a prefix space and the matching decoder make
    /// `decode(encode(s)) == s` for every string; all 256 byte symbols are in the initial alphabet so
    /// any text encodes, even characters never seen in training. `vocab_size` counts those 256
    /// symbols and `<|endoftext|>`. The result depends only on `texts` and `vocab_size`.
    pub fn train_bpe(texts: &[String], vocab_size: usize) -> Result<Tok> {
        let alphabet: HashSet<char> = ByteLevel::alphabet().into_iter().collect();
        if vocab_size < alphabet.len() + 1 {
            return Err(Error::Config(format!(
                "BPE vocab_size {vocab_size} is below the {} byte symbols plus {EOT}",
                alphabet.len()
            )));
        }
        if texts.iter().all(|t| t.is_empty()) {
            return Err(Error::Config("cannot train a BPE on no text".into()));
        }
        let byte_level = ByteLevel::default()
            .add_prefix_space(false)
            .trim_offsets(true)
            .use_regex(true);
        let mut builder = TokenizerBuilder::<
            BPE,
            NormalizerWrapper,
            PreTokenizerWrapper,
            PostProcessorWrapper,
            DecoderWrapper,
        >::default()
        .with_model(BPE::default())
        .with_pre_tokenizer(Some(PreTokenizerWrapper::ByteLevel(byte_level)))
        // One struct plays all three roles, configured as in GPT-2's own tokenizer.json.
        .with_decoder(Some(DecoderWrapper::ByteLevel(byte_level)))
        .with_post_processor(Some(PostProcessorWrapper::ByteLevel(byte_level)))
        .build()
        .map_err(|e| Error::Other(format!("building BPE tokenizer: {e}")))?;
        let mut trainer = BpeTrainer::builder()
            .vocab_size(vocab_size)
            .min_frequency(0)
            .show_progress(false)
            .initial_alphabet(alphabet)
            .special_tokens(vec![AddedToken::from(EOT, true)])
            .build();
        builder
            .train(&mut trainer, texts.iter())
            .map_err(|e| Error::Other(format!("training BPE: {e}")))?;
        // Round-trip through JSON into the type-erased `Tokenizer` so trained and loaded
        // tokenizers are the same type and hash the same way.
        let json = builder
            .to_string(false)
            .map_err(|e| Error::Other(format!("serialising trained BPE: {e}")))?;
        let inner: Tokenizer = json
            .parse()
            .map_err(|e| Error::Other(format!("reloading trained BPE: {e}")))?;
        Tok::from_tokenizer(inner)
    }

    fn from_tokenizer(inner: Tokenizer) -> Result<Tok> {
        let json = inner
            .to_string(false)
            .map_err(|e| Error::Other(format!("serialising tokenizer: {e}")))?;
        let fingerprint = hex::encode(&Sha256::digest(json.as_bytes())[..16]);
        Ok(Tok { inner, fingerprint })
    }

    /// Write a standard `tokenizer.json` (loadable by [`Tok::load`] and by `transformers`).
    pub fn save(&self, path: &Path) -> Result<()> {
        let json = self
            .inner
            .to_string(true)
            .map_err(|e| Error::Other(format!("serialising tokenizer: {e}")))?;
        std::fs::write(path, json).map_err(|e| Error::io(path, e))
    }

    /// Token ids of `text`, without any added special tokens (GPT-2 adds none anyway).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode_fast(text, false)
            .map_err(|e| Error::Other(format!("encoding: {e}")))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Encode many texts at once, in parallel across cores; same ids as [`Tok::encode`] on each.
    pub fn encode_batch(&self, texts: &[String]) -> Result<Vec<Vec<u32>>> {
        let inputs: Vec<&str> = texts.iter().map(String::as_str).collect();
        let encs = self
            .inner
            .encode_batch_fast(inputs, false)
            .map_err(|e| Error::Other(format!("encoding: {e}")))?;
        Ok(encs.into_iter().map(|e| e.get_ids().to_vec()).collect())
    }

    /// Text of `ids`; special tokens are kept so a sample shows where documents end.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner
            .decode(ids, false)
            .map_err(|e| Error::Other(format!("decoding: {e}")))
    }

    /// Number of ids the model's embedding must cover (added tokens included).
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Id of `<|endoftext|>`, the separator put between documents, if the tokenizer has it.
    pub fn eot_id(&self) -> Option<u32> {
        self.inner.token_to_id(EOT)
    }

    /// Hash of the tokenizer's canonical JSON (32 hex digits): equal exactly when two tokenizers
    /// map text to the same ids.
    pub fn fingerprint(&self) -> String {
        self.fingerprint.clone()
    }

    /// The wrapped `tokenizers` tokenizer, for callers that need more than this API.
    pub fn inner(&self) -> &Tokenizer {
        &self.inner
    }
}
