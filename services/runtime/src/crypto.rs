//! Envelope encryption of secrets at rest (config secret values, auth
//! token-signing keys): each value gets its own random AES-256-GCM data key;
//! the data key is wrapped (AES-256-GCM) by a key encryption key (KEK) from
//! a configured keyring, whose id is stored with the value. Rotating the KEK
//! re-wraps data keys only; values are never re-encrypted. This module holds
//! key material and does the cryptography; which KEK is active, and what is
//! sealed, is each service's business.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use ring::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use ring::rand::{SecureRandom, SystemRandom};
use secrecy::{ExposeSecret, SecretString};

/// Bytes of an AES-256 key.
const KEY_LEN: usize = 32;

/// A value encrypted under its own data key, and that key wrapped by a KEK.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sealed {
    /// Nonce and ciphertext of the value.
    pub ciphertext: Vec<u8>,
    /// Nonce and ciphertext of the data key.
    pub wrapped_key: Vec<u8>,
    /// Which key encryption key wraps it.
    pub kek_id: String,
}

/// Where a keyring's keys come from.
#[derive(Debug, Clone, Copy)]
pub struct KeySources<'a> {
    /// The setting that gives keys inline, for messages (`PLINTH_CONFIG__KEYS`).
    pub setting: &'a str,
    /// Inline keys, `id=<base64 of 32 bytes>` separated by commas.
    pub keys: Option<&'a SecretString>,
    /// A file of such keys, one per line.
    pub keys_file: Option<&'a Path>,
    /// With neither set: a key file to use, generated at first start
    /// (embedded deployments, so secrets work with no set-up).
    pub generate_at: Option<&'a Path>,
    /// What the keys protect, for the generated file and the log.
    pub protects: &'a str,
}

/// The keyring could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum KeyringError {
    /// A key entry is malformed.
    #[error("{source_name}: {reason}")]
    Malformed {
        /// `PLINTH_CONFIG__KEYS` or the file's path.
        source_name: String,
        /// Why.
        reason: String,
    },
    /// The key file could not be read or created.
    #[error("{path}: {source}")]
    File {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
}

/// Key encryption keys by id, in the order they were configured.
pub struct Keyring {
    keys: BTreeMap<String, LessSafeKey>,
    order: Vec<String>,
    rng: SystemRandom,
    source: String,
}

impl std::fmt::Debug for Keyring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Keyring")
            .field("ids", &self.order)
            .finish_non_exhaustive()
    }
}

impl Keyring {
    /// Loads the inline keys and the key file; with neither set and
    /// `generate_at` given, uses or creates that file.
    pub fn load(from: KeySources<'_>) -> Result<Self, KeyringError> {
        let mut ring = Self {
            keys: BTreeMap::new(),
            order: Vec::new(),
            rng: SystemRandom::new(),
            source: String::new(),
        };
        if let Some(keys) = from.keys {
            ring.add_lines(from.setting, keys.expose_secret().split(','))?;
            ring.source = from.setting.into();
        }
        let file = match (from.keys_file, from.generate_at) {
            (Some(path), _) => Some(path.to_path_buf()),
            (None, Some(path)) if from.keys.is_none() => {
                if !path.exists() {
                    ring.generate_file(path, from.protects, from.setting)?;
                }
                Some(path.to_path_buf())
            }
            (None, _) => None,
        };
        if let Some(path) = file {
            let text = std::fs::read_to_string(&path).map_err(|source| KeyringError::File {
                path: path.clone(),
                source,
            })?;
            ring.add_lines(&path.display().to_string(), text.lines())?;
            ring.source = path.display().to_string();
        }
        Ok(ring)
    }

    /// A keyring of the given raw keys, for tests and tools.
    pub fn from_keys(keys: &[(&str, [u8; KEY_LEN])]) -> Result<Self, KeyringError> {
        let mut ring = Self {
            keys: BTreeMap::new(),
            order: Vec::new(),
            rng: SystemRandom::new(),
            source: "test".into(),
        };
        for (id, key) in keys {
            ring.insert("test", id, key)?;
        }
        Ok(ring)
    }

    fn generate_file(&self, path: &Path, protects: &str, setting: &str) -> Result<(), KeyringError> {
        let mut key = [0u8; KEY_LEN];
        self.rng.fill(&mut key).map_err(|_| KeyringError::Malformed {
            source_name: path.display().to_string(),
            reason: "the system random source failed".into(),
        })?;
        let id = format!("local-{}", crate::auth::unix_now_ms() / 1000);
        let line = format!(
            "# Key encryption key for {protects}, generated at first start. Keep it with the data:\n# values encrypted under it are unreadable without it.\n{id}={}\n",
            STANDARD.encode(key)
        );
        let err = |source| KeyringError::File {
            path: path.to_path_buf(),
            source,
        };
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(err)?;
        }
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create_new(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            options.mode(0o600);
        }
        let mut file = options.open(path).map_err(err)?;
        file.write_all(line.as_bytes()).map_err(err)?;
        tracing::warn!(
            path = %path.display(),
            key_id = %id,
            protects,
            setting,
            "generated a key encryption key at first start; give one in the setting in production"
        );
        Ok(())
    }

    fn add_lines<'a>(&mut self, source: &str, lines: impl Iterator<Item = &'a str>) -> Result<(), KeyringError> {
        for line in lines.map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')) {
            let (id, b64) = line.split_once('=').ok_or_else(|| KeyringError::Malformed {
                source_name: source.into(),
                reason: "expected id=<base64 of 32 bytes>".into(),
            })?;
            let bytes = STANDARD.decode(b64.trim()).map_err(|e| KeyringError::Malformed {
                source_name: source.into(),
                reason: format!("key {}: not base64: {e}", id.trim()),
            })?;
            let key: [u8; KEY_LEN] = bytes.try_into().map_err(|_| KeyringError::Malformed {
                source_name: source.into(),
                reason: format!("key {}: must be 32 bytes", id.trim()),
            })?;
            self.insert(source, id.trim(), &key)?;
        }
        Ok(())
    }

    fn insert(&mut self, source: &str, id: &str, key: &[u8; KEY_LEN]) -> Result<(), KeyringError> {
        let valid_id = !id.is_empty()
            && id.len() <= 64
            && id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
        if !valid_id {
            return Err(KeyringError::Malformed {
                source_name: source.into(),
                reason: format!("key id {id:?} must be 1-64 letters, digits, '-', '_' or '.'"),
            });
        }
        let unbound = UnboundKey::new(&AES_256_GCM, key).map_err(|_| KeyringError::Malformed {
            source_name: source.into(),
            reason: format!("key {id}: rejected by AES-256-GCM"),
        })?;
        if self.keys.insert(id.to_owned(), LessSafeKey::new(unbound)).is_some() {
            return Err(KeyringError::Malformed {
                source_name: source.into(),
                reason: format!("key id {id} appears twice"),
            });
        }
        self.order.push(id.to_owned());
        Ok(())
    }

    /// Whether no key is configured.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// The first configured key: active until a rotation names another.
    pub fn default_id(&self) -> Option<&str> {
        self.order.first().map(String::as_str)
    }

    /// Whether the keyring holds `id`.
    pub fn contains(&self, id: &str) -> bool {
        self.keys.contains_key(id)
    }

    /// Where the keys came from, for error messages.
    pub fn source(&self) -> &str {
        &self.source
    }

    fn kek(&self, id: &str) -> Result<&LessSafeKey, String> {
        self.keys
            .get(id)
            .ok_or_else(|| format!("key encryption key {id:?} is not in the configured keyring"))
    }

    fn encrypt(&self, key: &LessSafeKey, plaintext: &[u8], aad: &[u8]) -> Result<Vec<u8>, String> {
        let mut nonce = [0u8; NONCE_LEN];
        self.rng
            .fill(&mut nonce)
            .map_err(|_| "the system random source failed".to_owned())?;
        let mut buf = plaintext.to_vec();
        key.seal_in_place_append_tag(Nonce::assume_unique_for_key(nonce), Aad::from(aad), &mut buf)
            .map_err(|_| "encryption failed".to_owned())?;
        let mut out = nonce.to_vec();
        out.extend_from_slice(&buf);
        Ok(out)
    }

    fn decrypt(key: &LessSafeKey, sealed: &[u8], aad: &[u8]) -> Result<Vec<u8>, String> {
        if sealed.len() < NONCE_LEN {
            return Err("ciphertext too short".into());
        }
        let (nonce, ct) = sealed.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| "bad nonce".to_owned())?;
        let mut buf = ct.to_vec();
        let plain = key
            .open_in_place(nonce, Aad::from(aad), &mut buf)
            .map_err(|_| "authentication failed (wrong key or tampered data)".to_owned())?;
        Ok(plain.to_vec())
    }

    /// Encrypts `plaintext` under a fresh data key wrapped by `kek_id`.
    /// `context` (namespace/environment/key) is bound to the ciphertext, so a
    /// value copied to another key does not decrypt.
    pub fn seal(&self, kek_id: &str, plaintext: &[u8], context: &str) -> Result<Sealed, String> {
        let kek = self.kek(kek_id)?;
        let mut dek = [0u8; KEY_LEN];
        self.rng
            .fill(&mut dek)
            .map_err(|_| "the system random source failed".to_owned())?;
        let data_key = LessSafeKey::new(UnboundKey::new(&AES_256_GCM, &dek).map_err(|_| "bad data key".to_owned())?);
        let ciphertext = self.encrypt(&data_key, plaintext, context.as_bytes())?;
        let wrapped_key = self.encrypt(kek, &dek, kek_id.as_bytes())?;
        Ok(Sealed {
            ciphertext,
            wrapped_key,
            kek_id: kek_id.to_owned(),
        })
    }

    fn unwrap_key(&self, sealed: &Sealed) -> Result<Vec<u8>, String> {
        let kek = self.kek(&sealed.kek_id)?;
        Self::decrypt(kek, &sealed.wrapped_key, sealed.kek_id.as_bytes())
    }

    /// Decrypts a sealed value.
    pub fn open(&self, sealed: &Sealed, context: &str) -> Result<Vec<u8>, String> {
        let dek = self.unwrap_key(sealed)?;
        let data_key = LessSafeKey::new(UnboundKey::new(&AES_256_GCM, &dek).map_err(|_| "bad data key".to_owned())?);
        Self::decrypt(&data_key, &sealed.ciphertext, context.as_bytes())
    }

    /// The same value with its data key wrapped by `kek_id` instead.
    pub fn rewrap(&self, sealed: &Sealed, kek_id: &str) -> Result<Sealed, String> {
        let dek = self.unwrap_key(sealed)?;
        let wrapped_key = self.encrypt(self.kek(kek_id)?, &dek, kek_id.as_bytes())?;
        Ok(Sealed {
            ciphertext: sealed.ciphertext.clone(),
            wrapped_key,
            kek_id: kek_id.to_owned(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ring() -> Keyring {
        let Ok(r) = Keyring::from_keys(&[("a", [1; 32]), ("b", [2; 32])]) else {
            unreachable!("fixed keys are valid")
        };
        r
    }

    #[test]
    fn sealed_values_open_and_survive_rewrapping() {
        let r = ring();
        let s = r.seal("a", b"hunter2", "app/prod/db").unwrap();
        assert_eq!(s.kek_id, "a");
        assert!(!s.ciphertext.windows(7).any(|w| w == b"hunter2"));
        assert_eq!(r.open(&s, "app/prod/db").unwrap(), b"hunter2");
        let moved = r.rewrap(&s, "b").unwrap();
        assert_eq!(moved.kek_id, "b");
        assert_eq!(
            moved.ciphertext, s.ciphertext,
            "rotation re-wraps the key, not the value"
        );
        assert_eq!(r.open(&moved, "app/prod/db").unwrap(), b"hunter2");
    }

    #[test]
    fn a_value_moved_to_another_key_or_tampered_does_not_open() {
        let r = ring();
        let s = r.seal("a", b"x", "app/prod/db").unwrap();
        assert!(r.open(&s, "app/prod/other").is_err());
        let mut t = s.clone();
        if let Some(b) = t.ciphertext.last_mut() {
            *b ^= 1;
        }
        assert!(r.open(&t, "app/prod/db").is_err());
        let mut wrong = s;
        wrong.kek_id = "b".into();
        assert!(r.open(&wrong, "app/prod/db").is_err());
    }

    fn sources<'a>(keys: Option<&'a SecretString>, generate_at: Option<&'a Path>) -> KeySources<'a> {
        KeySources {
            setting: "PLINTH_TEST__KEYS",
            keys,
            keys_file: None,
            generate_at,
            protects: "tests",
        }
    }

    #[test]
    fn keys_parse_from_configuration_and_reject_bad_entries() {
        let load = |keys: &str| Keyring::load(sources(Some(&SecretString::from(keys.to_owned())), None));
        let k = STANDARD.encode([7u8; 32]);
        let r = load(&format!("k1={k}, k2={k}")).unwrap();
        assert_eq!(r.default_id(), Some("k1"));
        assert!(r.contains("k2"));
        assert!(load("k1=short").is_err());
        assert!(load(&format!("k1={k},k1={k}")).is_err());
        let bad = load(&format!("bad id={k}")).unwrap_err().to_string();
        assert!(bad.starts_with("PLINTH_TEST__KEYS:"), "{bad}");
    }

    #[test]
    fn an_embedded_deployment_generates_and_then_reuses_its_key() {
        let dir = std::env::temp_dir().join(format!("plinth-kek-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let file = dir.join("keys");
        let first = Keyring::load(sources(None, Some(&file))).unwrap();
        let sealed = first.seal(first.default_id().unwrap(), b"v", "c").unwrap();
        let second = Keyring::load(sources(None, Some(&file))).unwrap();
        assert_eq!(second.open(&sealed, "c").unwrap(), b"v");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
