//! Password hashing with argon2id at the OWASP floor (19 MiB, 2 passes, 1
//! lane), on a fixed set of dedicated threads with a bounded queue, so a
//! login storm waits in line (or is told to come back) instead of exhausting
//! memory or starving the async runtime. A fixed set of threads also bounds
//! the allocator arenas that keep freed 19 MiB blocks. Also the password
//! policy.

use std::sync::mpsc::{Receiver, SyncSender, TrySendError, sync_channel};
use std::sync::{Arc, Mutex, PoisonError};

use argon2::password_hash::{Output, PasswordHash, PasswordVerifier, SaltString};
use argon2::{Algorithm, Argon2, Block, Params, Version};
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
/// Length of the stored hash.
const OUTPUT_LEN: usize = 32;

/// Work for a hashing thread: its argon2 instance and its own reusable memory.
type Job = Box<dyn FnOnce(&Argon2<'static>, &mut [Block]) + Send>;

/// Hashes and verifies passwords on a fixed pool of threads, each with its
/// own preallocated argon2 memory, so hashing allocates nothing: freed 19 MiB
/// buffers would otherwise stay in the allocator and grow the process.
#[derive(Clone)]
pub struct PasswordHasher {
    jobs: SyncSender<Job>,
    /// A real hash of a random password: unknown users are verified against
    /// it so they cost the same time as known ones.
    dummy: Arc<str>,
    /// The parameters new hashes use.
    params: Params,
}

impl PasswordHasher {
    /// A hasher with `concurrency` dedicated threads.
    pub fn new(concurrency: usize) -> Result<Self, AuthError> {
        let params = Params::new(19 * 1024, 2, 1, Some(OUTPUT_LEN)).map_err(|e| AuthError::Hashing(e.to_string()))?;
        let blocks = params.block_count();
        let argon = Argon2::new(Algorithm::Argon2id, Version::V0x13, params.clone());
        let (jobs, queue) = sync_channel::<Job>(QUEUE);
        let queue = Arc::new(Mutex::new(queue));
        for n in 0..concurrency.max(1) {
            let (queue, argon) = (queue.clone(), argon.clone());
            std::thread::Builder::new()
                .name(format!("argon2-{n}"))
                .spawn(move || worker(&queue, &argon, blocks))
                .map_err(|e| AuthError::Hashing(e.to_string()))?;
        }
        let mut memory = vec![Block::default(); blocks];
        let dummy = phc_hash(&argon, &rand::random::<[u8; 16]>(), &mut memory)?;
        Ok(Self {
            jobs,
            dummy: dummy.into(),
            params,
        })
    }

    async fn run<T: Send + 'static>(
        &self,
        work: impl FnOnce(&Argon2<'static>, &mut [Block]) -> T + Send + 'static,
    ) -> Result<T, AuthError> {
        let (tx, rx) = oneshot::channel();
        let job: Job = Box::new(move |argon, memory| {
            let _ = tx.send(work(argon, memory));
        });
        match self.jobs.try_send(job) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => return Err(AuthError::Busy),
            Err(TrySendError::Disconnected(_)) => return Err(AuthError::Hashing("hashing threads stopped".into())),
        }
        rx.await.map_err(|e| AuthError::Hashing(e.to_string()))
    }

    /// Whether `stored` was made with other parameters than new hashes use
    /// (older settings, another algorithm): rehash it at the next login.
    pub fn needs_rehash(&self, stored: &str) -> bool {
        PasswordHash::new(stored).map_or(true, |parsed| !uses_params(&parsed, &self.params))
    }

    /// A PHC-format argon2id hash of `password` with a fresh salt.
    pub async fn hash(&self, password: String) -> Result<String, AuthError> {
        self.run(move |argon, memory| phc_hash(argon, password.as_bytes(), memory))
            .await?
    }

    /// Whether `password` matches `stored`. With no stored hash (unknown
    /// user) it verifies against a dummy hash and returns false, taking the
    /// same time.
    pub async fn verify(&self, password: String, stored: Option<String>) -> Result<bool, AuthError> {
        let known = stored.is_some();
        let hash = stored.unwrap_or_else(|| self.dummy.to_string());
        let ok = self
            .run(move |argon, memory| phc_verify(argon, password.as_bytes(), &hash, memory))
            .await??;
        Ok(ok && known)
    }
}

/// Hashes with the thread's memory and encodes the PHC string.
fn phc_hash(argon: &Argon2<'static>, password: &[u8], memory: &mut [Block]) -> Result<String, AuthError> {
    let salt: [u8; 16] = rand::random();
    let mut out = [0u8; OUTPUT_LEN];
    argon
        .hash_password_into_with_memory(password, &salt, &mut out, memory)
        .map_err(|e| AuthError::Hashing(e.to_string()))?;
    let salt = SaltString::encode_b64(&salt).map_err(|e| AuthError::Hashing(e.to_string()))?;
    let output = Output::new(&out).map_err(|e| AuthError::Hashing(e.to_string()))?;
    let p = argon.params();
    Ok(format!(
        "$argon2id$v=19$m={},t={},p={}${}${}",
        p.m_cost(),
        p.t_cost(),
        p.p_cost(),
        salt.as_str(),
        output
    ))
}

/// Verifies a PHC string; hashes made with other parameters (older settings)
/// are checked with them, allocating as argon2 does.
fn phc_verify(argon: &Argon2<'static>, password: &[u8], stored: &str, memory: &mut [Block]) -> Result<bool, AuthError> {
    let parsed = PasswordHash::new(stored).map_err(|e| AuthError::Hashing(e.to_string()))?;
    let (Some(expected), Some(salt)) = (parsed.hash, parsed.salt) else {
        return Err(AuthError::Hashing("stored hash has no salt or output".into()));
    };
    if !uses_params(&parsed, argon.params()) {
        return Ok(argon.verify_password(password, &parsed).is_ok());
    }
    let mut salt_bytes = [0u8; 64];
    let salt = salt
        .decode_b64(&mut salt_bytes)
        .map_err(|e| AuthError::Hashing(e.to_string()))?;
    let mut out = [0u8; OUTPUT_LEN];
    argon
        .hash_password_into_with_memory(password, salt, &mut out, memory)
        .map_err(|e| AuthError::Hashing(e.to_string()))?;
    // Output's equality is constant-time.
    Ok(Output::new(&out).is_ok_and(|computed| computed == expected))
}

/// Whether `parsed` is argon2id with exactly `params` and our output length.
fn uses_params(parsed: &PasswordHash<'_>, params: &Params) -> bool {
    parsed.algorithm.as_str() == "argon2id"
        && parsed.hash.is_some_and(|h| h.len() == OUTPUT_LEN)
        && Params::try_from(parsed).is_ok_and(|p| {
            p.m_cost() == params.m_cost() && p.t_cost() == params.t_cost() && p.p_cost() == params.p_cost()
        })
}

/// Runs jobs with this thread's memory until the hasher is dropped.
fn worker(queue: &Mutex<Receiver<Job>>, argon: &Argon2<'static>, blocks: usize) {
    let mut memory = vec![Block::default(); blocks];
    loop {
        let job = queue.lock().unwrap_or_else(PoisonError::into_inner).recv();
        match job {
            Ok(job) => job(argon, &mut memory),
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

    #[tokio::test]
    async fn our_phc_strings_are_standard_argon2_both_ways() {
        use argon2::password_hash::PasswordHasher as _;
        let h = PasswordHasher::new(1).unwrap();
        // Ours verifies with the reference implementation…
        let ours = h.hash("violet staircase".into()).await.unwrap();
        let argon = Argon2::new(
            Algorithm::Argon2id,
            Version::V0x13,
            Params::new(19 * 1024, 2, 1, None).unwrap(),
        );
        assert!(
            argon
                .verify_password(b"violet staircase", &PasswordHash::new(&ours).unwrap())
                .is_ok()
        );
        // …and the reference's, also with older parameters, verify with ours.
        let salt = SaltString::encode_b64(b"0123456789abcdef").unwrap();
        let reference = argon.hash_password(b"violet staircase", &salt).unwrap().to_string();
        assert!(h.verify("violet staircase".into(), Some(reference)).await.unwrap());
        let old = Argon2::new(
            Algorithm::Argon2id,
            Version::V0x13,
            Params::new(8 * 1024, 1, 1, None).unwrap(),
        );
        let legacy = old.hash_password(b"violet staircase", &salt).unwrap().to_string();
        assert!(h.verify("violet staircase".into(), Some(legacy.clone())).await.unwrap());
        assert!(!h.verify("violet staircasE".into(), Some(legacy)).await.unwrap());
    }
}
