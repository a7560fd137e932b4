//! A worker's relay without a reactor: WebSocket sessions over in-memory streams, handed frames
//! by the same relay code the workers run. The relay bench and the `ws_session` fuzz target
//! drive it; the server itself does not use it.

use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;

use bytes::Bytes;

use super::{AuthCtx, JobCtx, ServerError, WorkerCtx};
use crate::api::{Api, ApiConfig};
use crate::auth::{AuthConfig, AuthPool};
use crate::config::Config;
use crate::conn::{Next, ReplyTo};
use crate::relay::{self, Devices, Effect, Mode, Relay, Routed};
use crate::store::writer::commit_direct;
use crate::store::{NewUser, Store, WriteOp, WriteOutcome, Writer, WriterConfig};
use crate::ws::{MemStream, Out, WsSession};

/// The store and the threads a [`WorkerCtx`] needs (writes and password checks are accepted
/// and their answers dropped: nothing here waits for them).
pub struct Standalone {
    pub config: Arc<Config>,
    pub store: Store,
    auth: Option<(AuthPool<AuthCtx>, Vec<JoinHandle<()>>)>,
    writer: Option<(Writer<JobCtx>, JoinHandle<()>)>,
}

impl Standalone {
    /// Opens the store in `config.data_dir` (one per path per process, as for the server).
    pub fn open(config: Config) -> Result<Standalone, ServerError> {
        config.validate()?;
        let store = Store::open(&config.data_dir, config.map_size)?;
        let auth = AuthPool::start(
            AuthConfig {
                threads: 1,
                queue: config.auth_queue,
                memory_kib: config.argon2_memory_kib,
                iterations: config.argon2_iterations,
                max_failures: config.login_max_failures,
                window: config.login_window,
            },
            Arc::new(|_, _| {}),
        )?;
        let writer = Writer::start(
            store.clone(),
            WriterConfig {
                queue: config.write_queue,
                max_batch: config.max_write_batch,
            },
            Box::new(|_| {}),
        )?;
        Ok(Standalone {
            config: Arc::new(config),
            store,
            auth: Some(auth),
            writer: Some(writer),
        })
    }

    /// Registers a user directly in the store; returns its uid.
    pub fn register(&self, user_name: &str) -> Option<u64> {
        let op = WriteOp::Register(NewUser {
            user_name: Some(user_name.into()),
            name_key: Some(user_name.to_lowercase()),
            phone: None,
            email: None,
            user_type: 1,
            pwd_hash: String::new(),
            now_ms: 0,
        });
        match commit_direct(&self.store, &[op]).pop() {
            Some(WriteOutcome::Registered { uid }) => Some(uid),
            _ => None,
        }
    }

    /// The context of worker `id` (of `config.workers`), for the calling thread.
    pub fn ctx(&self, id: usize) -> WorkerCtx {
        let (auth, writer) = match (&self.auth, &self.writer) {
            (Some((a, _)), Some((w, _))) => (a.clone(), w.clone()),
            _ => unreachable!("present until drop"),
        };
        WorkerCtx::new(
            id,
            self.config.clone(),
            Api::new(self.store.clone(), ApiConfig::from(&*self.config)),
            auth,
            writer,
        )
    }
}

impl Drop for Standalone {
    fn drop(&mut self) {
        if let Some((pool, threads)) = self.auth.take() {
            drop(pool);
            threads.into_iter().for_each(|t| drop(t.join()));
        }
        if let Some((writer, thread)) = self.writer.take() {
            drop(writer);
            drop(thread.join());
        }
    }
}

/// One session and its in-memory stream.
pub struct Device {
    pub me: ReplyTo,
    pub session: WsSession,
    pub stream: MemStream,
}

/// The sessions of one standalone worker, as the relay's devices.
pub struct Sessions {
    pub devices: Vec<Device>,
    scratch: Vec<u8>,
}

impl Default for Sessions {
    fn default() -> Sessions {
        Sessions {
            devices: Vec::new(),
            scratch: vec![0; 64 * 1024],
        }
    }
}

impl Sessions {
    /// Opens a session for `uid` (upgraded, with `leftover` already received) and joins it to
    /// the relay as a live device.
    pub fn connect(
        &mut self,
        relay: &mut Relay,
        ctx: &WorkerCtx,
        uid: u64,
        acks: bool,
        leftover: Vec<u8>,
    ) -> usize {
        let key = self.devices.len();
        let me = ReplyTo {
            worker: ctx.id,
            key,
            generation: 0,
        };
        let session = WsSession::new(leftover, uid, [0; 32], acks, ctx.session, Instant::now());
        self.devices.push(Device {
            me,
            session,
            stream: MemStream::default(),
        });
        let user = relay.user(uid);
        user.conns.push(me);
        user.mode = Mode::Live;
        key
    }

    /// Drives one session over its stream, as a readiness event would.
    pub fn drive(&mut self, key: usize, ctx: &WorkerCtx) -> Next {
        let d = &mut self.devices[key];
        d.session.drive(&mut d.stream, ctx, d.me, &mut self.scratch)
    }
}

impl Devices for Sessions {
    fn accepts(&self, to: ReplyTo) -> bool {
        self.devices
            .get(to.key)
            .is_some_and(|d| d.me == to && d.session.accepting())
    }

    fn push(&mut self, to: ReplyTo, out: Out, ctx: &WorkerCtx) {
        if let Some(d) = self.devices.get_mut(to.key) {
            d.session.push(out, ctx);
        }
    }
}

/// What [`settle`] did with the effects.
#[derive(Default)]
pub struct Settled {
    /// Frames that would go to the offline queue, in order.
    pub spilled: Vec<Bytes>,
    /// Sessions that got output.
    pub dirty: Vec<usize>,
    /// The effects being run (kept for its capacity).
    effects: Vec<Effect>,
}

/// Runs the effects the sessions asked for, as a worker's loop does: frames for this worker's
/// users go to their devices, frames for others to `relay.outbox`, server frames to their
/// session.
pub fn settle(ctx: &WorkerCtx, relay: &mut Relay, sessions: &mut Sessions, out: &mut Settled) {
    let mut effects = std::mem::take(&mut out.effects);
    loop {
        ctx.swap_effects(&mut effects);
        if effects.is_empty() {
            break;
        }
        for e in effects.drain(..) {
            match e {
                Effect::Deliver {
                    target,
                    frame,
                    sender,
                } => {
                    if let Some((frame, sender)) = relay.route(ctx.id, target, frame, sender) {
                        deliver(ctx, relay, sessions, out, target, frame, Some(sender));
                    }
                }
                Effect::ServerFrame { to, frame } => {
                    if sessions.accepts(to) {
                        sessions.push(to, Out::Server(frame), ctx);
                        out.dirty.push(to.key);
                    }
                }
                Effect::Spill { frame, .. } => out.spilled.push(frame),
                Effect::Left { uid, conn } => {
                    relay.user(uid).conns.retain(|c| *c != conn);
                }
                Effect::Retract { .. } | Effect::Keep { .. } | Effect::DrainProgress { .. } => {}
            }
        }
    }
    out.effects = effects;
}

/// A frame for `target` on its owner: [`Relay::deliver`], as the worker calls it.
pub fn deliver(
    ctx: &WorkerCtx,
    relay: &mut Relay,
    sessions: &mut Sessions,
    out: &mut Settled,
    target: u64,
    frame: Bytes,
    sender: Option<relay::SenderRef>,
) {
    if let Routed::Append { frame, .. } = relay.deliver(sessions, ctx, target, frame, sender) {
        out.spilled.push(frame);
    }
    if let Some(u) = relay.users.get(&target) {
        out.dirty.extend(u.conns.iter().map(|c| c.key));
    }
}
