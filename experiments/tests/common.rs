//! Helpers shared by the integration-test modules of this crate.

use std::path::PathBuf;
use std::process::{Command, Stdio};

/// The reference Python interpreter (`$ABLATE_PYTHON`, else
/// `${ABLATE_PYENV:-$HOME/.cache/ablate/pyenv}/bin/python`), checked to import `modules`.
/// Without it the test fails, naming what to run: the test command (scripts/test) makes the venv
/// first, and a test that skipped would hide a missing reference.
pub fn reference_python(modules: &[&str]) -> PathBuf {
    let py = match std::env::var_os("ABLATE_PYTHON") {
        Some(p) => PathBuf::from(p),
        None => std::env::var_os("ABLATE_PYENV")
            .map(PathBuf::from)
            .unwrap_or_else(|| {
                PathBuf::from(std::env::var_os("HOME").unwrap_or_default())
                    .join(".cache/ablate/pyenv")
            })
            .join("bin/python"),
    };
    let ok = Command::new(&py)
        .args(["-c", &format!("import {}", modules.join(", "))])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    assert!(
        ok,
        "no Python with {} at {} (run `bash scripts/pyenv.sh`, or set ABLATE_PYTHON)",
        modules.join(", "),
        py.display()
    );
    py
}
