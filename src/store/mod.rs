//! LMDB storage through heed: typed databases, record encoding, reads for the workers and the
//! single group-committing writer thread (see [`writer`]).
//!
//! Reads run on the worker threads in short read transactions (one per request); every write goes
//! through the writer so that concurrent writes share one fsync.

mod records;
pub mod writer;

use std::fs;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::Path;

use heed::byteorder::BigEndian;
use heed::types::{Bytes, Str, U64, Unit};
use heed::{CommitOrAbort, Database, Env, EnvOpenOptions, RoTxn, WithTls};

pub use records::{Profile, TokenRecord, UserRecord};
pub use writer::{
    NewUser, ProfileChanges, QueueLimits, WriteOp, WriteOutcome, Writer, WriterConfig,
};

/// The on-disk layout this build reads and writes.
pub const SCHEMA_VERSION: u32 = 1;
/// Named databases in the environment (LMDB needs the count up front).
const MAX_DBS: u32 = 16;
/// Readers LMDB allows at once: one per worker, writer and helper thread, with room to spare.
const MAX_READERS: u32 = 2048;

type BeU64 = U64<BigEndian>;

/// Storage failures; the text says what the operator can do.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("LMDB: {0}")]
    Lmdb(#[from] heed::Error),
    #[error("data directory {path}: {source}")]
    Dir {
        path: String,
        source: std::io::Error,
    },
    #[error(
        "data directory was written by schema version {found}, this build reads version {SCHEMA_VERSION}; use a matching polyge build"
    )]
    Schema { found: u32 },
    #[error("corrupt record in {0}; restore the data directory from a backup")]
    Corrupt(&'static str),
}

/// The typed databases. `Copy`: every thread keeps its own.
#[derive(Clone, Copy)]
pub(crate) struct Dbs {
    /// uid -> user record.
    pub users: Database<'static, BeU64, Bytes>,
    /// Lowercased user_name -> uid.
    pub names: Database<'static, Str, BeU64>,
    /// Normalized phone -> uid.
    pub phones: Database<'static, Str, BeU64>,
    /// Lowercased email -> uid.
    pub emails: Database<'static, Str, BeU64>,
    /// uid of every teacher, so listing teachers does not scan students.
    pub teachers: Database<'static, BeU64, Unit>,
    /// BLAKE3(token) -> token record. The token itself is never stored.
    pub tokens: Database<'static, Bytes, Bytes>,
    /// uid -> the hashes of that user's tokens, oldest first (32 bytes each).
    pub user_tokens: Database<'static, BeU64, Bytes>,
    /// Schema version and uid counter.
    pub meta: Database<'static, Str, Bytes>,
    /// uid (8 bytes BE) | seq (8 bytes BE) -> a frame waiting for its target, oldest first.
    pub offline: Database<'static, Bytes, Bytes>,
    /// uid -> [`QueueMeta`] of that user's offline queue.
    pub offline_meta: Database<'static, BeU64, Bytes>,
}

/// Bookkeeping of one user's offline queue: frames have sequence numbers `head..next`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QueueMeta {
    pub head: u64,
    pub next: u64,
    pub frames: u64,
    pub bytes: u64,
}

impl QueueMeta {
    pub(crate) fn encode(&self) -> [u8; 32] {
        let mut out = [0u8; 32];
        for (i, v) in [self.head, self.next, self.frames, self.bytes]
            .iter()
            .enumerate()
        {
            out[i * 8..i * 8 + 8].copy_from_slice(&v.to_be_bytes());
        }
        out
    }

    pub(crate) fn decode(b: &[u8]) -> Result<QueueMeta, StoreError> {
        if b.len() != 32 {
            return Err(StoreError::Corrupt("offline_meta"));
        }
        let w = |i: usize| {
            let mut x = [0u8; 8];
            x.copy_from_slice(&b[i * 8..i * 8 + 8]);
            u64::from_be_bytes(x)
        };
        Ok(QueueMeta {
            head: w(0),
            next: w(1),
            frames: w(2),
            bytes: w(3),
        })
    }
}

/// Key of a queued frame: sorts by user, then by sequence.
pub(crate) fn queue_key(uid: u64, seq: u64) -> [u8; 16] {
    let mut k = [0u8; 16];
    k[..8].copy_from_slice(&uid.to_be_bytes());
    k[8..].copy_from_slice(&seq.to_be_bytes());
    k
}

const META_SCHEMA: &str = "schema_version";
const META_NEXT_UID: &str = "next_uid";

/// An open data directory. Cloning is cheap (the environment is reference counted).
#[derive(Clone)]
pub struct Store {
    env: Env,
    dbs: Dbs,
}

/// Which identifier namespace a lookup goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdKind {
    UserName,
    Phone,
    Email,
}

impl Store {
    /// Opens (creating if needed, mode 0700) the data directory.
    ///
    /// One environment per path per process: LMDB forbids opening a path twice, and heed
    /// refuses it; drop every clone of a `Store` (and call [`Store::close`]) before reopening.
    pub fn open(dir: &Path, map_size: usize) -> Result<Store, StoreError> {
        let dir_err = |source| StoreError::Dir {
            path: dir.display().to_string(),
            source,
        };
        if !dir.exists() {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(dir_err)?;
        } else if dir.metadata().map_err(dir_err)?.permissions().mode() & 0o077 != 0 {
            log::warn!(
                "data directory {} is readable by other users; chmod 700 it",
                dir.display()
            );
        }
        // SAFETY: the environment is opened once per path per process (heed checks this and
        // returns EnvAlreadyOpened otherwise), no unsafe flags are set (writes are fsynced), and
        // the data files are not modified by anything but LMDB.
        #[allow(unsafe_code)]
        let env = unsafe {
            EnvOpenOptions::new()
                .map_size(map_size)
                .max_dbs(MAX_DBS)
                .max_readers(MAX_READERS)
                .open(dir)?
        };
        let wtxn = env.write_txn()?;
        let dbs = env
            .create_databases_and_commit(wtxn, |opener, wtxn| -> Result<_, StoreError> {
                let users = opener.create_database(wtxn, Some("users"))?;
                let names = opener.create_database(wtxn, Some("idx_user_name"))?;
                let phones = opener.create_database(wtxn, Some("idx_phone"))?;
                let emails = opener.create_database(wtxn, Some("idx_email"))?;
                let teachers = opener.create_database(wtxn, Some("teachers"))?;
                let tokens = opener.create_database(wtxn, Some("tokens"))?;
                let user_tokens = opener.create_database(wtxn, Some("user_tokens"))?;
                let meta: Database<Str, Bytes> = opener.create_database(wtxn, Some("meta"))?;
                let offline = opener.create_database(wtxn, Some("offline"))?;
                let offline_meta = opener.create_database(wtxn, Some("offline_meta"))?;
                match meta.get(wtxn, META_SCHEMA)? {
                    None => meta.put(wtxn, META_SCHEMA, &SCHEMA_VERSION.to_be_bytes())?,
                    Some(v) => {
                        let found = <[u8; 4]>::try_from(v)
                            .map(u32::from_be_bytes)
                            .map_err(|_| StoreError::Corrupt("meta"))?;
                        if found != SCHEMA_VERSION {
                            return Err(StoreError::Schema { found });
                        }
                    }
                }
                Ok(CommitOrAbort::<_, ()>::Commit((
                    (users, names, phones, emails, teachers),
                    (tokens, user_tokens, meta, offline, offline_meta),
                )))
            })?
            .unwrap_commit();
        let (
            (users, names, phones, emails, teachers),
            (tokens, user_tokens, meta, offline, offline_meta),
        ) = dbs;
        Ok(Store {
            env,
            dbs: Dbs {
                users,
                names,
                phones,
                emails,
                teachers,
                tokens,
                user_tokens,
                meta,
                offline,
                offline_meta,
            },
        })
    }

    /// Closes the environment and waits until LMDB has released it, so the same path can be
    /// opened again in this process. Every other clone must have been dropped already.
    pub fn close(self) {
        let Store { env, dbs: _ } = self;
        env.prepare_for_closing().wait();
    }

    /// A short read transaction. Keep it for one request at most: a long-lived reader stops
    /// LMDB from reusing pages and the file grows.
    pub fn read(&self) -> Result<Reader<'_>, StoreError> {
        Ok(Reader {
            txn: self.env.read_txn()?,
            dbs: &self.dbs,
        })
    }

    pub(crate) fn env(&self) -> &Env {
        &self.env
    }

    pub(crate) fn dbs(&self) -> Dbs {
        self.dbs
    }
}

/// Typed reads inside one read transaction.
pub struct Reader<'s> {
    txn: RoTxn<'s, WithTls>,
    dbs: &'s Dbs,
}

impl Reader<'_> {
    /// The uid registered under a normalized identifier.
    pub fn uid_by(&self, kind: IdKind, key: &str) -> Result<Option<u64>, StoreError> {
        let db = match kind {
            IdKind::UserName => self.dbs.names,
            IdKind::Phone => self.dbs.phones,
            IdKind::Email => self.dbs.emails,
        };
        Ok(db.get(&self.txn, key)?)
    }

    /// Whether a uid belongs to a registered user.
    pub fn user_exists(&self, uid: u64) -> Result<bool, StoreError> {
        Ok(self.dbs.users.get(&self.txn, &uid)?.is_some())
    }

    pub fn user(&self, uid: u64) -> Result<Option<UserRecord>, StoreError> {
        match self.dbs.users.get(&self.txn, &uid)? {
            None => Ok(None),
            Some(bytes) => UserRecord::decode(bytes).map(Some),
        }
    }

    /// The record of a token, by the token's hash, whether live or expired.
    pub fn token(&self, hash: &[u8; 32]) -> Result<Option<TokenRecord>, StoreError> {
        match self.dbs.tokens.get(&self.txn, hash)? {
            None => Ok(None),
            Some(bytes) => TokenRecord::decode(bytes).map(Some),
        }
    }

    /// How many frames wait in a user's offline queue.
    pub fn queued_frames(&self, uid: u64) -> Result<u64, StoreError> {
        match self.dbs.offline_meta.get(&self.txn, &uid)? {
            None => Ok(0),
            Some(b) => Ok(QueueMeta::decode(b)?.frames),
        }
    }

    /// Teachers by uid ascending, skipping `offset`, at most `limit`.
    pub fn teachers(&self, offset: usize, limit: usize) -> Result<Vec<UserRecord>, StoreError> {
        let mut out = Vec::with_capacity(limit.min(256));
        for entry in self.dbs.teachers.iter(&self.txn)?.skip(offset).take(limit) {
            let (uid, ()) = entry?;
            if let Some(user) = self.user(uid)? {
                out.push(user);
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_schema_version_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), 1 << 24).unwrap();
        let mut txn = store.env().write_txn().unwrap();
        store
            .dbs()
            .meta
            .put(&mut txn, META_SCHEMA, &99u32.to_be_bytes())
            .unwrap();
        txn.commit().unwrap();
        store.close();
        match Store::open(dir.path(), 1 << 24) {
            Err(StoreError::Schema { found: 99 }) => {}
            Err(e) => panic!("wrong error: {e}"),
            Ok(_) => panic!("a store with schema 99 was opened"),
        }
        // Closed cleanly: the same path can be opened again in this process.
        assert!(matches!(
            Store::open(dir.path(), 1 << 24),
            Err(StoreError::Schema { .. })
        ));
    }
}
