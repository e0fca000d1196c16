//! Which trial ids and artifact names may become paths. Both sides turn them into directories
//! and files (the coordinator under `<state>/artifacts/<trial>/`, the worker under its work and
//! cache dirs, which it later removes), and each side gets them from the other over the wire, so
//! both check them with these functions before touching the disk.

use crate::Error;

/// Longest artifact name, in bytes.
pub const MAX_ARTIFACT_NAME_BYTES: usize = 200;

/// A trial id is exactly what `TrialConfig::id` produces: 16 lowercase hex digits (the
/// coordinator refuses a submitted trial whose id is anything else). So an id is always one plain
/// path component: never empty, `.`, `..`, absolute, or holding a separator.
pub fn check_trial_id(id: &str) -> Result<(), Error> {
    if id.len() == 16 && id.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        Ok(())
    } else {
        Err(Error::TrialId { id: id.to_string() })
    }
}

/// Artifact names are relative paths like `model/model.safetensors`: 1-200 bytes, not absolute,
/// `/`-separated components each of only `[A-Za-z0-9._-]`, none empty and none starting with `.`
/// (so no `.`, `..` or hidden files).
pub fn check_artifact_name(name: &str) -> Result<(), Error> {
    let bad = |why: &'static str| {
        Err(Error::ArtifactName {
            name: name.to_string(),
            why,
        })
    };
    if name.is_empty() || name.len() > MAX_ARTIFACT_NAME_BYTES {
        return bad("must be 1-200 bytes");
    }
    if name.starts_with('/') {
        return bad("must be relative");
    }
    for comp in name.split('/') {
        if comp.is_empty() || comp == "." || comp == ".." {
            return bad("empty, `.` or `..` path component");
        }
        if !comp
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
        {
            return bad("only letters, digits, `.`, `_`, `-` and `/` are allowed");
        }
        if comp.starts_with('.') {
            return bad("components must not start with `.`");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trial_ids_are_what_trial_config_id_produces() {
        assert!(check_trial_id("0123456789abcdef").is_ok());
        for bad in [
            "",
            "..",
            ".",
            "0123456789ABCDEF",
            "0123456789abcde",
            "0123456789abcdef0",
            "0123456789abcde/",
            "/123456789abcdef",
            "abc123",
            "0123456789abcdeg",
        ] {
            let err = check_trial_id(bad).unwrap_err().to_string();
            assert!(err.contains(&format!("{bad:?}")), "{err}");
        }
    }

    #[test]
    fn artifact_names_are_plain_relative_paths() {
        for ok in [
            "model/model.safetensors",
            "ckpt/state.safetensors",
            "metrics.json",
            "a-b_c.d",
        ] {
            assert!(check_artifact_name(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "/etc/passwd",
            "../x",
            "ckpt/../../x",
            "a//b",
            "a/",
            "./a",
            "sp ace",
            "a\\b",
            "mödel/x",
        ] {
            let err = check_artifact_name(bad).unwrap_err().to_string();
            assert!(err.starts_with("artifact name"), "{bad}: {err}");
        }
    }

    /// Names the worker's old copy accepted and the coordinator's store refused: a hidden
    /// component (a worker would have written `ckpt/.hidden` that no upload could ever send back)
    /// and a name over 200 bytes. The one rule refuses both on both sides.
    #[test]
    fn names_the_two_old_copies_disagreed_on_are_refused() {
        let err = check_artifact_name("ckpt/.hidden").unwrap_err().to_string();
        assert!(err.contains("must not start with `.`"), "{err}");
        let long = format!("ckpt/{}", "a".repeat(MAX_ARTIFACT_NAME_BYTES));
        let err = check_artifact_name(&long).unwrap_err().to_string();
        assert!(err.contains("1-200 bytes"), "{err}");
        assert!(check_artifact_name(&"a".repeat(MAX_ARTIFACT_NAME_BYTES)).is_ok());
    }
}
