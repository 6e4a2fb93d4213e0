//! Checkpoints as C2SP signed notes (c2sp.org/signed-note,
//! c2sp.org/tlog-checkpoint), so any note verifier can check them.
//!
//! The body is the three checkpoint lines (origin, tree size, base64 root).
//! Two signature lines follow, both by the log's Ed25519 key: a plain
//! Ed25519 note signature (type 0x01), which every checkpoint verifier
//! knows, and a timestamped `cosignature/v1` (type 0x04, c2sp.org/
//! tlog-cosignature) that binds the signing time without an extension
//! line in the body.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use ed25519_dalek::{Signer, SigningKey};
use sha2::{Digest, Sha256};

use crate::merkle::Hash;

/// Signature type of a plain Ed25519 note signature.
const ED25519: u8 = 0x01;
/// Signature type of a timestamped Ed25519 cosignature.
const COSIGNATURE_V1: u8 = 0x04;

/// The key that signs checkpoints, under the log's origin as its name.
pub struct NoteSigner {
    name: String,
    key: SigningKey,
}

impl std::fmt::Debug for NoteSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NoteSigner")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

/// An origin unusable as a note key name.
#[derive(Debug, thiserror::Error)]
#[error("PLINTH_AUDIT__ORIGIN {0:?} must be non-empty printable text without spaces or `+`")]
pub struct BadOrigin(String);

/// A checkpoint body and its signed note.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignedCheckpoint {
    /// Leaves in the tree.
    pub tree_size: u64,
    /// The tree's root hash.
    pub root: Hash,
    /// Unix seconds of the cosignature.
    pub time_secs: u64,
    /// The note: body, blank line, signature lines.
    pub note: String,
}

impl SignedCheckpoint {
    /// The checkpoint as the API and its event carry it, for a log named `origin`.
    pub fn wire(&self, origin: &str) -> plinth::audit::v1::Checkpoint {
        plinth::audit::v1::Checkpoint {
            note: self.note.clone(),
            origin: origin.to_owned(),
            tree_size: i64::try_from(self.tree_size).unwrap_or(i64::MAX),
            root_hash: bytes::Bytes::copy_from_slice(&self.root),
            time: Some(plinth_runtime::wire::timestamp(
                i64::try_from(self.time_secs).unwrap_or(0).saturating_mul(1000),
            )),
        }
    }
}

impl NoteSigner {
    /// A signer named `origin` holding the Ed25519 key of `seed`.
    pub fn new(origin: &str, seed: &[u8; 32]) -> Result<Self, BadOrigin> {
        let valid = !origin.is_empty() && origin.chars().all(|c| c.is_ascii_graphic() && c != '+');
        if !valid {
            return Err(BadOrigin(origin.to_owned()));
        }
        Ok(Self {
            name: origin.to_owned(),
            key: SigningKey::from_bytes(seed),
        })
    }

    /// The origin and key name.
    pub fn origin(&self) -> &str {
        &self.name
    }

    /// The raw public key.
    pub fn public_key(&self) -> [u8; 32] {
        self.key.verifying_key().to_bytes()
    }

    fn key_id(&self, kind: u8) -> [u8; 4] {
        let mut h = Sha256::new();
        h.update(self.name.as_bytes());
        h.update(b"\n");
        h.update([kind]);
        h.update(self.public_key());
        let d = h.finalize();
        [d[0], d[1], d[2], d[3]]
    }

    /// The note verifier key: `<name>+<key id hex>+<base64(0x01 || key)>`.
    pub fn verifier_key(&self) -> String {
        let mut material = vec![ED25519];
        material.extend_from_slice(&self.public_key());
        let id: String = self.key_id(ED25519).iter().map(|b| format!("{b:02x}")).collect();
        format!("{}+{id}+{}", self.name, STANDARD.encode(material))
    }

    /// The checkpoint body for a tree.
    pub fn body(&self, tree_size: u64, root: &Hash) -> String {
        format!("{}\n{tree_size}\n{}\n", self.name, STANDARD.encode(root))
    }

    /// Signs the checkpoint of a tree at `time_secs`.
    pub fn sign(&self, tree_size: u64, root: Hash, time_secs: u64) -> SignedCheckpoint {
        let body = self.body(tree_size, &root);
        let plain = self.key.sign(body.as_bytes());
        let mut line = self.key_id(ED25519).to_vec();
        line.extend_from_slice(&plain.to_bytes());

        let cosigned = format!("cosignature/v1\ntime {time_secs}\n{body}");
        let timed = self.key.sign(cosigned.as_bytes());
        let mut cosig = self.key_id(COSIGNATURE_V1).to_vec();
        cosig.extend_from_slice(&time_secs.to_be_bytes());
        cosig.extend_from_slice(&timed.to_bytes());

        let note = format!(
            "{body}\n\u{2014} {name} {plain}\n\u{2014} {name} {cosig}\n",
            name = self.name,
            plain = STANDARD.encode(line),
            cosig = STANDARD.encode(cosig),
        );
        SignedCheckpoint {
            tree_size,
            root,
            time_secs,
            note,
        }
    }

    /// Whether `note` is exactly what this key signs for its tree (the
    /// log re-verifying what it stored).
    pub fn verify(&self, c: &SignedCheckpoint) -> bool {
        use ed25519_dalek::Verifier;
        let body = self.body(c.tree_size, &c.root);
        let Some(rest) = c.note.strip_prefix(&body).and_then(|r| r.strip_prefix('\n')) else {
            return false;
        };
        let prefix = format!("\u{2014} {} ", self.name);
        let lines: Vec<&str> = rest.lines().collect();
        let Some(sig) = lines
            .first()
            .and_then(|l| l.strip_prefix(&prefix))
            .and_then(|b| STANDARD.decode(b).ok())
        else {
            return false;
        };
        if sig.len() != 68 || sig[..4] != self.key_id(ED25519) {
            return false;
        }
        let Ok(signature) = ed25519_dalek::Signature::from_slice(&sig[4..]) else {
            return false;
        };
        self.key.verifying_key().verify(body.as_bytes(), &signature).is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notes_have_the_c2sp_shape_and_verify() {
        let signer = NoteSigner::new("example.com/log", &[7u8; 32]).expect("valid origin");
        let c = signer.sign(5, [1u8; 32], 1_700_000_000);
        let mut lines = c.note.lines();
        assert_eq!(lines.next(), Some("example.com/log"));
        assert_eq!(lines.next(), Some("5"));
        assert_eq!(lines.next(), Some(STANDARD.encode([1u8; 32]).as_str()));
        assert_eq!(lines.next(), Some(""));
        assert!(lines.next().is_some_and(|l| l.starts_with("\u{2014} example.com/log ")));
        assert!(signer.verify(&c));
        let forged = SignedCheckpoint {
            tree_size: 6,
            ..c.clone()
        };
        assert!(!signer.verify(&forged));
        assert!(signer.verifier_key().starts_with("example.com/log+"));
        assert!(NoteSigner::new("has space", &[0u8; 32]).is_err());
        assert!(NoteSigner::new("a+b", &[0u8; 32]).is_err());
    }
}
