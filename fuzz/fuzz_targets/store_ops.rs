//! Arbitrary register / token / offline-queue operations, committed in arbitrary batches to a
//! real LMDB store, checked against an in-memory model after every batch.
#![no_main]

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use polyge::store::writer::{TokenPolicy, commit_direct};
use polyge::store::{IdKind, NewUser, QueueLimits, Store, WriteOp, WriteOutcome};

const LIMITS: QueueLimits = QueueLimits {
    max_frames: 6,
    max_bytes: 200,
};
const TTL: u64 = 10;
const GRACE: u64 = 30;
const MAX_TOKENS: usize = 3;

#[derive(Default)]
struct Model {
    names: BTreeMap<String, u64>,
    next_uid: u64,
    /// hash byte -> (uid, client, expires)
    tokens: BTreeMap<u8, (u64, u8, u64)>,
    lists: BTreeMap<u64, Vec<u8>>,
    queues: BTreeMap<u64, (VecDeque<(u64, Vec<u8>)>, u64)>,
}

impl Model {
    fn store_token(&mut self, uid: u64, client: u8, hash: u8, now: u64) -> Vec<[u8; 32]> {
        let list = self.lists.remove(&uid).unwrap_or_default();
        let mut kept = Vec::new();
        for h in list {
            match self.tokens.get(&h) {
                Some(t) if now < t.2 + GRACE => kept.push(h),
                _ => {
                    self.tokens.remove(&h);
                }
            }
        }
        let mut revoked = Vec::new();
        while kept.len() >= MAX_TOKENS {
            let old = kept.remove(0);
            self.tokens.remove(&old);
            revoked.push([old; 32]);
        }
        self.tokens.insert(hash, (uid, client, now + TTL));
        kept.push(hash);
        self.lists.insert(uid, kept);
        revoked
    }

    fn apply(&mut self, op: &Op, now: u64) -> WriteOutcome {
        match *op {
            Op::Register(n) => {
                let name = format!("user{}", n % 8);
                if self.names.contains_key(&name) {
                    return WriteOutcome::Taken(IdKind::UserName);
                }
                self.next_uid += 1;
                self.names.insert(name, self.next_uid);
                WriteOutcome::Registered { uid: self.next_uid }
            }
            Op::Issue { uid, client, hash } => {
                if uid == 0 || uid > self.next_uid {
                    return WriteOutcome::NoSuchUser;
                }
                if self.tokens.contains_key(&hash) {
                    return WriteOutcome::TokenCollision;
                }
                let revoked = self.store_token(uid, client, hash, now);
                WriteOutcome::TokenIssued { uid, revoked }
            }
            Op::Revoke(hash) => match self.tokens.remove(&hash) {
                None => WriteOutcome::Revoked { uid: None },
                Some((uid, _, _)) => {
                    self.lists.entry(uid).or_default().retain(|&h| h != hash);
                    WriteOutcome::Revoked { uid: Some(uid) }
                }
            },
            Op::Refresh { old, client, new } => match self.tokens.get(&old).copied() {
                Some((uid, c, expires)) if c == client && now < expires + GRACE => {
                    if self.tokens.contains_key(&new) {
                        return WriteOutcome::TokenCollision;
                    }
                    self.tokens.remove(&old);
                    self.lists.entry(uid).or_default().retain(|&h| h != old);
                    self.store_token(uid, client, new, now);
                    WriteOutcome::Refreshed { uid }
                }
                _ => WriteOutcome::RefreshDenied,
            },
            Op::Append { uid, len } => {
                let (q, next) = self.queues.entry(uid).or_default();
                let bytes: u64 = q.iter().map(|(_, f)| f.len() as u64).sum();
                if q.len() as u64 >= LIMITS.max_frames || bytes + len as u64 > LIMITS.max_bytes {
                    return WriteOutcome::QueueFull;
                }
                let seq = *next;
                *next += 1;
                q.push_back((seq, vec![len; len as usize]));
                WriteOutcome::Appended { seq }
            }
            Op::Drain {
                uid,
                through,
                max_frames,
            } => {
                let (q, _) = self.queues.entry(uid).or_default();
                if let Some(t) = through {
                    q.retain(|(s, _)| *s > t as u64);
                }
                let mut frames = Vec::new();
                let mut bytes = 0;
                for (s, f) in q.iter() {
                    if frames.len() >= max_frames as usize || bytes >= 64 {
                        break;
                    }
                    bytes += f.len();
                    frames.push((*s, Bytes::from(f.clone())));
                }
                WriteOutcome::Drained { frames }
            }
            Op::Retract { uid, seq } => {
                let (q, _) = self.queues.entry(uid).or_default();
                q.retain(|(s, _)| *s != seq as u64);
                WriteOutcome::Retracted
            }
        }
    }
}

#[derive(Debug)]
enum Op {
    Register(u8),
    Issue {
        uid: u64,
        client: u8,
        hash: u8,
    },
    Revoke(u8),
    Refresh {
        old: u8,
        client: u8,
        new: u8,
    },
    Append {
        uid: u64,
        len: u8,
    },
    Drain {
        uid: u64,
        through: Option<u8>,
        max_frames: u8,
    },
    Retract {
        uid: u64,
        seq: u8,
    },
}

fn decode(b: &[u8]) -> Op {
    let uid = u64::from(b[1] % 5);
    match b[0] % 7 {
        0 => Op::Register(b[1]),
        1 => Op::Issue {
            uid,
            client: b[2] % 2,
            hash: b[3] % 16,
        },
        2 => Op::Revoke(b[1] % 16),
        3 => Op::Refresh {
            old: b[1] % 16,
            client: b[2] % 2,
            new: b[3] % 16,
        },
        4 => Op::Append {
            uid,
            len: b[2] % 60,
        },
        5 => Op::Drain {
            uid,
            through: (b[2] % 2 == 0).then_some(b[3] % 12),
            max_frames: b[3] % 5,
        },
        _ => Op::Retract {
            uid,
            seq: b[2] % 12,
        },
    }
}

fn to_write(op: &Op, now: u64) -> WriteOp {
    let policy = TokenPolicy {
        now_ms: now,
        ttl_ms: TTL,
        grace_ms: GRACE,
        max_per_user: MAX_TOKENS,
    };
    match *op {
        Op::Register(n) => {
            let name = format!("user{}", n % 8);
            WriteOp::Register(NewUser {
                user_name: Some(name.clone()),
                name_key: Some(name),
                phone: None,
                email: None,
                user_type: 1,
                pwd_hash: "$argon2id$fuzz".into(),
                now_ms: now,
            })
        }
        Op::Issue { uid, client, hash } => WriteOp::IssueToken {
            uid,
            client_id: client.to_string(),
            token_hash: [hash; 32],
            policy,
        },
        Op::Revoke(h) => WriteOp::Revoke {
            token_hash: [h; 32],
        },
        Op::Refresh { old, client, new } => WriteOp::Refresh {
            old_hash: [old; 32],
            client_id: client.to_string(),
            new_hash: [new; 32],
            policy,
        },
        Op::Append { uid, len } => WriteOp::Append {
            uid,
            frame: Bytes::from(vec![len; len as usize]),
            limits: LIMITS,
        },
        Op::Drain {
            uid,
            through,
            max_frames,
        } => WriteOp::Drain {
            uid,
            delete_through: through.map(u64::from),
            max_frames: max_frames as usize,
            max_bytes: 64,
        },
        Op::Retract { uid, seq } => WriteOp::Retract {
            uid,
            seq: u64::from(seq),
        },
    }
}

fuzz_target!(|data: &[u8]| {
    static RUN: AtomicU64 = AtomicU64::new(0);
    let dir = std::env::temp_dir().join(format!(
        "polyge-fuzz-store-{}-{}",
        std::process::id(),
        RUN.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    let store = Store::open(&dir, 1 << 24).expect("temp store");
    let mut model = Model::default();
    let mut now = 0;
    // Chunks of 4 bytes are operations; a chunk starting with 0xFF ends a batch.
    let mut batch = Vec::new();
    let flush = |batch: &mut Vec<(Op, u64)>, model: &mut Model| {
        let ops: Vec<WriteOp> = batch.iter().map(|(op, t)| to_write(op, *t)).collect();
        let got = commit_direct(&store, &ops);
        for ((op, t), got) in batch.drain(..).zip(got) {
            let want = model.apply(&op, t);
            assert_eq!(got, want, "{op:?} at {t}");
        }
    };
    for chunk in data.chunks_exact(4) {
        now += 1;
        if chunk[0] == 0xFF {
            flush(&mut batch, &mut model);
        } else {
            batch.push((decode(chunk), now));
        }
    }
    flush(&mut batch, &mut model);
    store.close();
    let _ = std::fs::remove_dir_all(&dir);
});
