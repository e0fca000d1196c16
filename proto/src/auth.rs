//! Bearer tokens as both sides read and send them.
//!
//! One rule for every token file (`ablate serve --worker-token-file/--admin-token-file`, the
//! CLI's `--token-file`, `ablate-worker --token-file`), see [`parse_token`], and one client-side
//! interceptor, [`BearerToken`], that adds `authorization: Bearer <token>` to every call; the
//! coordinator's `RequireToken` checks what it sends. Errors name the file, never the token.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::{Request, Status};

use crate::{Error, TokenProblem};

/// The token in a token file's text. The rule: surrounding whitespace (the trailing newline an
/// editor or `echo` leaves, spaces, CRLF) is dropped; what remains must be non-empty (an empty
/// token would silently switch authentication off) and only visible ASCII, so no whitespace or
/// control characters inside (two tokens, or not a token file) and nothing a gRPC header cannot
/// carry.
pub fn parse_token(text: &str) -> Result<&str, TokenProblem> {
    let t = text.trim();
    if t.is_empty() {
        return Err(TokenProblem::Empty);
    }
    if t.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(TokenProblem::InnerWhitespace);
    }
    if !t.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(TokenProblem::NotHeaderSafe);
    }
    Ok(t)
}

/// Read a token file with the [`parse_token`] rule; the error names the file.
pub fn read_token_file(path: &Path) -> Result<String, Error> {
    let text = std::fs::read_to_string(path).map_err(|source| Error::Read {
        what: "token file",
        path: path.to_path_buf(),
        source,
    })?;
    parse_token(&text)
        .map(str::to_string)
        .map_err(|problem| Error::TokenFile {
            path: path.to_path_buf(),
            problem,
        })
}

fn header(token: &str) -> Result<MetadataValue<Ascii>, TokenProblem> {
    let t = parse_token(token)?;
    MetadataValue::try_from(format!("Bearer {t}")).map_err(|_| TokenProblem::NotHeaderSafe)
}

/// How often a watched token file is looked at, at most (before a call, never in between).
const WATCH_EVERY: Duration = Duration::from_secs(1);

/// Client-side interceptor adding `authorization: Bearer <token>` to every call (nothing without
/// a token). Clones share their state, so a token picked up from a watched file reaches every
/// client made from this one.
#[derive(Clone)]
pub struct BearerToken(Source);

#[derive(Clone)]
enum Source {
    Fixed(Option<MetadataValue<Ascii>>),
    Watched(Arc<Mutex<Watched>>),
}

struct Watched {
    /// "worker" or "admin": only in log lines.
    role: &'static str,
    header: MetadataValue<Ascii>,
    file: PathBuf,
    /// The file's text when last read, and when that was.
    last: Option<String>,
    checked: Instant,
}

impl BearerToken {
    /// Send `token` with every call, or nothing when `None`. Errors when the token breaks the
    /// [`parse_token`] rule (an empty one included: it is not "no token").
    pub fn new(token: Option<&str>) -> Result<Self, Error> {
        let h = token.map(header).transpose().map_err(Error::Token)?;
        Ok(BearerToken(Source::Fixed(h)))
    }

    /// Send `token`, read from `file`, and re-read `file` before a call when a second has passed
    /// since the last look. The coordinator keeps accepting the previous token for an overlap
    /// window after a rotation (`ablate serve --token-overlap`); within it a long-running client
    /// picks up the new token from its file, whatever connection it is on or reconnecting with.
    /// A file that is half written, emptied or unreadable keeps the token already in use.
    pub fn watching(role: &'static str, token: &str, file: PathBuf) -> Result<Self, Error> {
        let header = header(token).map_err(Error::Token)?;
        // The file's text is what `token` was read from: a first look that finds it unchanged
        // is not a rotation.
        let last = std::fs::read_to_string(&file).ok();
        Ok(BearerToken(Source::Watched(Arc::new(Mutex::new(
            Watched {
                role,
                header,
                file,
                last,
                checked: Instant::now(),
            },
        )))))
    }

    fn current(&self) -> Option<MetadataValue<Ascii>> {
        match &self.0 {
            Source::Fixed(h) => h.clone(),
            Source::Watched(w) => {
                let mut w = w.lock().unwrap_or_else(|p| p.into_inner());
                w.refresh();
                Some(w.header.clone())
            }
        }
    }
}

impl Watched {
    fn refresh(&mut self) {
        let now = Instant::now();
        if now.duration_since(self.checked) < WATCH_EVERY {
            return;
        }
        self.checked = now;
        let Ok(text) = std::fs::read_to_string(&self.file) else {
            return;
        };
        if self.last.as_deref() == Some(text.as_str()) {
            return;
        }
        let (role, file) = (self.role, self.file.display());
        match header(&text) {
            Ok(h) => {
                if self.header != h && self.last.is_some() {
                    tracing::info!(file = %file, "{role} token file changed: using the new token");
                }
                self.header = h;
            }
            Err(why) => tracing::warn!(
                file = %file,
                "{role} token file changed but it {why}: keeping the current token"
            ),
        }
        self.last = Some(text);
    }
}

impl Interceptor for BearerToken {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        if let Some(v) = self.current() {
            req.metadata_mut().insert("authorization", v);
        }
        Ok(req)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_rule_for_token_files() {
        assert_eq!(parse_token("s3cret\n"), Ok("s3cret"));
        assert_eq!(parse_token("  s3cret \r\n"), Ok("s3cret"));
        assert_eq!(parse_token("\ts3cret"), Ok("s3cret"));
        assert_eq!(parse_token(""), Err(TokenProblem::Empty));
        assert_eq!(parse_token(" \n\n"), Err(TokenProblem::Empty));
        // Inner whitespace of any kind: the old CLI reader let a no-break space through.
        for two in ["a b", "a\tb", "a\nb", "a\u{a0}b", "a\u{7f}b"] {
            assert_eq!(
                parse_token(two),
                Err(TokenProblem::InnerWhitespace),
                "{two:?}"
            );
        }
        assert_eq!(parse_token("tökén"), Err(TokenProblem::NotHeaderSafe));
    }

    #[test]
    fn token_file_errors_name_the_file_not_the_token() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("admin.token");
        let err = read_token_file(&f).unwrap_err().to_string();
        assert!(err.contains("admin.token"), "{err}");
        std::fs::write(&f, "s3cret\n").unwrap();
        assert_eq!(read_token_file(&f).unwrap(), "s3cret");
        std::fs::write(&f, "  \n").unwrap();
        let err = read_token_file(&f).unwrap_err().to_string();
        assert!(err.ends_with("admin.token is empty"), "{err}");
        std::fs::write(&f, "s3cret other\n").unwrap();
        let err = read_token_file(&f).unwrap_err().to_string();
        assert!(
            err.contains("admin.token") && err.contains("more than one token"),
            "{err}"
        );
        assert!(!err.contains("s3cret"), "{err}");
    }

    fn sent(b: &mut BearerToken) -> Option<String> {
        let req = b.call(Request::new(())).unwrap();
        req.metadata()
            .get("authorization")
            .map(|v| v.to_str().unwrap().to_string())
    }

    #[test]
    fn bearer_sends_the_token_or_nothing() {
        assert_eq!(sent(&mut BearerToken::new(None).unwrap()), None);
        let mut b = BearerToken::new(Some("s3cret\n")).unwrap();
        assert_eq!(sent(&mut b).as_deref(), Some("Bearer s3cret"));
        // An empty token is an error, not "no authentication".
        assert!(BearerToken::new(Some(" ")).is_err());
        assert!(BearerToken::new(Some("a b")).is_err());
    }

    #[test]
    fn a_watched_token_file_is_picked_up_and_a_broken_one_ignored() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("worker.token");
        std::fs::write(&f, "old\n").unwrap();
        let mut b = BearerToken::watching("worker", "old", f.clone()).unwrap();
        let mut clone = b.clone();
        assert_eq!(sent(&mut b).as_deref(), Some("Bearer old"));
        std::fs::write(&f, "new\n").unwrap();
        // Not looked at again within a second.
        assert_eq!(sent(&mut b).as_deref(), Some("Bearer old"));
        std::thread::sleep(WATCH_EVERY + Duration::from_millis(50));
        assert_eq!(
            sent(&mut clone).as_deref(),
            Some("Bearer new"),
            "clones share"
        );
        assert_eq!(sent(&mut b).as_deref(), Some("Bearer new"));
        // Emptied (half written): the token in use stays.
        std::fs::write(&f, "").unwrap();
        std::thread::sleep(WATCH_EVERY + Duration::from_millis(50));
        assert_eq!(sent(&mut b).as_deref(), Some("Bearer new"));
        std::fs::remove_file(&f).unwrap();
        std::thread::sleep(WATCH_EVERY + Duration::from_millis(50));
        assert_eq!(sent(&mut b).as_deref(), Some("Bearer new"));
    }
}
