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

    /// Span of a table header (`needle` starting with `[`) or of a key named `needle`, for errors
    /// about values toml's `Spanned` cannot wrap (whole tables written as `[a.b]` headers, untagged
    /// enums). Only code counts: a comment or a string that mentions the word is skipped, so an
    /// error about `gradual` points at `gradual = ...`, not at a comment above it. Falls back to
    /// the first occurrence anywhere, then to the start of the file.
    pub(super) fn find(&self, needle: &str) -> Range<usize> {
        let start = key_offset(self.text, needle)
            .or_else(|| self.text.find(needle))
            .unwrap_or(0);
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

/// Byte offset of the header or key `needle` in TOML `text`, outside comments and strings.
fn key_offset(text: &str, needle: &str) -> Option<usize> {
    let mut line_start = 0;
    for line in text.split_inclusive('\n') {
        let code = code_part(line);
        let found = if needle.starts_with('[') {
            let trimmed = code.trim_start();
            trimmed
                .starts_with(needle)
                .then(|| code.len() - trimmed.len())
        } else {
            key_in(&code, needle)
        };
        if let Some(i) = found {
            return Some(line_start + i);
        }
        line_start += line.len();
    }
    None
}

/// `line` up to its comment, with the insides of strings blanked (same length, so offsets hold).
fn code_part(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut quote: Option<char> = None;
    let mut escaped = false;
    for c in line.chars() {
        match quote {
            Some(q) => {
                if escaped {
                    escaped = false;
                } else if c == '\\' && q == '"' {
                    escaped = true;
                } else if c == q {
                    quote = None;
                    out.push(c);
                    continue;
                }
                out.extend(std::iter::repeat_n(' ', c.len_utf8()));
            }
            None => match c {
                '#' => break,
                '"' | '\'' => {
                    quote = Some(c);
                    out.push(c);
                }
                _ => out.push(c),
            },
        }
    }
    out
}

/// Offset of `key` used as a key in `code`: at the start of the line or after `{` or `,` (inline
/// tables), followed by `=` or `.` (dotted keys).
fn key_in(code: &str, key: &str) -> Option<usize> {
    let mut from = 0;
    while let Some(i) = code[from..].find(key).map(|i| i + from) {
        let before = code[..i].trim_end();
        let after = code[i + key.len()..].trim_start();
        let starts = before.is_empty() || before.ends_with('{') || before.ends_with(',');
        if starts && (after.starts_with('=') || after.starts_with('.')) {
            return Some(i);
        }
        from = i + key.len();
    }
    None
}

/// 1-based line and column of a byte offset.
pub fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let col = before.rfind('\n').map_or(offset, |i| offset - i - 1) + 1;
    (line, col)
}
