//! Bearer-token authentication for the two services.
//!
//! Workers and users hold different secrets: the worker token only opens `WorkerService`, the admin
//! token only opens `SweepService` (a leaked worker token on a rented machine must not be able to
//! submit or cancel sweeps, and the admin token is not accepted on worker calls either). Tokens are
//! compared in constant time and never logged. A service whose token is `None` accepts every caller:
//! that is the loopback development mode, and the CLI refuses to listen beyond loopback without one.

use std::sync::Arc;

use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::{Request, Status};

/// Server-side check of the `authorization: Bearer <token>` header of every call.
#[derive(Clone)]
pub struct RequireToken {
    expected: Option<Arc<[u8]>>,
    /// "worker" or "admin": only used in the error message.
    role: &'static str,
}

impl RequireToken {
    pub fn new(expected: Option<&str>, role: &'static str) -> Self {
        RequireToken {
            expected: expected.map(|t| Arc::from(t.trim().as_bytes())),
            role,
        }
    }

    /// Check one request's metadata.
    pub fn check(&self, metadata: &tonic::metadata::MetadataMap) -> Result<(), Status> {
        let Some(expected) = &self.expected else {
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
        match presented {
            Some(p) if constant_time_eq(p.as_bytes(), expected) => Ok(()),
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

/// Client-side interceptor adding `authorization: Bearer <token>` to every call.
#[derive(Clone)]
pub struct BearerToken(Option<MetadataValue<Ascii>>);

impl BearerToken {
    /// Errors when the token contains characters that cannot travel in a header.
    pub fn new(token: Option<&str>) -> anyhow::Result<Self> {
        match token.map(str::trim).filter(|t| !t.is_empty()) {
            None => Ok(BearerToken(None)),
            Some(t) => {
                let v = MetadataValue::try_from(format!("Bearer {t}")).map_err(|_| {
                    anyhow::anyhow!("token contains characters not allowed in a header")
                })?;
                Ok(BearerToken(Some(v)))
            }
        }
    }
}

impl Interceptor for BearerToken {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert("authorization", v.clone());
        }
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
}
