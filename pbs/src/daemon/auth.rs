//! Who may read the status server: `[server].status_credentials` names a file of
//! `USER:HASH` lines (HTTP Basic) and `bearer:HASH` lines (`Authorization: Bearer
//! TOKEN`), each hash an Argon2id PHC string as `haul-pbs status-credentials` prints
//! it. A request without matching credentials gets `401` with a Basic challenge.
//!
//! Argon2 is slow on purpose; so that a page's requests do not each pay for it, a
//! header that verified is remembered (by its BLAKE3 hash, never in clear) for
//! [`REMEMBER`], at most [`REMEMBERED`] of them.

use crate::error::CliError;
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;
use std::collections::HashMap;
use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How long a verified header is taken without verifying it again.
pub const REMEMBER: Duration = Duration::from_secs(300);
/// Verified headers remembered at most.
pub const REMEMBERED: usize = 256;

/// The user name of token lines.
pub const BEARER: &str = "bearer";

pub struct Credentials {
    /// (user, hash); the user [`BEARER`] for tokens.
    entries: Vec<(String, String)>,
    verified: Mutex<HashMap<[u8; 32], Instant>>,
}

impl Credentials {
    /// Reads the credentials file; every line must be `NAME:PHC-HASH` (blank lines and
    /// `#` comments aside).
    pub fn load(path: &Path) -> Result<Credentials, CliError> {
        let what = format!("status credentials {}", path.display());
        let text = std::fs::read_to_string(path).map_err(|e| CliError::Io(what.clone(), e))?;
        let mut entries = Vec::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let bad = |why: &str| {
                CliError::usage(format!(
                    "{what}, line {}: {why}; each line is USER:HASH or bearer:HASH as `haul-pbs status-credentials` prints it",
                    n + 1
                ))
            };
            let (user, hash) = line.split_once(':').ok_or_else(|| bad("no `:`"))?;
            PasswordHash::new(hash).map_err(|e| bad(&format!("not a password hash ({e})")))?;
            if user.is_empty() {
                return Err(bad("no user name"));
            }
            entries.push((user.to_string(), hash.to_string()));
        }
        if entries.is_empty() {
            return Err(CliError::usage(format!(
                "{what} holds no credentials: nobody could read the status server"
            )));
        }
        Ok(Credentials {
            entries,
            verified: Mutex::default(),
        })
    }

    /// Whether the `Authorization` header `header` names valid credentials.
    pub fn admits(&self, header: Option<&str>) -> bool {
        let Some(header) = header else {
            return false;
        };
        let key = *blake3::hash(header.as_bytes()).as_bytes();
        {
            let mut seen = self.verified.lock().unwrap_or_else(|p| p.into_inner());
            seen.retain(|_, at| at.elapsed() < REMEMBER);
            if seen.contains_key(&key) {
                return true;
            }
        }
        let ok = match header.split_once(' ') {
            Some((scheme, token)) if scheme.eq_ignore_ascii_case("bearer") => {
                self.verify(BEARER, token.trim())
            }
            Some((scheme, b64)) if scheme.eq_ignore_ascii_case("basic") => {
                use base64ct::Encoding;
                base64ct::Base64::decode_vec(b64.trim())
                    .ok()
                    .and_then(|b| String::from_utf8(b).ok())
                    .and_then(|pair| {
                        let (user, pass) = pair.split_once(':')?;
                        Some(user != BEARER && self.verify(user, pass))
                    })
                    .unwrap_or(false)
            }
            _ => false,
        };
        if ok {
            let mut seen = self.verified.lock().unwrap_or_else(|p| p.into_inner());
            if seen.len() < REMEMBERED {
                seen.insert(key, Instant::now());
            }
        }
        ok
    }

    fn verify(&self, user: &str, secret: &str) -> bool {
        self.entries
            .iter()
            .filter(|(u, _)| u == user)
            .any(|(_, h)| {
                PasswordHash::new(h).is_ok_and(|h| {
                    Argon2::default()
                        .verify_password(secret.as_bytes(), &h)
                        .is_ok()
                })
            })
    }
}

/// The Argon2id hash of `secret`, as a credentials line takes it.
pub fn hash(secret: &str) -> String {
    let mut salt = [0u8; 16];
    getrandom::getrandom(&mut salt).expect("OS random numbers");
    let salt = SaltString::encode_b64(&salt).expect("16 bytes make a salt");
    Argon2::default()
        .hash_password(secret.as_bytes(), &salt)
        .expect("Argon2 with its default parameters hashes")
        .to_string()
}

/// `haul-pbs status-credentials`.
pub fn credentials_line(args: crate::cli::StatusCredentialsArgs) -> Result<(), CliError> {
    match args.user {
        Some(user) => {
            if user == BEARER || user.contains(':') || user.is_empty() {
                return Err(CliError::usage(format!(
                    "{user:?} cannot be a user name: it must not be empty, be {BEARER:?} or hold a `:`"
                )));
            }
            let pass = crate::password::new(None, "HAUL_STATUS_PASSWORD")?;
            let pass = String::from_utf8(pass)
                .map_err(|_| CliError::usage("the password is not UTF-8 text"))?;
            crate::outln!("{user}:{}", hash(&pass));
        }
        None => {
            let token = new_token();
            crate::errln!("the token (give it to the client, e.g. Prometheus' authorization.credentials_file; it is not stored): {token}");
            crate::outln!("{BEARER}:{}", hash(&token));
        }
    }
    Ok(())
}

/// A new random token: 32 bytes in hex.
pub fn new_token() -> String {
    let mut t = [0u8; 32];
    getrandom::getrandom(&mut t).expect("OS random numbers");
    hex::encode(t)
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64ct::Encoding;

    #[test]
    fn users_and_tokens_are_admitted_only_with_their_secret() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("creds");
        let token = new_token();
        std::fs::write(
            &f,
            format!(
                "# who reads the status\nalice:{}\n\n{BEARER}:{}\n",
                hash("s3cret:with colon"),
                hash(&token)
            ),
        )
        .unwrap();
        let c = Credentials::load(&f).unwrap();
        let basic = |u: &str, p: &str| {
            format!(
                "Basic {}",
                base64ct::Base64::encode_string(format!("{u}:{p}").as_bytes())
            )
        };
        assert!(c.admits(Some(&basic("alice", "s3cret:with colon"))));
        // Remembered, and still right.
        assert!(c.admits(Some(&basic("alice", "s3cret:with colon"))));
        assert!(!c.admits(Some(&basic("alice", "s3cret"))));
        assert!(!c.admits(Some(&basic("bob", "s3cret:with colon"))));
        assert!(c.admits(Some(&format!("Bearer {token}"))));
        assert!(!c.admits(Some("Bearer nope")));
        // A token is not a password of a user called "bearer".
        assert!(!c.admits(Some(&basic(BEARER, &token))));
        assert!(!c.admits(None));
        assert!(!c.admits(Some("Digest x")));
    }

    #[test]
    fn a_bad_line_is_refused_with_its_number() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("creds");
        std::fs::write(&f, format!("alice:{}\nbob:plain-password\n", hash("x"))).unwrap();
        let e = Credentials::load(&f).err().unwrap().to_string();
        assert!(e.contains("line 2: not a password hash"), "{e}");
        std::fs::write(&f, "# nothing\n").unwrap();
        let e = Credentials::load(&f).err().unwrap().to_string();
        assert!(e.contains("holds no credentials"), "{e}");
    }
}
