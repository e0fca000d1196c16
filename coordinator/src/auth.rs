//! Bearer-token authentication for the two services, server side. (Clients attach the token with
//! [`ablate_proto::auth::BearerToken`]; token files are read with
//! [`ablate_proto::auth::read_token_file`], the same rule on both sides.)
//!
//! Workers and users hold different secrets: the worker token only opens `WorkerService`, the admin
//! token only opens `SweepService` (a leaked worker token on a rented machine must not be able to
//! submit or cancel sweeps, and the admin token is not accepted on worker calls either). Tokens are
//! compared in constant time and never logged. A service whose token is `None` accepts every caller:
//! that is the loopback development mode, and the CLI refuses to listen beyond loopback without one.
//!
//! Tokens rotate without a restart: [`RequireToken::rotate`] makes a new token current and keeps
//! accepting the previous one for an overlap window, so that workers can be given the new token
//! one by one while they keep training (`ablate serve` re-reads its token files; see
//! `server::serve`).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tonic::service::Interceptor;
use tonic::{Request, Status};

/// Server-side check of the `authorization: Bearer <token>` header of every call. Clones share
/// their tokens, so a rotation reaches every service that holds one.
#[derive(Clone)]
pub struct RequireToken {
    expected: Option<Arc<Mutex<Tokens>>>,
    /// "worker" or "admin": only used in the error message.
    role: &'static str,
}

struct Tokens {
    current: Box<[u8]>,
    /// Earlier tokens still accepted, each until its instant.
    previous: Vec<(Box<[u8]>, Instant)>,
}

impl RequireToken {
    pub fn new(expected: Option<&str>, role: &'static str) -> Self {
        RequireToken {
            expected: expected.map(|t| {
                Arc::new(Mutex::new(Tokens {
                    current: t.trim().as_bytes().into(),
                    previous: Vec::new(),
                }))
            }),
            role,
        }
    }

    /// Make `new` the current token; the one it replaces is still accepted for `overlap`.
    /// Returns false (and changes nothing) when `new` is the current token already, or when this
    /// service runs without a token (a token cannot be switched on without a restart).
    pub fn rotate(&self, new: &str, overlap: Duration) -> bool {
        let Some(t) = &self.expected else {
            return false;
        };
        let mut t = t.lock().unwrap_or_else(|p| p.into_inner());
        let new = new.trim().as_bytes();
        if constant_time_eq(new, &t.current) {
            return false;
        }
        let now = Instant::now();
        let old = std::mem::replace(&mut t.current, new.into());
        t.previous
            .retain(|(p, until)| *until > now && !constant_time_eq(p, new));
        t.previous.push((old, now + overlap));
        true
    }

    /// Check one request's metadata.
    pub fn check(&self, metadata: &tonic::metadata::MetadataMap) -> Result<(), Status> {
        let Some(tokens) = &self.expected else {
            return Ok(());
        };
        let presented = metadata
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| {
                v.strip_prefix("Bearer ")
                    .or_else(|| v.strip_prefix("bearer "))
            })
            .map(str::trim);
        let accepted = |p: &str| {
            let t = tokens.lock().unwrap_or_else(|p| p.into_inner());
            let now = Instant::now();
            // Every candidate is compared, so timing does not say which one matched.
            let mut ok = constant_time_eq(p.as_bytes(), &t.current);
            for (old, until) in &t.previous {
                ok |= constant_time_eq(p.as_bytes(), old) && *until > now;
            }
            ok
        };
        match presented {
            Some(p) if accepted(p) => Ok(()),
            Some(_) => Err(Status::unauthenticated(format!(
                "wrong {} token",
                self.role
            ))),
            None => Err(Status::unauthenticated(format!(
                "missing `authorization: Bearer <{} token>` metadata",
                self.role
            ))),
        }
    }
}

impl Interceptor for RequireToken {
    fn call(&mut self, req: Request<()>) -> Result<Request<()>, Status> {
        self.check(req.metadata())?;
        Ok(req)
    }
}

/// Equal-length inputs are compared without an early exit, so timing does not reveal how many
/// leading bytes of a guess were right. (The length itself is not secret.)
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let mut diff = 0u8;
    for (x, y) in a.iter().zip(b) {
        diff |= x ^ y;
    }
    std::hint::black_box(diff) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checks_bearer_tokens() {
        let req = RequireToken::new(Some("s3cret"), "admin");
        let mut md = tonic::metadata::MetadataMap::new();
        assert_eq!(
            req.check(&md).unwrap_err().code(),
            tonic::Code::Unauthenticated
        );
        md.insert("authorization", "Bearer s3creT".parse().unwrap());
        assert_eq!(
            req.check(&md).unwrap_err().code(),
            tonic::Code::Unauthenticated
        );
        md.insert("authorization", "Bearer s3cret".parse().unwrap());
        assert!(req.check(&md).is_ok());
        assert!(RequireToken::new(None, "admin")
            .check(&tonic::metadata::MetadataMap::new())
            .is_ok());
        assert!(!constant_time_eq(b"abc", b"abcd"));
    }

    #[test]
    fn a_rotated_token_keeps_the_old_one_for_the_overlap_only() {
        let req = RequireToken::new(Some("old"), "worker");
        let shared = req.clone();
        let md = |t: &str| {
            let mut m = tonic::metadata::MetadataMap::new();
            m.insert("authorization", format!("Bearer {t}").parse().unwrap());
            m
        };
        assert!(!req.rotate("old", Duration::from_secs(60)), "same token");
        assert!(shared.rotate("new", Duration::from_millis(200)));
        assert!(req.check(&md("new")).is_ok(), "clones share the rotation");
        assert!(req.check(&md("old")).is_ok(), "within the overlap");
        assert!(req.check(&md("other")).is_err());
        std::thread::sleep(Duration::from_millis(250));
        assert!(req.check(&md("old")).is_err(), "after the overlap");
        assert!(req.check(&md("new")).is_ok());
        // Rotating back to a token still in the overlap does not keep it as "previous" too.
        assert!(req.rotate("newer", Duration::from_secs(60)));
        assert!(req.rotate("new", Duration::from_secs(60)));
        assert!(req.check(&md("newer")).is_ok());
        assert!(!RequireToken::new(None, "admin").rotate("x", Duration::from_secs(1)));
    }
}
