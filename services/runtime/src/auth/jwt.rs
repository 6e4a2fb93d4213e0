//! Access tokens: compact JWS with EdDSA (Ed25519), `typ: at+jwt`, a `kid`
//! header and the claims every service needs. The issuer (the auth service)
//! and every verifier use this one codec. Verification accepts exactly one
//! algorithm, chosen by the key, never by the token: `alg: none`, HMAC with a
//! public key as secret and every other substitution fail before any crypto.

use std::collections::HashMap;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use plinth::auth::v1::Jwk;
use serde::{Deserialize, Serialize};

/// The only algorithm Plinth signs or accepts.
pub const ALGORITHM: &str = "EdDSA";
/// The `typ` header of access tokens (RFC 9068).
pub const TOKEN_TYPE: &str = "at+jwt";

/// What an access token says about its bearer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    /// Issuer, e.g. `plinth`.
    pub iss: String,
    /// Subject: the user or service account id.
    pub sub: String,
    /// Audience, e.g. `plinth`.
    pub aud: String,
    /// Expiry, seconds since the epoch.
    pub exp: i64,
    /// Issued at.
    pub iat: i64,
    /// Not before.
    pub nbf: i64,
    /// Token id, for revocation.
    pub jti: String,
    /// Session id (the refresh-token family).
    #[serde(default)]
    pub sid: String,
    /// Roles bound to the subject when the token was issued.
    #[serde(default)]
    pub roles: Vec<String>,
    /// Permission patterns those roles granted when the token was issued
    /// (after inheritance). A role change revokes the subject's tokens, so
    /// this is never staler than the policy.
    #[serde(default)]
    pub perms: Vec<String>,
    /// The subject's tenant; absent for none.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub tenant: String,
}

#[derive(Serialize, Deserialize)]
struct Header {
    alg: String,
    #[serde(default)]
    typ: String,
    #[serde(default)]
    kid: String,
}

/// Why a token was refused. Callers see only "invalid token"; this is for logs.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// Not three base64url parts of JSON.
    #[error("malformed token")]
    Malformed,
    /// An API key its issuer does not vouch for (unknown, expired or revoked).
    #[error("unknown, expired or revoked API key")]
    UnknownApiKey,
    /// `alg` is anything but EdDSA.
    #[error("algorithm `{0}` is not accepted")]
    Algorithm(String),
    /// `typ` is not `at+jwt`.
    #[error("token type `{0}` is not an access token")]
    Type(String),
    /// No published key has this `kid`.
    #[error("unknown signing key `{0}`")]
    UnknownKey(String),
    /// The signature does not verify.
    #[error("bad signature")]
    Signature,
    /// `exp` has passed.
    #[error("token expired")]
    Expired,
    /// `nbf` is in the future.
    #[error("token not yet valid")]
    NotYetValid,
    /// `iss` is not ours.
    #[error("wrong issuer `{0}`")]
    Issuer(String),
    /// `aud` is not ours.
    #[error("wrong audience `{0}`")]
    Audience(String),
}

/// A private signing key with its id.
#[derive(Clone)]
pub struct TokenSigner {
    kid: String,
    key: SigningKey,
}

impl std::fmt::Debug for TokenSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenSigner")
            .field("kid", &self.kid)
            .finish_non_exhaustive()
    }
}

impl TokenSigner {
    /// A new random key with a new id.
    pub fn generate() -> Self {
        let seed: [u8; 32] = rand::random();
        Self::from_seed(uuid::Uuid::now_v7().simple().to_string(), seed)
    }

    /// A key from its 32-byte seed.
    pub fn from_seed(kid: String, seed: [u8; 32]) -> Self {
        Self {
            kid,
            key: SigningKey::from_bytes(&seed),
        }
    }

    /// The key id.
    pub fn kid(&self) -> &str {
        &self.kid
    }

    /// The 32-byte seed, for storage.
    pub fn seed(&self) -> [u8; 32] {
        self.key.to_bytes()
    }

    /// The public half as a JWK.
    pub fn jwk(&self) -> Jwk {
        public_jwk(&self.kid, &self.key.verifying_key())
    }

    /// Signs `claims` into a compact JWS.
    pub fn sign(&self, claims: &Claims) -> String {
        let header = Header {
            alg: ALGORITHM.into(),
            typ: TOKEN_TYPE.into(),
            kid: self.kid.clone(),
        };
        // Serialising these plain structs cannot fail.
        let header = serde_json::to_vec(&header).unwrap_or_default();
        let claims = serde_json::to_vec(claims).unwrap_or_default();
        let signing_input = format!("{}.{}", URL_SAFE_NO_PAD.encode(header), URL_SAFE_NO_PAD.encode(claims));
        let signature = self.key.sign(signing_input.as_bytes());
        format!("{signing_input}.{}", URL_SAFE_NO_PAD.encode(signature.to_bytes()))
    }
}

/// The JWK of an Ed25519 public key (RFC 8037).
pub fn public_jwk(kid: &str, key: &VerifyingKey) -> Jwk {
    Jwk {
        kty: "OKP".into(),
        crv: "Ed25519".into(),
        x: URL_SAFE_NO_PAD.encode(key.to_bytes()),
        kid: kid.to_owned(),
        alg: ALGORITHM.into(),
        r#use: "sig".into(),
    }
}

/// Public keys by `kid`, built from a JWKS.
#[derive(Debug, Clone, Default)]
pub struct KeySet {
    keys: HashMap<String, VerifyingKey>,
}

impl KeySet {
    /// Keeps the Ed25519 signing keys of `jwks`; anything else is ignored.
    pub fn from_jwks(jwks: &[Jwk]) -> Self {
        let keys = jwks
            .iter()
            .filter(|k| k.kty == "OKP" && k.crv == "Ed25519" && (k.alg.is_empty() || k.alg == ALGORITHM))
            .filter_map(|k| {
                let bytes: [u8; 32] = URL_SAFE_NO_PAD.decode(&k.x).ok()?.try_into().ok()?;
                Some((k.kid.clone(), VerifyingKey::from_bytes(&bytes).ok()?))
            })
            .collect();
        Self { keys }
    }

    /// Whether a key with this id is known.
    pub fn contains(&self, kid: &str) -> bool {
        self.keys.contains_key(kid)
    }

    /// How many keys are known.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// Whether no key is known.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }
}

/// What a valid token must say.
#[derive(Debug, Clone)]
pub struct Expectations {
    /// Required `iss`.
    pub issuer: String,
    /// Required `aud`.
    pub audience: String,
    /// Clock skew tolerated on `exp` and `nbf`, in seconds.
    pub leeway_secs: i64,
}

/// The `kid` of a token, read without verifying anything (to pick a key).
pub fn peek_kid(token: &str) -> Result<String, TokenError> {
    let header = token.split('.').next().ok_or(TokenError::Malformed)?;
    let header: Header = decode_json(header)?;
    Ok(header.kid)
}

/// Verifies `token` against `keys` at time `now` (seconds since the epoch).
pub fn verify(token: &str, keys: &KeySet, expect: &Expectations, now: i64) -> Result<Claims, TokenError> {
    let mut parts = token.split('.');
    let (Some(h), Some(p), Some(s), None) = (parts.next(), parts.next(), parts.next(), parts.next()) else {
        return Err(TokenError::Malformed);
    };
    let header: Header = decode_json(h)?;
    if header.alg != ALGORITHM {
        return Err(TokenError::Algorithm(header.alg));
    }
    if !header.typ.eq_ignore_ascii_case(TOKEN_TYPE) {
        return Err(TokenError::Type(header.typ));
    }
    let key = keys
        .keys
        .get(&header.kid)
        .ok_or_else(|| TokenError::UnknownKey(header.kid.clone()))?;
    let signature = URL_SAFE_NO_PAD.decode(s).map_err(|_| TokenError::Malformed)?;
    let signature = Signature::from_slice(&signature).map_err(|_| TokenError::Malformed)?;
    let signing_input = &token[..h.len() + 1 + p.len()];
    key.verify_strict(signing_input.as_bytes(), &signature)
        .map_err(|_| TokenError::Signature)?;

    let claims: Claims = decode_json(p)?;
    if claims.iss != expect.issuer {
        return Err(TokenError::Issuer(claims.iss));
    }
    if claims.aud != expect.audience {
        return Err(TokenError::Audience(claims.aud));
    }
    if now >= claims.exp.saturating_add(expect.leeway_secs) {
        return Err(TokenError::Expired);
    }
    if now.saturating_add(expect.leeway_secs) < claims.nbf {
        return Err(TokenError::NotYetValid);
    }
    Ok(claims)
}

fn decode_json<T: serde::de::DeserializeOwned>(part: &str) -> Result<T, TokenError> {
    let bytes = URL_SAFE_NO_PAD.decode(part).map_err(|_| TokenError::Malformed)?;
    serde_json::from_slice(&bytes).map_err(|_| TokenError::Malformed)
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_800_000_000;

    fn claims() -> Claims {
        Claims {
            iss: "plinth".into(),
            sub: "user-1".into(),
            aud: "plinth".into(),
            exp: NOW + 300,
            iat: NOW,
            nbf: NOW,
            jti: "jti-1".into(),
            sid: "session-1".into(),
            roles: vec!["viewer".into()],
            perms: vec!["config.values.read".into()],
            tenant: String::new(),
        }
    }

    fn expect() -> Expectations {
        Expectations {
            issuer: "plinth".into(),
            audience: "plinth".into(),
            leeway_secs: 30,
        }
    }

    fn forge(header: &serde_json::Value, claims: &Claims, signature: &[u8]) -> String {
        format!(
            "{}.{}.{}",
            URL_SAFE_NO_PAD.encode(header.to_string()),
            URL_SAFE_NO_PAD.encode(serde_json::to_vec(claims).unwrap()),
            URL_SAFE_NO_PAD.encode(signature)
        )
    }

    #[test]
    fn a_signed_token_verifies_with_its_published_key() {
        let signer = TokenSigner::generate();
        let keys = KeySet::from_jwks(&[signer.jwk()]);
        let token = signer.sign(&claims());
        assert_eq!(verify(&token, &keys, &expect(), NOW).unwrap(), claims());
        assert_eq!(peek_kid(&token).unwrap(), signer.kid());
    }

    #[test]
    fn alg_none_is_refused() {
        let signer = TokenSigner::generate();
        let keys = KeySet::from_jwks(&[signer.jwk()]);
        let token = forge(
            &serde_json::json!({"alg": "none", "typ": "at+jwt", "kid": signer.kid()}),
            &claims(),
            b"",
        );
        assert_eq!(
            verify(&token, &keys, &expect(), NOW),
            Err(TokenError::Algorithm("none".into()))
        );
    }

    #[test]
    fn hs256_signed_with_the_public_key_is_refused() {
        use sha2::Digest;
        let signer = TokenSigner::generate();
        let jwk = signer.jwk();
        let keys = KeySet::from_jwks(std::slice::from_ref(&jwk));
        let header = serde_json::json!({"alg": "HS256", "typ": "at+jwt", "kid": signer.kid()});
        // An HMAC "signature" keyed with the public key, as the classic confusion attack does.
        let unsigned = forge(&header, &claims(), b"");
        let input = unsigned.trim_end_matches('.');
        let mac = sha2::Sha256::digest([jwk.x.as_bytes(), input.as_bytes()].concat());
        let token = format!("{input}.{}", URL_SAFE_NO_PAD.encode(mac));
        assert_eq!(
            verify(&token, &keys, &expect(), NOW),
            Err(TokenError::Algorithm("HS256".into()))
        );
    }

    #[test]
    fn wrong_type_issuer_audience_and_times_are_refused() {
        let signer = TokenSigner::generate();
        let keys = KeySet::from_jwks(&[signer.jwk()]);
        let mut c = claims();
        c.aud = "someone-else".into();
        assert_eq!(
            verify(&signer.sign(&c), &keys, &expect(), NOW),
            Err(TokenError::Audience("someone-else".into()))
        );
        let mut c = claims();
        c.iss = "evil".into();
        assert_eq!(
            verify(&signer.sign(&c), &keys, &expect(), NOW),
            Err(TokenError::Issuer("evil".into()))
        );
        let token = signer.sign(&claims());
        assert_eq!(verify(&token, &keys, &expect(), NOW + 330), Err(TokenError::Expired));
        assert!(verify(&token, &keys, &expect(), NOW + 329).is_ok(), "leeway applies");
        assert_eq!(verify(&token, &keys, &expect(), NOW - 31), Err(TokenError::NotYetValid));

        // A correctly signed token of another type (e.g. an ID token) is not an access token.
        let header = serde_json::json!({"alg": "EdDSA", "typ": "JWT", "kid": signer.kid()});
        let unsigned = forge(&header, &claims(), b"");
        let input = unsigned.trim_end_matches('.');
        let sig = signer.key.sign(input.as_bytes());
        let token = format!("{input}.{}", URL_SAFE_NO_PAD.encode(sig.to_bytes()));
        assert_eq!(
            verify(&token, &keys, &expect(), NOW),
            Err(TokenError::Type("JWT".into()))
        );
    }

    #[test]
    fn tampered_claims_and_unknown_keys_are_refused() {
        let signer = TokenSigner::generate();
        let keys = KeySet::from_jwks(&[signer.jwk()]);
        let token = signer.sign(&claims());
        let mut parts: Vec<&str> = token.split('.').collect();
        let mut c = claims();
        c.sub = "admin".into();
        let forged_claims = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&c).unwrap());
        parts[1] = &forged_claims;
        assert_eq!(
            verify(&parts.join("."), &keys, &expect(), NOW),
            Err(TokenError::Signature)
        );

        let other = TokenSigner::generate();
        let token = other.sign(&claims());
        assert_eq!(
            verify(&token, &keys, &expect(), NOW),
            Err(TokenError::UnknownKey(other.kid().to_owned()))
        );
        assert_eq!(verify("a.b", &keys, &expect(), NOW), Err(TokenError::Malformed));
    }
}
