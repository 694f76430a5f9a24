//! Who may use the admin API: `Authorization: Bearer <token>`, compared
//! in constant time; ambiguous credentials refused before any comparison.

use http::{StatusCode, header};

use super::{AdminResponse, AdminService, problem};

/// Refuses a request with more than one `Authorization` header: which
/// one counts would be the reader's choice. Answered before any token is
/// compared, so the answer says nothing about either.
pub(super) fn one_credential(headers: &http::HeaderMap) -> Result<(), AdminResponse> {
    if headers
        .get_all(header::AUTHORIZATION)
        .iter()
        .nth(1)
        .is_none()
    {
        return Ok(());
    }
    Err(problem(
        StatusCode::BAD_REQUEST,
        "admin-ambiguous-credentials",
        "more than one `Authorization` header was sent: the credentials are ambiguous; send exactly one `Authorization: Bearer <admin token>`",
    ))
}

impl<E, B> AdminService<E, B> {
    /// The operator's name, if the request carries one of the tokens.
    pub(super) fn authorize(&self, headers: &http::HeaderMap) -> Result<String, AdminResponse> {
        let Some(value) = headers.get(header::AUTHORIZATION) else {
            return Err(problem(
                StatusCode::UNAUTHORIZED,
                "admin-unauthorized",
                "send `Authorization: Bearer <admin token>`",
            ));
        };
        let bytes = value.as_bytes();
        let token = match bytes.get(..7) {
            Some(p) if p.eq_ignore_ascii_case(b"bearer ") => bytes[7..].trim_ascii(),
            _ => {
                return Err(problem(
                    StatusCode::UNAUTHORIZED,
                    "admin-unauthorized",
                    "send `Authorization: Bearer <admin token>`",
                ));
            }
        };
        // Every token is compared, whichever matches.
        let mut found = None;
        for (name, secret) in self.tokens.iter() {
            if constant_time_eq(token, secret) && found.is_none() {
                found = Some(name.clone());
            }
        }
        found.ok_or_else(|| {
            problem(
                StatusCode::FORBIDDEN,
                "admin-forbidden",
                "this admin token is not accepted",
            )
        })
    }
}

/// Equal in time that depends on the lengths only, never on where the
/// bytes first differ.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = u8::from(a.len() != b.len());
    for i in 0..a.len().max(b.len()) {
        let x = a.get(i).copied().unwrap_or(0);
        let y = b.get(i).copied().unwrap_or(0);
        diff |= x ^ y;
    }
    diff == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn constant_time_equality() {
        assert!(constant_time_eq(b"secret", b"secret"));
        assert!(!constant_time_eq(b"secret", b"secreT"));
        assert!(!constant_time_eq(b"secret", b"secret2"));
        assert!(!constant_time_eq(b"", b"x"));
        assert!(constant_time_eq(b"", b""));
    }
}
