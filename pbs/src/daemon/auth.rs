//! Who may read the status server: `[server].status_credentials` names a file of
//! `USER:HASH` lines (HTTP Basic, an Argon2id PHC string of the password) and
//! `bearer:blake3:HEX` lines (`Authorization: Bearer TOKEN`, the BLAKE3 hash of a
//! 256-bit random token: nothing to guess, so a fast hash, compared in constant time),
//! as `haul-pbs status-credentials` prints them. A request without matching
//! credentials gets `401` with a Basic challenge.
//!
//! Argon2 is slow on purpose. So that a page's requests do not each pay for it, a
//! header that verified is remembered (by its BLAKE3 hash, never in clear) for
//! [`REMEMBER`], at most [`REMEMBERED`] of them; so that unauthenticated callers cannot
//! take the machine's memory and cores with it, at most [`VERIFYING`] run at once
//! (see `http.rs`); and an unknown user costs as much as a known one, so that the time
//! of an answer does not tell which users exist.

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

/// Argon2 verifications at once, at most.
pub const VERIFYING: usize = 2;

/// The user name of token lines.
pub const BEARER: &str = "bearer";
/// How a token's hash is written after `bearer:`.
const TOKEN_HASH: &str = "blake3:";

pub struct Credentials {
    /// (user, Argon2 PHC hash of the password).
    users: Vec<(String, String)>,
    /// BLAKE3 hashes of the tokens.
    tokens: Vec<blake3::Hash>,
    /// Verified against when the user is unknown.
    decoy: String,
    verified: Mutex<HashMap<[u8; 32], Instant>>,
}

impl Credentials {
    /// Reads the credentials file; every line must be `NAME:PHC-HASH` (blank lines and
    /// `#` comments aside).
    pub fn load(path: &Path) -> Result<Credentials, CliError> {
        let what = format!("status credentials {}", path.display());
        let text = std::fs::read_to_string(path).map_err(|e| CliError::Io(what.clone(), e))?;
        let (mut users, mut tokens) = (Vec::new(), Vec::new());
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
            if user == BEARER {
                let hex = hash
                    .strip_prefix(TOKEN_HASH)
                    .ok_or_else(|| bad("a token's hash is blake3:HEX"))?;
                tokens.push(
                    blake3::Hash::from_hex(hex)
                        .map_err(|e| bad(&format!("not a token hash ({e})")))?,
                );
                continue;
            }
            PasswordHash::new(hash).map_err(|e| bad(&format!("not a password hash ({e})")))?;
            if user.is_empty() {
                return Err(bad("no user name"));
            }
            users.push((user.to_string(), hash.to_string()));
        }
        if users.is_empty() && tokens.is_empty() {
            return Err(CliError::usage(format!(
                "{what} holds no credentials: nobody could read the status server"
            )));
        }
        Ok(Credentials {
            users,
            tokens,
            decoy: hash("a password nobody has"),
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
                let given = blake3::hash(token.trim().as_bytes());
                // blake3::Hash compares in constant time.
                self.tokens.contains(&given)
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
        let check = |h: &str| {
            PasswordHash::new(h).is_ok_and(|h| {
                Argon2::default()
                    .verify_password(secret.as_bytes(), &h)
                    .is_ok()
            })
        };
        let mut known = false;
        let mut ok = false;
        for (_, h) in self.users.iter().filter(|(u, _)| u == user) {
            known = true;
            ok |= check(h);
        }
        if !known {
            // As long as for a known user.
            check(&self.decoy);
        }
        ok
    }

    /// Whether `header` is one that verified lately (no Argon2 needed).
    pub fn remembered(&self, header: Option<&str>) -> bool {
        let Some(header) = header else { return false };
        let key = *blake3::hash(header.as_bytes()).as_bytes();
        let mut seen = self.verified.lock().unwrap_or_else(|p| p.into_inner());
        seen.retain(|_, at| at.elapsed() < REMEMBER);
        seen.contains_key(&key)
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
            if user == BEARER
                || user.is_empty()
                || user.starts_with('#')
                || user
                    .chars()
                    .any(|c| c == ':' || c.is_whitespace() || c.is_control())
            {
                return Err(CliError::usage(format!(
                    "{user:?} cannot be a user name: it must not be empty, be {BEARER:?}, begin with `#`, or hold a `:`, a space or a control character"
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
            crate::outln!(
                "{BEARER}:{TOKEN_HASH}{}",
                blake3::hash(token.as_bytes()).to_hex()
            );
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
                "# who reads the status\nalice:{}\n\n{BEARER}:{TOKEN_HASH}{}\n",
                hash("s3cret:with colon"),
                blake3::hash(token.as_bytes()).to_hex()
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
        std::fs::write(&f, format!("{BEARER}:{}\n", hash("x"))).unwrap();
        let e = Credentials::load(&f).err().unwrap().to_string();
        assert!(e.contains("line 1: a token's hash is blake3:HEX"), "{e}");
        std::fs::write(&f, "# nothing\n").unwrap();
        let e = Credentials::load(&f).err().unwrap().to_string();
        assert!(e.contains("holds no credentials"), "{e}");
    }
}
