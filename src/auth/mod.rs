//! Password hashing off the reactor: a small pool of threads running argon2id, and the
//! per-account login throttle. Tokens are in [`token`].

pub mod token;

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use argon2::password_hash::phc::PasswordHash;
use argon2::password_hash::{PasswordHasher, PasswordVerifier};
use argon2::{Algorithm, Argon2, Params, Version};
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
                        let argon = Argon2::new(Algorithm::Argon2id, Version::V0x13, params);
                        while let Ok((task, ctx)) = rx.recv() {
                            sink(run_task(&argon, &throttle, task), ctx);
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

fn run_task(argon: &Argon2<'_>, throttle: &Throttle, task: Task) -> Verdict {
    match task {
        Task::Hash { pwd } => match argon.hash_password(pwd.as_bytes()) {
            Ok(h) => Verdict::Hashed(h.to_string()),
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
            // Parameters come from the stored PHC string, so hashes made with other
            // parameters still verify.
            if argon.verify_password(pwd.as_bytes(), &parsed).is_ok() {
                Verdict::Valid
            } else {
                throttle.record_failure(uid);
                Verdict::Invalid
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

    #[test]
    fn hash_then_verify() {
        let params = Params::new(19 * 1024, 2, 1, None).unwrap();
        let argon = Argon2::new(Algorithm::Argon2id, Version::V0x13, params);
        let t = Throttle::new(5, Duration::from_secs(60));
        let Verdict::Hashed(phc) = run_task(
            &argon,
            &t,
            Task::Hash {
                pwd: "secret1".into(),
            },
        ) else {
            panic!("hashing failed");
        };
        assert!(phc.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"), "{phc}");
        let verify = |pwd: &str| {
            run_task(
                &argon,
                &t,
                Task::Verify {
                    uid: 1,
                    phc: phc.clone(),
                    pwd: pwd.into(),
                },
            )
        };
        assert_eq!(verify("secret1"), Verdict::Valid);
        assert_eq!(verify("wrong"), Verdict::Invalid);
    }
}
