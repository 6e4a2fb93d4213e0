//! The signing key ring. A new key is published (in the JWKS) before it
//! signs anything, so verifiers that refetch on an unknown `kid` already know
//! it; a retired key stays published until every token it signed has expired.
//! Every replica reloads the ring from the database periodically, so a
//! rotation made anywhere is followed everywhere. With a key encryption key
//! (`PLINTH_AUTH__KEYS`, generated for embedded deployments) the seeds are
//! sealed at rest, so a copy of the database alone cannot mint tokens.

use std::sync::{Arc, PoisonError, RwLock};

use plinth::auth::v1::Jwk;
use plinth_runtime::auth::jwt::{KeySet, TokenSigner};
use plinth_runtime::crypto::{Keyring, Sealed};
use plinth_runtime::storage::Db;

use crate::AuthError;
use crate::store::{self, SigningKeyRow, StoredSeed};

/// Tolerated clock skew between replicas and verifiers.
const SKEW_SECS: i64 = 60;

/// One key of the ring.
#[derive(Debug, Clone)]
struct RingKey {
    signer: TokenSigner,
    created_at: i64,
    activates_at: i64,
    retired_at: Option<i64>,
}

/// The keys published now, and which one signs.
#[derive(Debug, Clone, Default)]
pub struct KeyRing {
    keys: Vec<RingKey>,
    jwks: Vec<Jwk>,
    keyset: KeySet,
}

impl KeyRing {
    /// The ring of `rows` at `now`: keys retired longer ago than a token
    /// lives (plus skew) are no longer published.
    pub fn from_rows(rows: Vec<SigningKeyRow>, now: i64, token_lifetime: i64) -> Self {
        let mut keys: Vec<RingKey> = rows
            .into_iter()
            .filter(|r| r.retired_at.is_none_or(|at| at + token_lifetime + SKEW_SECS > now))
            .filter_map(|r| {
                Some(RingKey {
                    signer: TokenSigner::from_seed(r.kid, r.seed.try_into().ok()?),
                    created_at: r.created_at,
                    activates_at: r.activates_at,
                    retired_at: r.retired_at,
                })
            })
            .collect();
        keys.sort_by_key(|k| std::cmp::Reverse((k.activates_at, k.created_at)));
        let jwks: Vec<Jwk> = keys.iter().map(|k| k.signer.jwk()).collect();
        Self {
            keyset: KeySet::from_jwks(&jwks),
            jwks,
            keys,
        }
    }

    /// The key that signs at `now`: the newest one already active and not
    /// retired; failing that, the newest active one.
    pub fn signer(&self, now: i64) -> Option<&TokenSigner> {
        let active = |k: &&RingKey| k.activates_at <= now;
        self.keys
            .iter()
            .filter(active)
            .find(|k| k.retired_at.is_none_or(|at| at > now))
            .or_else(|| self.keys.iter().find(active))
            .or_else(|| self.keys.last())
            .map(|k| &k.signer)
    }

    /// The published public keys.
    pub fn jwks(&self) -> &[Jwk] {
        &self.jwks
    }

    /// The published keys, for verifying.
    pub fn keyset(&self) -> &KeySet {
        &self.keyset
    }

    /// When the newest key was created.
    pub fn newest_created(&self) -> Option<i64> {
        self.keys.iter().map(|k| k.created_at).max()
    }
}

/// The ring shared by the service, reloaded from the database.
pub struct SigningKeys {
    ring: RwLock<Arc<KeyRing>>,
    token_lifetime: i64,
    sealing: Option<Keyring>,
}

/// What a sealed seed is bound to: a sealed seed copied to another key id
/// does not open.
fn seal_context(kid: &str) -> String {
    format!("auth/signing_keys/{kid}")
}

impl SigningKeys {
    /// Loads the ring, creating the first key on a new deployment. When
    /// `sealing` holds a key, seeds are written sealed and seeds stored in
    /// clear before are sealed now.
    pub async fn load(db: &Db, token_lifetime: i64, now: i64, sealing: Keyring) -> Result<Self, AuthError> {
        let keys = Self {
            ring: RwLock::new(Arc::default()),
            token_lifetime,
            sealing: (!sealing.is_empty()).then_some(sealing),
        };
        let rows = store::signing_key_rows(db).await?;
        if rows.is_empty() {
            let signer = TokenSigner::generate();
            store::insert_key(db, signer.kid(), &keys.stored(signer.kid(), &signer.seed())?, now).await?;
            tracing::info!(kid = signer.kid(), "created the first token signing key");
        }
        let mut sealed = 0;
        for row in rows.iter().filter(|r| r.kek_id.is_none()) {
            if let StoredSeed::Sealed(s) = keys.stored(&row.kid, &row.seed)?
                && store::seal_key(db, &row.kid, &s).await?
            {
                sealed += 1;
            }
        }
        if sealed > 0 {
            tracing::info!(keys = sealed, "sealed token signing keys stored in clear");
        }
        if keys.sealing.is_none() {
            tracing::warn!(
                "token signing keys are stored in clear: set PLINTH_AUTH__KEYS (or PLINTH_AUTH__KEYS_FILE) to seal them"
            );
        }
        keys.reload(db, now).await?;
        Ok(keys)
    }

    /// `seed` as it is to be written: sealed when there is a keyring.
    pub fn stored(&self, kid: &str, seed: &[u8]) -> Result<StoredSeed, AuthError> {
        let Some(ring) = &self.sealing else {
            return Ok(StoredSeed::Clear(seed.to_vec()));
        };
        let kek = ring
            .default_id()
            .ok_or_else(|| AuthError::SigningKey("the keyring is empty".into()))?;
        ring.seal(kek, seed, &seal_context(kid))
            .map(StoredSeed::Sealed)
            .map_err(|reason| AuthError::SigningKey(format!("cannot seal key {kid}: {reason}")))
    }

    /// The row with its seed in clear.
    fn open(&self, mut row: SigningKeyRow) -> Result<SigningKeyRow, AuthError> {
        let (Some(ciphertext), Some(wrapped_key), Some(kek_id)) =
            (row.sealed_seed.take(), row.wrapped_key.take(), row.kek_id.take())
        else {
            return Ok(row);
        };
        let ring = self.sealing.as_ref().ok_or_else(|| {
            AuthError::SigningKey(format!(
                "key {} is sealed under key encryption key {kek_id:?}, but PLINTH_AUTH__KEYS is not set",
                row.kid
            ))
        })?;
        let sealed = Sealed {
            ciphertext,
            wrapped_key,
            kek_id,
        };
        row.seed = ring
            .open(&sealed, &seal_context(&row.kid))
            .map_err(|reason| AuthError::SigningKey(format!("key {} does not open: {reason}", row.kid)))?;
        Ok(row)
    }

    /// Rereads the ring from the database.
    pub async fn reload(&self, db: &Db, now: i64) -> Result<(), AuthError> {
        let rows = store::signing_key_rows(db)
            .await?
            .into_iter()
            .map(|r| self.open(r))
            .collect::<Result<Vec<_>, _>>()?;
        let ring = KeyRing::from_rows(rows, now, self.token_lifetime);
        if ring.keys.is_empty() {
            return Err(AuthError::SigningKey("no usable signing key".into()));
        }
        *self.ring.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(ring);
        Ok(())
    }

    /// The ring now.
    pub fn current(&self) -> Arc<KeyRing> {
        self.ring.read().unwrap_or_else(PoisonError::into_inner).clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(kid: &str, created_at: i64, activates_at: i64, retired_at: Option<i64>) -> SigningKeyRow {
        SigningKeyRow {
            kid: kid.into(),
            seed: TokenSigner::generate().seed().to_vec(),
            sealed_seed: None,
            wrapped_key: None,
            kek_id: None,
            created_at,
            activates_at,
            retired_at,
        }
    }

    #[test]
    fn a_new_key_is_published_before_it_signs() {
        let ring = KeyRing::from_rows(vec![row("old", 0, 0, Some(160)), row("new", 100, 160, None)], 120, 900);
        assert_eq!(ring.jwks().len(), 2, "both published during the lead time");
        assert_eq!(ring.signer(120).unwrap().kid(), "old", "the new key does not sign yet");
        assert_eq!(ring.signer(160).unwrap().kid(), "new");
    }

    #[test]
    fn a_retired_key_stays_published_until_its_tokens_expire() {
        let rows = || vec![row("old", 0, 0, Some(160)), row("new", 100, 160, None)];
        let lifetime = 900;
        let still = KeyRing::from_rows(rows(), 160 + lifetime + SKEW_SECS - 1, lifetime);
        assert!(still.keyset().contains("old"));
        let gone = KeyRing::from_rows(rows(), 160 + lifetime + SKEW_SECS, lifetime);
        assert!(!gone.keyset().contains("old"));
        assert!(gone.keyset().contains("new"));
    }
}
