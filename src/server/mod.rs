//! The server: N workers, each with its own `mio::Poll`, SO_REUSEPORT listener and slab of
//! connections; the password pool and the store writer they hand slow work to; and shutdown.

mod listener;
pub mod standalone;
mod worker;

use std::cell::{Cell, RefCell};
use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::Instant;

use crossbeam_channel::Sender;
use mio::{Poll, Waker};

use crate::api::{Api, ApiConfig, Pending};
use crate::auth::{AuthConfig, AuthPool, Verdict};
use crate::config::{Config, ConfigError};
use crate::conn::ReplyTo;
use crate::http::Limits;
use crate::relay::{Effect, KNOWN_UIDS_CACHE, RelayJob, RelayMsg};
use crate::store::{QueueLimits, Store, StoreError, WriteOutcome, Writer, WriterConfig};
use crate::ws::SessionConfig;

/// Context carried through the password pool back to the connection.
pub type AuthCtx = (ReplyTo, Pending);

/// Context carried through the writer back to the worker that asked.
pub enum JobCtx {
    /// An HTTP request's write.
    Http(ReplyTo, Pending),
    /// A relay write (offline queue) of the user owned by this worker.
    Relay(usize, RelayJob),
}

/// Something for a worker from another thread.
pub enum Completion {
    Auth(ReplyTo, Verdict, Pending),
    Write(ReplyTo, WriteOutcome, Pending),
    RelayWrite(RelayJob, WriteOutcome),
    /// A batch from another worker, in that worker's order.
    Relay(Vec<RelayMsg>),
}

/// A worker's inbox: completions plus the waker that interrupts its poll.
#[derive(Clone)]
struct Mailbox {
    tx: Sender<Completion>,
    waker: Arc<Waker>,
}

/// Everything a connection needs from its worker while being driven.
pub struct WorkerCtx {
    pub id: usize,
    pub workers: usize,
    pub config: Arc<Config>,
    pub limits: Limits,
    pub session: SessionConfig,
    pub queue_limits: QueueLimits,
    pub api: Api,
    pub auth: AuthPool<AuthCtx>,
    pub writer: Writer<JobCtx>,
    now: Cell<Instant>,
    draining: Cell<bool>,
    effects: RefCell<Vec<Effect>>,
    registered: RefCell<HashSet<u64>>,
    next_tentative: Cell<u64>,
}

impl WorkerCtx {
    /// The context of worker `id`, with the limits taken from `config`. Built on the worker's
    /// own thread (it is not `Send`).
    pub fn new(
        id: usize,
        config: Arc<Config>,
        api: Api,
        auth: AuthPool<AuthCtx>,
        writer: Writer<JobCtx>,
    ) -> WorkerCtx {
        let limits = Limits {
            max_head: config.max_head_bytes,
            max_body: config.max_body_bytes,
            max_headers: config.max_headers,
        };

        let session = SessionConfig {
            max_frame: config.max_frame,
            read_buffer: config.ws_read_buffer,
            rate_per_sec: config.rate_per_sec,
            rate_burst: config.rate_burst,
            slow_consumer_bytes: config.slow_consumer_bytes,
            linger: config.linger,
            ping_after: config.ping_after,
            idle_timeout: config.ws_idle_timeout,
            release_after: config.ws_release_after,
        };
        let queue_limits = QueueLimits {
            max_frames: config.queue_max_frames,
            max_bytes: config.queue_max_bytes,
        };
        WorkerCtx {
            id,
            workers: config.workers,
            limits,
            session,
            queue_limits,
            api,
            auth,
            writer,
            config,
            now: Cell::new(Instant::now()),
            draining: Cell::new(false),
            effects: RefCell::new(Vec::new()),
            registered: RefCell::new(HashSet::new()),
            next_tentative: Cell::new(0),
        }
    }

    /// Reads the clock once for this loop iteration.
    pub fn tick(&self) {
        self.now.set(Instant::now());
    }

    /// The time at the start of this loop iteration (one clock read per wakeup).
    pub fn now(&self) -> Instant {
        self.now.get()
    }

    /// Shutdown has begun: answers carry `Connection: close`.
    pub fn draining(&self) -> bool {
        self.draining.get()
    }

    /// Queues relay work for the worker (done once the connection is no longer borrowed).
    pub fn effect(&self, e: Effect) {
        self.effects.borrow_mut().push(e);
    }

    /// A fresh id for a tentatively queued frame.
    pub fn next_tentative(&self) -> u64 {
        let id = self.next_tentative.get();
        self.next_tentative.set(id + 1);
        id
    }

    /// Swaps the relay work connections asked for since the last call (in order) into `buf`,
    /// which must be empty; the two buffers trade places, so neither is allocated again once
    /// both have grown to a wakeup's worth.
    pub fn swap_effects(&self, buf: &mut Vec<Effect>) {
        debug_assert!(buf.is_empty());
        std::mem::swap(&mut *self.effects.borrow_mut(), buf);
    }

    /// Whether `uid` is a registered user. Users are never deleted, so positive answers are
    /// cached per worker; negative ones are asked again (the user may register).
    pub fn is_registered(&self, uid: u64) -> bool {
        if self.registered.borrow().contains(&uid) {
            return true;
        }
        let exists = match self.api.store().read().and_then(|r| r.user_exists(uid)) {
            Ok(e) => e,
            Err(e) => {
                log::error!("read failed: {e}");
                false
            }
        };
        if exists {
            let mut known = self.registered.borrow_mut();
            if known.len() >= KNOWN_UIDS_CACHE {
                known.clear();
            }
            known.insert(uid);
        }
        exists
    }
}

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("storage: {0}")]
    Store(#[from] StoreError),
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot start threads: {0}")]
    Io(#[from] std::io::Error),
}

/// Asks a running server to stop; cheap to clone, usable from a signal thread.
#[derive(Clone)]
pub struct Stopper {
    flag: Arc<AtomicBool>,
    wakers: Arc<Vec<Arc<Waker>>>,
}

impl Stopper {
    /// Begins a graceful shutdown: stop accepting, answer what is in flight, then exit.
    pub fn stop(&self) {
        self.flag.store(true, Ordering::SeqCst);
        for w in self.wakers.iter() {
            if let Err(e) = w.wake() {
                log::error!("cannot wake a worker for shutdown: {e}");
            }
        }
    }
}

/// A running server.
pub struct ServerHandle {
    addr: SocketAddr,
    stopper: Stopper,
    workers: Vec<JoinHandle<()>>,
    writer: Option<(Writer<JobCtx>, JoinHandle<()>)>,
    auth: Option<(AuthPool<AuthCtx>, Vec<JoinHandle<()>>)>,
    store: Option<Store>,
}

impl ServerHandle {
    /// The address the workers listen on (the real port when port 0 was asked for).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn stopper(&self) -> Stopper {
        self.stopper.clone()
    }

    /// Waits for the workers to finish (after [`Stopper::stop`]), then lets the writer commit
    /// its last batch and closes the store, so the data directory can be reopened.
    pub fn join(mut self) {
        for w in self.workers.drain(..) {
            if w.join().is_err() {
                log::error!("a worker thread panicked");
            }
        }
        if let Some((pool, threads)) = self.auth.take() {
            drop(pool);
            for t in threads {
                let _ = t.join();
            }
        }
        if let Some((writer, thread)) = self.writer.take() {
            drop(writer);
            if thread.join().is_err() {
                log::error!("the writer thread panicked");
            }
        }
        if let Some(store) = self.store.take() {
            store.close();
        }
        log::info!("server stopped");
    }

    /// Stops and waits.
    pub fn shutdown(self) {
        self.stopper.stop();
        self.join();
    }
}

/// Starts a server with `config`; returns once every worker is listening.
pub fn start(config: Config) -> Result<ServerHandle, ServerError> {
    config.validate()?;
    let config = Arc::new(config);
    let store = Store::open(&config.data_dir, config.map_size)?;

    let mut polls = Vec::with_capacity(config.workers);
    let mut mailboxes = Vec::with_capacity(config.workers);
    let mut inboxes = Vec::with_capacity(config.workers);
    for _ in 0..config.workers {
        let poll = Poll::new()?;
        let waker = Arc::new(Waker::new(poll.registry(), worker::WAKER)?);
        let (tx, rx) = crossbeam_channel::unbounded();
        polls.push(poll);
        mailboxes.push(Mailbox { tx, waker });
        inboxes.push(rx);
    }
    let mailboxes = Arc::new(mailboxes);

    let auth_boxes = mailboxes.clone();
    let (auth, auth_threads) = AuthPool::start(
        AuthConfig {
            threads: config.auth_threads,
            queue: config.auth_queue,
            memory_kib: config.argon2_memory_kib,
            iterations: config.argon2_iterations,
            max_failures: config.login_max_failures,
            window: config.login_window,
        },
        Arc::new(move |verdict, (to, pending): AuthCtx| {
            let mb = &auth_boxes[to.worker];
            if mb.tx.send(Completion::Auth(to, verdict, pending)).is_ok() {
                let _ = mb.waker.wake();
            }
        }),
    )?;

    let write_boxes = mailboxes.clone();
    let mut touched = vec![false; config.workers];
    let (writer, writer_thread) = Writer::start(
        store.clone(),
        WriterConfig {
            queue: config.write_queue,
            max_batch: config.max_write_batch,
        },
        Box::new(move |outcomes: Vec<(WriteOutcome, JobCtx)>| {
            for (outcome, ctx) in outcomes {
                let (worker, done) = match ctx {
                    JobCtx::Http(to, pending) => {
                        (to.worker, Completion::Write(to, outcome, pending))
                    }
                    JobCtx::Relay(worker, job) => (worker, Completion::RelayWrite(job, outcome)),
                };
                if write_boxes[worker].tx.send(done).is_ok() {
                    touched[worker] = true;
                }
            }
            // One wake per worker per batch, not per write.
            for (i, t) in touched.iter_mut().enumerate() {
                if std::mem::take(t) {
                    let _ = write_boxes[i].waker.wake();
                }
            }
        }),
    )?;

    let listeners = listener::bind_reuseport(config.listen, config.workers)?;
    let addr = listeners[0]
        .local_addr()
        .map_err(|source| ServerError::Listen {
            addr: config.listen,
            source,
        })?;

    let stopper = Stopper {
        flag: Arc::new(AtomicBool::new(false)),
        wakers: Arc::new(mailboxes.iter().map(|m| m.waker.clone()).collect()),
    };
    let open_conns = Arc::new(AtomicUsize::new(0));
    let api_config = ApiConfig::from(&*config);
    let shared = worker::Shared {
        stop: stopper.flag.clone(),
        open_conns,
        draining_workers: Arc::new(AtomicUsize::new(0)),
        mailboxes: mailboxes
            .iter()
            .map(|m| (m.tx.clone(), m.waker.clone()))
            .collect(),
    };

    let mut workers = Vec::with_capacity(config.workers);
    for (id, ((poll, inbox), listener)) in polls.into_iter().zip(inboxes).zip(listeners).enumerate()
    {
        let config = config.clone();
        let api = Api::new(store.clone(), api_config);
        let auth = auth.clone();
        let writer = writer.clone();
        let shared = shared.clone();
        // The worker is built on its own thread: its connections hold thread-local reference
        // counts and never leave it.
        workers.push(
            std::thread::Builder::new()
                .name(format!("polyge-worker-{id}"))
                .spawn(move || {
                    let ctx = WorkerCtx::new(id, config, api, auth, writer);
                    match worker::Worker::new(poll, listener, inbox, ctx, shared) {
                        Ok(w) => w.run(),
                        Err(e) => log::error!("worker {id} cannot start: {e}"),
                    }
                })?,
        );
    }
    log::info!(
        "listening on {addr} with {} workers, data in {}",
        config.workers,
        config.data_dir.display()
    );
    Ok(ServerHandle {
        addr,
        stopper,
        workers,
        writer: Some((writer, writer_thread)),
        auth: Some((auth, auth_threads)),
        store: Some(store),
    })
}
