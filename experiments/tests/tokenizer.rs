//! Byte-level BPE training and tokenizer.json loading, on small generated text.

use experiments::tokenizer::Tok;
use experiments::Error;

/// A few hundred lines of pseudo-English, the same every run, with repeated words so BPE has
/// merges to learn.
fn corpus() -> Vec<String> {
    let words = [
        "the", "king", "queen", "shall", "speak", "night", "lord", "thou", "art", "sweet", "death",
        "love", "my", "and", "of", "to", "in", "what", "is", "a", "play", "crown",
    ];
    let mut state = 7u64;
    let mut next = || {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (state >> 33) as usize
    };
    (0..300)
        .map(|_| {
            let n = 4 + next() % 8;
            let mut line: Vec<&str> = (0..n).map(|_| words[next() % words.len()]).collect();
            if next() % 3 == 0 {
                line.push("—");
            }
            let mut s = line.join(" ");
            s.push_str(".\n");
            s
        })
        .collect()
}

#[test]
fn bpe_training_is_deterministic_and_has_eot() {
    let texts = corpus();
    let a = Tok::train_bpe(&texts, 320).unwrap();
    let b = Tok::train_bpe(&texts, 320).unwrap();
    assert_eq!(a.fingerprint(), b.fingerprint());
    assert_eq!(a.encode(&texts[3]).unwrap(), b.encode(&texts[3]).unwrap());
    let eot = a.eot_id().expect("trained tokenizer has <|endoftext|>");
    assert_eq!(a.decode(&[eot]).unwrap(), "<|endoftext|>");
    // 256 byte symbols + EOT + merges; the small corpus may run out of merges before 320.
    assert!(
        a.vocab_size() > 257 && a.vocab_size() <= 320,
        "vocab {}",
        a.vocab_size()
    );
    // Merges were learned: frequent words are single tokens, so text compresses.
    let text = texts.concat();
    let ids = a.encode(&text).unwrap();
    assert!(
        ids.len() * 2 < text.len(),
        "{} ids for {} bytes",
        ids.len(),
        text.len()
    );
    // A different vocab size is a different tokenizer.
    let c = Tok::train_bpe(&texts, 300).unwrap();
    assert_ne!(a.fingerprint(), c.fingerprint());
}

#[test]
fn encode_decode_round_trips_any_text() {
    let tok = Tok::train_bpe(&corpus(), 300).unwrap();
    for s in [
        "the king shall speak.",
        "  leading spaces,\ttabs\nand\r\nnewlines  ",
        "naïve café — 日本語 🎉 never seen in training",
        "",
        "thou art<|endoftext|>sweet",
    ] {
        let ids = tok.encode(s).unwrap();
        assert!(ids.iter().all(|&i| (i as usize) < tok.vocab_size()));
        assert_eq!(tok.decode(&ids).unwrap(), s);
    }
    let batch = vec!["the queen".to_string(), "a crown of love".to_string()];
    let encoded = tok.encode_batch(&batch).unwrap();
    assert_eq!(encoded[0], tok.encode("the queen").unwrap());
    assert_eq!(encoded[1], tok.encode("a crown of love").unwrap());
}

#[test]
fn saved_tokenizer_loads_back_identically() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tokenizer.json");
    let tok = Tok::train_bpe(&corpus(), 300).unwrap();
    tok.save(&path).unwrap();
    let loaded = Tok::load(&path).unwrap();
    assert_eq!(loaded.fingerprint(), tok.fingerprint());
    assert_eq!(loaded.vocab_size(), tok.vocab_size());
    assert_eq!(loaded.eot_id(), tok.eot_id());
    let s = "what is a play, my lord?";
    assert_eq!(loaded.encode(s).unwrap(), tok.encode(s).unwrap());
}

#[test]
fn malformed_or_missing_tokenizer_is_an_input_error_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("tokenizer.json");
    std::fs::write(&bad, "{\"model\": {\"type\": \"BPE\", \"vocab\": ").unwrap();
    match Tok::load(&bad) {
        Err(Error::Input { path, msg }) => {
            assert_eq!(path, bad);
            assert!(msg.contains("malformed"), "{msg}");
        }
        other => panic!("expected Error::Input, got {other:?}"),
    }
    let err = Tok::load(&bad).unwrap_err().to_string();
    assert!(err.contains("tokenizer.json"), "{err}");

    let missing = dir.path().join("nope").join("tokenizer.json");
    match Tok::load(&missing) {
        Err(Error::Input { path, .. }) => assert_eq!(path, missing),
        other => panic!("expected Error::Input, got {other:?}"),
    }
}

#[test]
fn too_small_vocab_or_no_text_is_a_config_error() {
    assert!(matches!(
        Tok::train_bpe(&corpus(), 100),
        Err(Error::Config(_))
    ));
    assert!(matches!(Tok::train_bpe(&[], 300), Err(Error::Config(_))));
}
