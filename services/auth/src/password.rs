//! Password hashing with argon2id at the OWASP floor (19 MiB, 2 passes, 1
//! lane), on a fixed set of dedicated threads with a bounded queue, so a
//! login storm waits in line (or is told to come back) instead of exhausting
//! memory or starving the async runtime. A fixed set of threads also bounds
//! the allocator arenas that keep freed 19 MiB blocks. Also the password
//! policy.

use std::sync::mpsc::{Receiver, SyncSender, TrySendError, sync_channel};
use std::sync::{Arc, Mutex, PoisonError};

use argon2::password_hash::{PasswordHash, PasswordHasher as _, PasswordVerifier, SaltString};
use argon2::{Algorithm, Argon2, Params, Version};
use tokio::sync::oneshot;

use crate::AuthError;

/// Shortest password accepted.
pub const MIN_PASSWORD_CHARS: usize = 12;
/// Longest password accepted (well above the 64 that ASVS asks to allow).
pub const MAX_PASSWORD_CHARS: usize = 1024;

/// Passwords too common to allow, whatever their length.
const COMMON: &[&str] = &[
    "123456789012",
    "1234567890123",
    "12345678901234",
    "qwertyuiopas",
    "qwertyuiop123",
    "password1234",
    "password12345",
    "passwordpassword",
    "iloveyou1234",
    "letmein12345",
    "welcome12345",
    "administrator",
    "abc123456789",
    "qwerty123456",
    "111111111111",
    "000000000000",
    "aaaaaaaaaaaa",
    "monkey123456",
    "dragon123456",
    "football1234",
    "baseball1234",
    "sunshine1234",
    "princess1234",
    "trustno11234",
    "changeme1234",
    "p@ssw0rd1234",
    "passw0rd1234",
    "correcthorsebatterystaple",
];

/// Hashing requests that may wait for a thread; more are refused as busy.
const QUEUE: usize = 1024;

type Job = Box<dyn FnOnce(&Argon2<'static>) + Send>;

/// Hashes and verifies passwords on a fixed pool of threads.
#[derive(Clone)]
pub struct PasswordHasher {
    jobs: SyncSender<Job>,
    /// A real hash of a random password: unknown users are verified against
    /// it so they cost the same time as known ones.
    dummy: Arc<str>,
}

impl PasswordHasher {
    /// A hasher with `concurrency` dedicated threads.
    pub fn new(concurrency: usize) -> Result<Self, AuthError> {
        let params = Params::new(19 * 1024, 2, 1, None).map_err(|e| AuthError::Hashing(e.to_string()))?;
        let argon = Argon2::new(Algorithm::Argon2id, Version::V0x13, params);
        let random: [u8; 16] = rand::random();
        let salt = SaltString::encode_b64(&random).map_err(|e| AuthError::Hashing(e.to_string()))?;
        let dummy = argon
            .hash_password(&rand::random::<[u8; 16]>(), &salt)
            .map_err(|e| AuthError::Hashing(e.to_string()))?
            .to_string();
        let (jobs, queue) = sync_channel::<Job>(QUEUE);
        let queue = Arc::new(Mutex::new(queue));
        for n in 0..concurrency.max(1) {
            let (queue, argon) = (queue.clone(), argon.clone());
            std::thread::Builder::new()
                .name(format!("argon2-{n}"))
                .spawn(move || worker(&queue, &argon))
                .map_err(|e| AuthError::Hashing(e.to_string()))?;
        }
        Ok(Self {
            jobs,
            dummy: dummy.into(),
        })
    }

    async fn run<T: Send + 'static>(
        &self,
        work: impl FnOnce(&Argon2<'static>) -> T + Send + 'static,
    ) -> Result<T, AuthError> {
        let (tx, rx) = oneshot::channel();
        let job: Job = Box::new(move |argon| {
            let _ = tx.send(work(argon));
        });
        match self.jobs.try_send(job) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => return Err(AuthError::Busy),
            Err(TrySendError::Disconnected(_)) => return Err(AuthError::Hashing("hashing threads stopped".into())),
        }
        rx.await.map_err(|e| AuthError::Hashing(e.to_string()))
    }

    /// A PHC-format argon2id hash of `password` with a fresh salt.
    pub async fn hash(&self, password: String) -> Result<String, AuthError> {
        let salt_bytes: [u8; 16] = rand::random();
        self.run(move |argon| {
            let salt = SaltString::encode_b64(&salt_bytes).map_err(|e| AuthError::Hashing(e.to_string()))?;
            argon
                .hash_password(password.as_bytes(), &salt)
                .map(|h| h.to_string())
                .map_err(|e| AuthError::Hashing(e.to_string()))
        })
        .await?
    }

    /// Whether `password` matches `stored`. With no stored hash (unknown
    /// user) it verifies against a dummy hash and returns false, taking the
    /// same time.
    pub async fn verify(&self, password: String, stored: Option<String>) -> Result<bool, AuthError> {
        let known = stored.is_some();
        let hash = stored.unwrap_or_else(|| self.dummy.to_string());
        let ok = self
            .run(move |argon| PasswordHash::new(&hash).map(|h| argon.verify_password(password.as_bytes(), &h).is_ok()))
            .await?
            .map_err(|e| AuthError::Hashing(e.to_string()))?;
        Ok(ok && known)
    }
}

/// Runs jobs until every sender is gone (the hasher was dropped).
fn worker(queue: &Mutex<Receiver<Job>>, argon: &Argon2<'static>) {
    loop {
        let job = queue.lock().unwrap_or_else(PoisonError::into_inner).recv();
        match job {
            Ok(job) => job(argon),
            Err(_) => return,
        }
    }
}

/// Checks the password policy; the error names the `password` field.
pub fn check_policy(password: &str, email: &str) -> Result<(), AuthError> {
    let chars = password.chars().count();
    if chars < MIN_PASSWORD_CHARS {
        return Err(AuthError::field(
            "password",
            format!("must be at least {MIN_PASSWORD_CHARS} characters"),
        ));
    }
    if chars > MAX_PASSWORD_CHARS {
        return Err(AuthError::field(
            "password",
            format!("must be at most {MAX_PASSWORD_CHARS} characters"),
        ));
    }
    let lower = password.to_lowercase();
    if COMMON.contains(&lower.as_str()) || password.chars().all(|c| password.starts_with(c)) {
        return Err(AuthError::field("password", "is too common; choose another"));
    }
    let local = email.split('@').next().unwrap_or_default().to_lowercase();
    if local.chars().count() >= 4 && lower.contains(&local) {
        return Err(AuthError::field("password", "must not contain the email address"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policy_names_the_field_and_allows_long_passphrases() {
        assert!(check_policy("short", "a@b.c").is_err());
        assert!(check_policy("password1234", "a@b.c").is_err());
        assert!(check_policy("zzzzzzzzzzzzzzzz", "a@b.c").is_err());
        assert!(check_policy("alice-in-wonderland-9", "alice@example.com").is_err());
        assert!(check_policy(&"x".repeat(1025), "a@b.c").is_err());
        assert!(check_policy("violet staircase under rain", "a@b.c").is_ok());
        assert!(
            check_policy(&"correct horse battery staple ".repeat(3), "a@b.c").is_ok(),
            "100 characters must be fine"
        );
        let AuthError::Invalid(v) = check_policy("short", "a@b.c").unwrap_err() else {
            panic!()
        };
        assert_eq!(v[0].field, "password");
    }

    #[tokio::test]
    async fn hashes_verify_and_unknown_users_never_match() {
        let h = PasswordHasher::new(2).unwrap();
        let hash = h.hash("violet staircase".into()).await.unwrap();
        assert!(hash.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"), "{hash}");
        assert!(h.verify("violet staircase".into(), Some(hash.clone())).await.unwrap());
        assert!(!h.verify("violet staircasE".into(), Some(hash)).await.unwrap());
        assert!(!h.verify("anything".into(), None).await.unwrap());
    }
}
