//! Password hashing off the reactor: a small pool of threads running argon2id, and the
//! per-account login throttle. Tokens are in [`token`].

pub mod token;

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use argon2::password_hash::phc::{Output, ParamsString, PasswordHash, Salt};
use argon2::{Algorithm, Argon2, Block, Params, Version};
use crossbeam_channel::{Receiver, Sender, TrySendError};

/// What the pool is asked to do.
pub enum Task {
    /// Hash a new password (registration).
    Hash { pwd: String },
    /// Check a password against a stored PHC string for account `uid`.
    Verify { uid: u64, phc: String, pwd: String },
}

impl std::fmt::Debug for Task {
    /// Names the task only: passwords never reach a log.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Task::Hash { .. } => f.write_str("Task::Hash"),
            Task::Verify { uid, .. } => write!(f, "Task::Verify {{ uid: {uid} }}"),
        }
    }
}

/// What it found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Hashed(String),
    Valid,
    Invalid,
    /// Too many wrong passwords for this account recently; the password was not checked.
    Throttled,
    /// Hashing failed (bad stored hash or parameters); answered as a server error.
    Failed,
}

/// Pool tuning, from [`crate::config::Config`].
#[derive(Debug, Clone, Copy)]
pub struct AuthConfig {
    pub threads: usize,
    pub queue: usize,
    pub memory_kib: u32,
    pub iterations: u32,
    pub max_failures: usize,
    pub window: Duration,
}

/// Called on a pool thread with each verdict and the context its task was submitted with.
pub type Sink<C> = Arc<dyn Fn(Verdict, C) + Send + Sync>;

/// Handle to the pool; the threads exit when every handle is dropped.
pub struct AuthPool<C> {
    tx: Sender<(Task, C)>,
}

impl<C> Clone for AuthPool<C> {
    fn clone(&self) -> Self {
        AuthPool {
            tx: self.tx.clone(),
        }
    }
}

/// The queue is full; the caller answers 503.
pub struct Busy<C>(pub C);

impl<C: Send + 'static> AuthPool<C> {
    pub fn start(
        config: AuthConfig,
        sink: Sink<C>,
    ) -> std::io::Result<(AuthPool<C>, Vec<JoinHandle<()>>)> {
        let params = Params::new(config.memory_kib, config.iterations, 1, None)
            .map_err(|e| std::io::Error::other(format!("argon2 parameters: {e}")))?;
        let (tx, rx) = crossbeam_channel::bounded(config.queue);
        let throttle = Arc::new(Throttle::new(config.max_failures, config.window));
        let mut handles = Vec::with_capacity(config.threads);
        for i in 0..config.threads {
            let rx: Receiver<(Task, C)> = rx.clone();
            let sink = sink.clone();
            let throttle = throttle.clone();
            let params = params.clone();
            handles.push(
                std::thread::Builder::new()
                    .name(format!("polyge-auth-{i}"))
                    .spawn(move || {
                        let mut hasher = Hasher::new(params);
                        while let Ok((task, ctx)) = rx.recv() {
                            sink(run_task(&mut hasher, &throttle, task), ctx);
                        }
                    })?,
            );
        }
        Ok((AuthPool { tx }, handles))
    }

    pub fn submit(&self, task: Task, ctx: C) -> Result<(), Busy<C>> {
        match self.tx.try_send((task, ctx)) {
            Ok(()) => Ok(()),
            Err(TrySendError::Full((_, ctx))) | Err(TrySendError::Disconnected((_, ctx))) => {
                Err(Busy(ctx))
            }
        }
    }
}

/// One pool thread's argon2id: new hashes with the configured parameters, and the memory every
/// hash runs in, allocated once and reused. argon2's own entry points allocate the memory per
/// hash (19 MiB by default); freed, those blocks stayed with the allocator (the server sat at
/// ~250 MB of RssAnon after a login flood with 2 threads) or, returned to the system, had to be
/// faulted in again for every hash (a quarter fewer logins per second).
struct Hasher {
    /// Hashes new passwords; its parameters size `memory`.
    argon: Argon2<'static>,
    memory: Vec<Block>,
}

impl Hasher {
    fn new(params: Params) -> Hasher {
        Hasher {
            argon: Argon2::new(Algorithm::Argon2id, Version::V0x13, params),
            // Allocated on the first hash, so an idle server does not carry it.
            memory: Vec::new(),
        }
    }

    /// The memory for a hash with the configured parameters.
    fn memory<'a>(params: &Params, memory: &'a mut Vec<Block>) -> &'a mut [Block] {
        if memory.len() < params.block_count() {
            memory.resize(params.block_count(), Block::new());
        }
        memory
    }

    /// A new PHC string for `pwd`, with a fresh random salt (an RNG failure is an error, not
    /// a panic that would take the pool thread down).
    fn hash(&mut self, pwd: &[u8]) -> Result<String, String> {
        let salt = argon2::password_hash::try_generate_salt().map_err(|e| e.to_string())?;
        let mut out = [0u8; Params::DEFAULT_OUTPUT_LEN];
        let memory = Hasher::memory(self.argon.params(), &mut self.memory);
        self.argon
            .hash_password_into_with_memory(pwd, &salt, &mut out, memory)
            .map_err(|e| e.to_string())?;
        let phc = PasswordHash {
            algorithm: Algorithm::Argon2id.ident(),
            version: Some(Version::V0x13.into()),
            params: ParamsString::try_from(self.argon.params()).map_err(|e| e.to_string())?,
            salt: Some(Salt::new(&salt).map_err(|e| e.to_string())?),
            hash: Some(Output::new(&out).map_err(|e| e.to_string())?),
        };
        Ok(phc.to_string())
    }

    /// Whether `pwd` matches `stored`, with the algorithm, version and parameters `stored` names
    /// (so hashes made with other parameters still verify). The comparison is constant-time
    /// (`Output`'s equality).
    fn verify(&mut self, pwd: &[u8], stored: &PasswordHash) -> Result<bool, String> {
        let (Some(salt), Some(expected)) = (&stored.salt, &stored.hash) else {
            return Err("no salt or no hash".into());
        };
        let algorithm =
            Algorithm::try_from(stored.algorithm.as_str()).map_err(|e| e.to_string())?;
        let version = stored
            .version
            .map(Version::try_from)
            .transpose()
            .map_err(|e| e.to_string())?
            .unwrap_or_default();
        let params = Params::try_from(stored).map_err(|e| e.to_string())?;
        let argon = Argon2::new(algorithm, version, params.clone());
        let mut buf = [0u8; Output::MAX_LENGTH];
        let out = buf
            .get_mut(..expected.len())
            .ok_or("stored hash too long")?;
        let done = if params.block_count() <= self.argon.params().block_count() {
            let memory = Hasher::memory(self.argon.params(), &mut self.memory);
            argon.hash_password_into_with_memory(pwd, salt.as_ref(), out, memory)
        } else {
            // Stored with more memory than we hash with now: a one-off allocation.
            argon.hash_password_into(pwd, salt.as_ref(), out)
        };
        done.map_err(|e| e.to_string())?;
        Ok(Output::new(out).map_err(|e| e.to_string())? == *expected)
    }
}

fn run_task(hasher: &mut Hasher, throttle: &Throttle, task: Task) -> Verdict {
    match task {
        Task::Hash { pwd } => match hasher.hash(pwd.as_bytes()) {
            Ok(phc) => Verdict::Hashed(phc),
            Err(e) => {
                log::error!("argon2 hashing failed: {e}");
                Verdict::Failed
            }
        },
        Task::Verify { uid, phc, pwd } => {
            if throttle.is_blocked(uid) {
                return Verdict::Throttled;
            }
            let parsed = match PasswordHash::new(&phc) {
                Ok(p) => p,
                Err(e) => {
                    log::error!("stored password hash of uid {uid} does not parse: {e}");
                    return Verdict::Failed;
                }
            };
            match hasher.verify(pwd.as_bytes(), &parsed) {
                Ok(true) => Verdict::Valid,
                Ok(false) => {
                    throttle.record_failure(uid);
                    Verdict::Invalid
                }
                Err(e) => {
                    log::error!("stored password hash of uid {uid} cannot be checked: {e}");
                    Verdict::Failed
                }
            }
        }
    }
}

/// Wrong-password counts per account over a sliding window. Shared by the pool threads only,
/// never touched by a reactor thread.
struct Throttle {
    max_failures: usize,
    window: Duration,
    failures: Mutex<HashMap<u64, VecDeque<Instant>>>,
}

/// Above this many tracked accounts, stale entries are swept on the next failure.
const THROTTLE_SWEEP_AT: usize = 100_000;

impl Throttle {
    fn new(max_failures: usize, window: Duration) -> Throttle {
        Throttle {
            max_failures,
            window,
            failures: Mutex::new(HashMap::new()),
        }
    }

    fn is_blocked(&self, uid: u64) -> bool {
        let now = Instant::now();
        let mut map = self.failures.lock().unwrap_or_else(|e| e.into_inner());
        let Some(times) = map.get_mut(&uid) else {
            return false;
        };
        while times
            .front()
            .is_some_and(|t| now.duration_since(*t) >= self.window)
        {
            times.pop_front();
        }
        if times.is_empty() {
            map.remove(&uid);
            return false;
        }
        times.len() >= self.max_failures
    }

    fn record_failure(&self, uid: u64) {
        let now = Instant::now();
        let mut map = self.failures.lock().unwrap_or_else(|e| e.into_inner());
        if map.len() >= THROTTLE_SWEEP_AT {
            let window = self.window;
            map.retain(|_, t| {
                t.back()
                    .is_some_and(|last| now.duration_since(*last) < window)
            });
        }
        let times = map.entry(uid).or_default();
        times.push_back(now);
        while times.len() > self.max_failures {
            times.pop_front();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn throttle_blocks_after_max_failures_until_window_passes() {
        let t = Throttle::new(3, Duration::from_millis(200));
        for _ in 0..2 {
            t.record_failure(7);
        }
        assert!(!t.is_blocked(7));
        t.record_failure(7);
        assert!(t.is_blocked(7));
        assert!(!t.is_blocked(8));
        std::thread::sleep(Duration::from_millis(250));
        assert!(!t.is_blocked(7));
    }

    fn verify_with(hasher: &mut Hasher, t: &Throttle, phc: &str, pwd: &str) -> Verdict {
        run_task(
            hasher,
            t,
            Task::Verify {
                uid: 1,
                phc: phc.into(),
                pwd: pwd.into(),
            },
        )
    }

    #[test]
    fn hash_then_verify() {
        let mut hasher = Hasher::new(Params::new(19 * 1024, 2, 1, None).unwrap());
        let t = Throttle::new(5, Duration::from_secs(60));
        let hash = |hasher: &mut Hasher| {
            let Verdict::Hashed(phc) = run_task(
                hasher,
                &t,
                Task::Hash {
                    pwd: "secret1".into(),
                },
            ) else {
                panic!("hashing failed");
            };
            phc
        };
        let phc = hash(&mut hasher);
        assert!(phc.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"), "{phc}");
        // A fresh salt every time.
        assert_ne!(hash(&mut hasher), phc);
        assert_eq!(
            verify_with(&mut hasher, &t, &phc, "secret1"),
            Verdict::Valid
        );
        assert_eq!(
            verify_with(&mut hasher, &t, &phc, "wrong"),
            Verdict::Invalid
        );
        assert_eq!(
            verify_with(&mut hasher, &t, &phc, "secret1"),
            Verdict::Valid
        );
    }

    /// Hashes stored by earlier builds (argon2's own `hash_password`, which allocates per
    /// hash) verify with the reused memory, and ours verify with argon2's own verifier.
    #[test]
    fn the_reused_memory_agrees_with_argon2s_own_entry_points() {
        use argon2::password_hash::{PasswordHasher, PasswordVerifier};
        let params = Params::new(19 * 1024, 2, 1, None).unwrap();
        let reference = Argon2::new(Algorithm::Argon2id, Version::V0x13, params.clone());
        let mut hasher = Hasher::new(params);
        let t = Throttle::new(5, Duration::from_secs(60));
        let theirs = reference.hash_password(b"pa55word").unwrap().to_string();
        assert_eq!(
            verify_with(&mut hasher, &t, &theirs, "pa55word"),
            Verdict::Valid
        );
        assert_eq!(
            verify_with(&mut hasher, &t, &theirs, "pa55wore"),
            Verdict::Invalid
        );
        let ours = hasher.hash(b"pa55word").unwrap();
        let parsed = PasswordHash::new(&ours).unwrap();
        assert!(reference.verify_password(b"pa55word", &parsed).is_ok());
        assert!(reference.verify_password(b"pa55wore", &parsed).is_err());
    }

    /// A hash stored with other parameters (more memory than the pool now uses, or fewer
    /// iterations) still verifies; a stored string that names no hash is a failure, not a wrong
    /// password.
    #[test]
    fn stored_parameters_are_the_ones_checked() {
        use argon2::password_hash::PasswordHasher;
        let mut hasher = Hasher::new(Params::new(19 * 1024, 2, 1, None).unwrap());
        let t = Throttle::new(5, Duration::from_secs(60));
        for (m, iters) in [(32 * 1024, 2), (19 * 1024, 3), (8 * 1024, 1)] {
            let other = Argon2::new(
                Algorithm::Argon2id,
                Version::V0x13,
                Params::new(m, iters, 1, None).unwrap(),
            );
            let phc = other.hash_password(b"k3y").unwrap().to_string();
            assert_eq!(
                verify_with(&mut hasher, &t, &phc, "k3y"),
                Verdict::Valid,
                "{phc}"
            );
            assert_eq!(
                verify_with(&mut hasher, &t, &phc, "k3z"),
                Verdict::Invalid,
                "{phc}"
            );
        }
        assert_eq!(
            verify_with(&mut hasher, &t, "$argon2id$v=19$m=19456,t=2,p=1", "k3y"),
            Verdict::Failed
        );
        assert_eq!(
            verify_with(&mut hasher, &t, "not a phc", "k3y"),
            Verdict::Failed
        );
    }
}
