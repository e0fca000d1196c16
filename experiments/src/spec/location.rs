//! Where an error is: file, line and column of a byte offset in the sweep text, and the context
//! (file name, text, the folder relative paths resolve against) every validation error is built in.

use std::ops::Range;
use std::path::{Path, PathBuf};

use crate::error::Error;

/// toml's message for an error, never empty: some errors (a control character in a comment)
/// come with no message at all, so name what sits at the error's position.
pub(super) fn toml_message(e: &toml::de::Error, text: &str, at: usize) -> String {
    let m = e.message().trim();
    if !m.is_empty() {
        return m.to_string();
    }
    match text.get(at..).and_then(|t| t.chars().next()) {
        Some(c) if c.is_control() => {
            format!(
                "invalid TOML: control character U+{:04X} is not allowed here",
                c as u32
            )
        }
        Some(c) => format!("invalid TOML at {c:?}"),
        None => "invalid TOML: unexpected end of file".to_string(),
    }
}

pub(super) fn sweep_dir(path: &Path) -> PathBuf {
    let dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
    let dir = if dir.as_os_str().is_empty() {
        PathBuf::from(".")
    } else {
        dir
    };
    std::fs::canonicalize(&dir).unwrap_or(dir)
}

pub(super) struct Ctx<'a> {
    pub(super) text: &'a str,
    pub(super) file: String,
    pub(super) dir: PathBuf,
}

impl Ctx<'_> {
    pub(super) fn err(&self, span: Range<usize>, msg: impl Into<String>) -> Error {
        let (line, col) = line_col(self.text, span.start);
        Error::Spec {
            file: self.file.clone(),
            line,
            col,
            msg: msg.into(),
        }
    }

    /// Span of the first occurrence of `needle` (for errors about whole tables, which toml's
    /// `Spanned` cannot wrap reliably when they are written as `[a.b]` headers).
    pub(super) fn find(&self, needle: &str) -> Range<usize> {
        let start = self.text.find(needle).unwrap_or(0);
        start..start + needle.len()
    }

    pub(super) fn resolve(&self, p: &str) -> String {
        let path = Path::new(p);
        if path.is_absolute() {
            p.to_string()
        } else {
            self.dir.join(path).display().to_string()
        }
    }
}

/// 1-based line and column of a byte offset.
pub fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let col = before.rfind('\n').map_or(offset, |i| offset - i - 1) + 1;
    (line, col)
}
