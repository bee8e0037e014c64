//! Key derivation and authenticated encryption; nothing else.
//!
//! - Passphrases become key-encryption keys with Argon2id.
//! - Blobs, pack headers, index files, snapshots and the config are sealed with
//!   XChaCha20-Poly1305 under the repository's data key. Nonces must never repeat under
//!   one key: each is a 16-byte prefix drawn from the OS generator once per thread,
//!   followed by that thread's 64-bit counter. Two threads share a prefix with
//!   probability 2^-128, and a counter does not wrap, so nonces are unique without a
//!   system call per blob (which cost about 15 µs each here, a second per GiB). The associated data
//!   binds a ciphertext to its role (a blob to its kind and id), so a ciphertext cannot
//!   be moved to stand for something else.
//!
//! Sealed layout: `ciphertext || tag[16] || nonce[24]`. The nonce goes last so a
//! buffer can be sealed and opened in place: a chunk is encrypted where it lies and
//! only grows by 40 bytes, with no copy of up to 8 MiB per blob.

use crate::error::{Error, Result};
use chacha20poly1305::aead::{AeadInPlace, KeyInit};
use chacha20poly1305::{Tag, XChaCha20Poly1305, XNonce};
use serde::{Deserialize, Serialize};

/// Bytes a sealed message adds to its plaintext.
pub const OVERHEAD: usize = 24 + 16;

/// A 256-bit symmetric key. Zeroed on drop is not attempted: keys live in the pbs process
/// for its whole run.
#[derive(Clone)]
pub struct Key(pub(crate) [u8; 32]);

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Key(..)")
    }
}

impl Key {
    pub fn random() -> Key {
        Key(random_bytes())
    }

    /// A key from its raw bytes (benchmarks and tools that hand a key to a child).
    pub fn from_bytes(bytes: [u8; 32]) -> Key {
        Key(bytes)
    }

    /// The raw key bytes. Handle with care: whoever has them can read the repository.
    pub fn to_bytes(&self) -> [u8; 32] {
        self.0
    }

    /// A subkey for one purpose, so that no key is used for two jobs.
    pub fn derive(&self, context: &str) -> Key {
        Key(blake3::derive_key(context, &self.0))
    }

    fn cipher(&self) -> XChaCha20Poly1305 {
        XChaCha20Poly1305::new((&self.0).into())
    }

    pub fn seal(&self, associated: &[u8], plaintext: &[u8]) -> Vec<u8> {
        let mut buf = Vec::with_capacity(plaintext.len() + OVERHEAD);
        buf.extend_from_slice(plaintext);
        self.seal_vec(associated, buf)
    }

    /// Seals `buf` in place (appending tag and nonce).
    pub fn seal_vec(&self, associated: &[u8], mut buf: Vec<u8>) -> Vec<u8> {
        let nonce = next_nonce();
        let tag = self
            .cipher()
            .encrypt_in_place_detached(XNonce::from_slice(&nonce), associated, &mut buf)
            .expect("XChaCha20-Poly1305 encryption cannot fail for in-memory buffers");
        buf.extend_from_slice(&tag);
        buf.extend_from_slice(&nonce);
        buf
    }

    /// Opens a sealed message; `what` names it in the error.
    pub fn open(&self, associated: &[u8], sealed: &[u8], what: &str) -> Result<Vec<u8>> {
        self.open_vec(associated, sealed.to_vec(), what)
    }

    /// Opens a sealed message in place.
    pub fn open_vec(&self, associated: &[u8], mut buf: Vec<u8>, what: &str) -> Result<Vec<u8>> {
        if buf.len() < OVERHEAD {
            return Err(Error::corrupt(what, "too short to be sealed"));
        }
        let n = buf.len() - OVERHEAD;
        let tag = *Tag::from_slice(&buf[n..n + 16]);
        let nonce = *XNonce::from_slice(&buf[n + 16..]);
        buf.truncate(n);
        self.cipher()
            .decrypt_in_place_detached(&nonce, associated, &mut buf, &tag)
            .map_err(|_| {
                Error::corrupt(
                    what,
                    "authentication failed (damaged, or not sealed with this key)",
                )
            })?;
        Ok(buf)
    }
}

fn next_nonce() -> [u8; 24] {
    thread_local! {
        static NONCE: std::cell::Cell<([u8; 16], u64)> = std::cell::Cell::new((random_bytes(), 0));
    }
    NONCE.with(|n| {
        let (prefix, counter) = n.get();
        n.set((
            prefix,
            counter.checked_add(1).expect("2^64 nonces from one thread"),
        ));
        let mut out = [0u8; 24];
        out[..16].copy_from_slice(&prefix);
        out[16..].copy_from_slice(&counter.to_le_bytes());
        out
    })
}

pub fn random_bytes<const N: usize>() -> [u8; N] {
    let mut b = [0u8; N];
    getrandom::getrandom(&mut b).expect("the OS random number generator is available");
    b
}

/// Argon2id cost parameters, stored in each key file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct KdfParams {
    /// Memory in KiB.
    pub m_cost: u32,
    pub t_cost: u32,
    pub p_cost: u32,
}

impl Default for KdfParams {
    /// For a passphrase a person chose: 32 MiB, 8 passes. That is the memory of restic's
    /// scrypt default (N=2^15, r=8) and above every setting OWASP recommends for
    /// Argon2id (46 MiB with 1 pass down to 7 MiB with 5); its memory times passes (what
    /// a guess costs an attacker) is above RFC 9106's 64 MiB with 3 passes. About a
    /// tenth of a second here. Every command that opens the repository holds this
    /// memory at its start, so 64 MiB would be most of a prune's or a restore's peak.
    fn default() -> Self {
        KdfParams {
            m_cost: 32 * 1024,
            t_cost: 8,
            p_cost: 1,
        }
    }
}

impl KdfParams {
    /// For a passphrase that is itself a random 256-bit secret (the key files the pbs
    /// generates for its repositories): 1 MiB, 1 pass. Memory-hard derivation slows
    /// down the guessing of a passphrase a person chose; 256 random bits cannot be
    /// guessed at any cost per guess, so the 32 MiB and tenth of a second of
    /// [`KdfParams::default`] would buy nothing on every command that opens the
    /// repository.
    pub const RANDOM_SECRET: KdfParams = KdfParams {
        m_cost: 1024,
        t_cost: 1,
        p_cost: 1,
    };

    /// Tiny parameters for unit tests: derivation in microseconds, no strength at all.
    #[cfg(test)]
    pub(crate) const TESTS: KdfParams = KdfParams {
        m_cost: 64,
        t_cost: 1,
        p_cost: 1,
    };

    /// Refuses parameters that would take absurd memory or time (a crafted key file must
    /// not exhaust the pbs).
    pub fn check(&self) -> Result<()> {
        if self.m_cost > 4 * 1024 * 1024 || self.t_cost > 100 || self.p_cost > 64 || self.m_cost < 8
        {
            return Err(Error::InvalidInput(format!(
                "key derivation parameters out of range: {self:?}"
            )));
        }
        Ok(())
    }
}

/// Derives the key that seals the master key from a passphrase.
pub fn derive_from_passphrase(passphrase: &[u8], salt: &[u8], params: KdfParams) -> Result<Key> {
    params.check()?;
    let p = argon2::Params::new(params.m_cost, params.t_cost, params.p_cost, Some(32))
        .map_err(|e| Error::InvalidInput(format!("key derivation parameters: {e}")))?;
    let argon = argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, p);
    let mut out = [0u8; 32];
    argon
        .hash_password_into(passphrase, salt, &mut out)
        .map_err(|e| Error::InvalidInput(format!("key derivation: {e}")))?;
    Ok(Key(out))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn seal_open_round_trip(msg in proptest::collection::vec(any::<u8>(), 0..2000), ad in proptest::collection::vec(any::<u8>(), 0..40)) {
            let k = Key::random();
            let sealed = k.seal(&ad, &msg);
            prop_assert_eq!(sealed.len(), msg.len() + OVERHEAD);
            prop_assert_eq!(k.open(&ad, &sealed, "m").unwrap(), msg);
        }

        #[test]
        fn any_flipped_bit_is_refused(msg in proptest::collection::vec(any::<u8>(), 1..200), pos in any::<prop::sample::Index>(), bit in 0u8..8) {
            let k = Key::random();
            let mut sealed = k.seal(b"ad", &msg);
            let i = pos.index(sealed.len());
            sealed[i] ^= 1 << bit;
            let refused = matches!(k.open(b"ad", &sealed, "m"), Err(Error::Corrupt { .. }));
            prop_assert!(refused);
        }
    }

    #[test]
    fn nonces_differ_within_and_across_threads() {
        let mut seen = std::collections::HashSet::new();
        for _ in 0..1000 {
            assert!(seen.insert(next_nonce()));
        }
        let other = std::thread::spawn(|| (0..1000).map(|_| next_nonce()).collect::<Vec<_>>())
            .join()
            .unwrap();
        for n in other {
            assert!(seen.insert(n));
        }
    }

    #[test]
    fn wrong_key_or_associated_data_is_refused() {
        let k = Key::random();
        let sealed = k.seal(b"one", b"secret");
        assert!(k.open(b"two", &sealed, "x").is_err());
        assert!(Key::random().open(b"one", &sealed, "x").is_err());
    }

    #[test]
    fn passphrase_derivation_is_deterministic() {
        let p = KdfParams {
            m_cost: 64,
            t_cost: 1,
            p_cost: 1,
        };
        let a = derive_from_passphrase(b"pw", b"saltsaltsaltsalt", p).unwrap();
        let b = derive_from_passphrase(b"pw", b"saltsaltsaltsalt", p).unwrap();
        let c = derive_from_passphrase(b"px", b"saltsaltsaltsalt", p).unwrap();
        assert_eq!(a.0, b.0);
        assert_ne!(a.0, c.0);
    }
}
