//! Peer authentication: the shared secret file and the mutual HMAC-SHA256 challenge-response.
//!
//! Both sides send a 32-byte random nonce in `Hello`. Each then proves knowledge of the secret
//! with `HMAC-SHA256(secret, "tandem-v1" || label || resource || own_nonce || peer_nonce)`,
//! where `label` is `connect` for the side that opened the connection and `accept` for the
//! other. The labels and the nonce order keep a proof from being reflected back; the fresh
//! nonces keep it from being replayed. The accepting side proves itself only after the
//! connecting side did, so it never answers challenges for a stranger.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};

use anyhow::{Context, Result, bail};
use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

use super::protocol::NONCE_LEN;

const DOMAIN: &[u8] = b"tandem-v1";

/// Shortest secret accepted: 32 bytes, as many as the keys derived from it
/// (`openssl rand -hex 32` writes 64).
pub const MIN_SECRET_LEN: usize = 32;

/// Which end of the connection computes a proof.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Connect,
    Accept,
}

impl Side {
    fn label(self) -> &'static [u8] {
        match self {
            Side::Connect => b"connect",
            Side::Accept => b"accept",
        }
    }
}

/// The shared secret, as read from `daemon.secret`.
#[derive(Clone)]
pub struct Secret(Vec<u8>);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(..)")
    }
}

impl Secret {
    /// Read the secret file, refusing one that is missing, shorter than 32 bytes, or readable by
    /// group or others.
    /// A trailing newline (as `openssl rand -hex 32 > key` leaves) is not part of the secret.
    pub fn load(path: &Path) -> Result<Secret> {
        let meta = fs::metadata(path).with_context(|| format!("secret file {}", path.display()))?;
        let mode = meta.permissions().mode();
        if mode & 0o044 != 0 {
            let who = match (mode & 0o040 != 0, mode & 0o004 != 0) {
                (true, true) => "group and others",
                (true, false) => "group",
                _ => "others",
            };
            bail!(
                "secret file {} is readable by {who} (mode {:o}); run chmod 600 on it",
                path.display(),
                mode & 0o777
            );
        }
        let mut bytes =
            fs::read(path).with_context(|| format!("reading secret file {}", path.display()))?;
        while matches!(bytes.last(), Some(b'\n' | b'\r')) {
            bytes.pop();
        }
        if bytes.is_empty() {
            bail!("secret file {} is empty", path.display());
        }
        if bytes.len() < MIN_SECRET_LEN {
            bail!(
                "secret file {} holds {} bytes, fewer than the {MIN_SECRET_LEN} required; create \
                 a new one with `openssl rand -hex 32 > {}` (and copy it to the peer)",
                path.display(),
                bytes.len(),
                path.display()
            );
        }
        Ok(Secret(bytes))
    }

    /// The secret's bytes (for deriving the link's pre-shared key).
    pub(super) fn bytes(&self) -> &[u8] {
        &self.0
    }

    #[cfg(test)]
    pub fn from_bytes(b: &[u8]) -> Secret {
        Secret(b.to_vec())
    }

    fn mac(
        &self,
        side: Side,
        resource: &str,
        own: &[u8; NONCE_LEN],
        peer: &[u8; NONCE_LEN],
    ) -> Hmac<Sha256> {
        // HMAC takes keys of any length; new_from_slice cannot fail for it.
        let mut mac = match <Hmac<Sha256> as KeyInit>::new_from_slice(&self.0) {
            Ok(m) => m,
            Err(_) => unreachable!("HMAC accepts any key length"),
        };
        mac.update(DOMAIN);
        mac.update(side.label());
        mac.update(resource.as_bytes());
        mac.update(own);
        mac.update(peer);
        mac
    }

    /// Our proof for `side`, over our nonce and the peer's.
    pub fn proof(
        &self,
        side: Side,
        resource: &str,
        own: &[u8; NONCE_LEN],
        peer: &[u8; NONCE_LEN],
    ) -> [u8; NONCE_LEN] {
        let out = self.mac(side, resource, own, peer).finalize().into_bytes();
        let mut p = [0u8; NONCE_LEN];
        p.copy_from_slice(&out);
        p
    }

    /// Check the peer's proof (constant time). `peer_side` is the side the peer is on;
    /// `peer_nonce` is the peer's own nonce.
    pub fn verify(
        &self,
        peer_side: Side,
        resource: &str,
        peer_nonce: &[u8; NONCE_LEN],
        our_nonce: &[u8; NONCE_LEN],
        proof: &[u8; NONCE_LEN],
    ) -> bool {
        self.mac(peer_side, resource, peer_nonce, our_nonce)
            .verify_slice(proof)
            .is_ok()
    }
}

/// The link's credentials as the daemon holds them: the secret, shared by every resource and
/// replaced on SIGHUP, and `daemon.encrypt` (whether links are sealed after authentication).
#[derive(Clone)]
pub struct SharedSecret(Arc<RwLock<Arc<Secret>>>, Arc<AtomicBool>);

impl SharedSecret {
    pub fn new(s: Secret, encrypt: bool) -> SharedSecret {
        SharedSecret(
            Arc::new(RwLock::new(Arc::new(s))),
            Arc::new(AtomicBool::new(encrypt)),
        )
    }

    pub fn get(&self) -> Arc<Secret> {
        Arc::clone(&self.0.read().unwrap_or_else(|p| p.into_inner()))
    }

    pub fn set(&self, s: Secret) {
        *self.0.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(s);
    }

    /// `daemon.encrypt`: new connections are sealed (both nodes must agree).
    pub fn encrypt(&self) -> bool {
        self.1.load(Ordering::Acquire)
    }

    pub fn set_encrypt(&self, on: bool) {
        self.1.store(on, Ordering::Release);
    }
}

/// A fresh random nonce.
pub fn nonce() -> Result<[u8; NONCE_LEN]> {
    let mut n = [0u8; NONCE_LEN];
    getrandom::fill(&mut n).map_err(|e| anyhow::anyhow!("getrandom: {e}"))?;
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proofs_verify_only_with_same_secret_side_and_nonces() {
        let s = Secret::from_bytes(b"k1");
        let other = Secret::from_bytes(b"k2");
        let (a, b) = ([1u8; 32], [2u8; 32]);
        let p = s.proof(Side::Connect, "r0", &a, &b);
        assert!(s.verify(Side::Connect, "r0", &a, &b, &p));
        assert!(!other.verify(Side::Connect, "r0", &a, &b, &p));
        // Reflected back as the other side's proof: rejected.
        assert!(!s.verify(Side::Accept, "r0", &a, &b, &p));
        // Nonces swapped (replayed into the other direction): rejected.
        assert!(!s.verify(Side::Connect, "r0", &b, &a, &p));
        assert!(!s.verify(Side::Connect, "r1", &a, &b, &p));
    }

    #[test]
    fn secret_file_checks() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("key");
        let err = Secret::load(&p).unwrap_err().to_string();
        assert!(err.contains("secret file"), "{err}");
        fs::write(&p, "").unwrap();
        fs::set_permissions(&p, fs::Permissions::from_mode(0o600)).unwrap();
        assert!(
            Secret::load(&p)
                .unwrap_err()
                .to_string()
                .contains("is empty")
        );
        // 31 bytes: too short for the link's keys.
        fs::write(&p, format!("{}\n", "a".repeat(31))).unwrap();
        let err = Secret::load(&p).unwrap_err().to_string();
        assert!(
            err.contains("31 bytes") && err.contains("openssl rand -hex 32"),
            "{err}"
        );
        let key = "0123456789abcdef".repeat(4);
        fs::write(&p, format!("{key}\n")).unwrap();
        fs::set_permissions(&p, fs::Permissions::from_mode(0o640)).unwrap();
        let err = Secret::load(&p).unwrap_err().to_string();
        assert!(err.contains("readable by group"), "{err}");
        fs::set_permissions(&p, fs::Permissions::from_mode(0o604)).unwrap();
        assert!(
            Secret::load(&p)
                .unwrap_err()
                .to_string()
                .contains("readable by others")
        );
        fs::set_permissions(&p, fs::Permissions::from_mode(0o600)).unwrap();
        let s = Secret::load(&p).unwrap();
        assert_eq!(s.0, key.as_bytes());
    }

    #[test]
    fn nonces_differ() {
        assert_ne!(nonce().unwrap(), nonce().unwrap());
    }
}
