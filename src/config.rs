//! Server configuration: every limit is a named, documented default that a CLI flag can change.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// Address served when no `--listen` is given (the original server's port).
pub const DEFAULT_LISTEN: &str = "127.0.0.1:5918";
/// Data directory used when no `--data-dir` is given.
pub const DEFAULT_DATA_DIR: &str = "./polyge-data";
/// Most connections open at once across all workers; beyond it new ones are accepted and closed.
pub const DEFAULT_MAX_CONNECTIONS: usize = 100_000;
/// Largest request head (request line plus headers) accepted; larger gets 431.
pub const DEFAULT_MAX_HEAD_BYTES: usize = 8 * 1024;
/// Largest request body accepted; larger gets 413.
pub const DEFAULT_MAX_BODY_BYTES: usize = 16 * 1024;
/// Most header lines in one request; more gets 431.
pub const DEFAULT_MAX_HEADERS: usize = 32;
/// A request must be complete this long after its first byte arrived, or it gets 408.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// An idle keep-alive connection is closed after this long without a request.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Unsent response bytes per connection above which the server stops reading more
/// pipelined requests from it until the client reads its answers.
pub const DEFAULT_MAX_PENDING_OUTPUT: usize = 256 * 1024;
/// After an error answer that closes the connection, how long unread input is drained
/// so the kernel does not reset the socket before the client reads the answer.
pub const DEFAULT_LINGER: Duration = Duration::from_secs(2);
/// How long shutdown waits for in-flight requests before closing connections anyway.
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(5);
/// Lifetime of a login token.
pub const DEFAULT_TOKEN_TTL: Duration = Duration::from_secs(7 * 24 * 3600);
/// How long after expiry a token can still be exchanged by `/refresh_token`.
pub const DEFAULT_REFRESH_GRACE: Duration = Duration::from_secs(30 * 24 * 3600);
/// Most tokens kept per user; the oldest is revoked when a login would exceed it.
pub const DEFAULT_MAX_TOKENS_PER_USER: usize = 16;
/// Wrong passwords per account within [`DEFAULT_LOGIN_WINDOW`] before logins are refused.
pub const DEFAULT_LOGIN_MAX_FAILURES: usize = 5;
/// The window over which wrong passwords are counted.
pub const DEFAULT_LOGIN_WINDOW: Duration = Duration::from_secs(15 * 60);
/// Password-hashing threads (argon2id is memory-hard: each job holds 19 MiB while it runs).
pub const DEFAULT_AUTH_THREADS: usize = 2;
/// Password jobs that may wait for a hashing thread; beyond it requests get 503.
pub const DEFAULT_AUTH_QUEUE: usize = 1024;
/// argon2id memory cost in KiB (OWASP minimum: 19 MiB).
pub const DEFAULT_ARGON2_MEMORY_KIB: u32 = 19 * 1024;
/// argon2id iterations (OWASP minimum with 19 MiB: 2).
pub const DEFAULT_ARGON2_ITERATIONS: u32 = 2;
/// Write operations waiting for the writer thread; beyond it requests get 503.
pub const DEFAULT_WRITE_QUEUE: usize = 65_536;
/// Most write operations committed in one LMDB transaction.
pub const DEFAULT_MAX_WRITE_BATCH: usize = 4096;
/// LMDB map size: the most the data file may grow to (the file is sparse).
pub const DEFAULT_MAP_SIZE: usize = 16 << 30;
/// Most teachers in one `/show_teachers` page; `limit` is capped at this.
pub const DEFAULT_MAX_TEACHERS_PAGE: usize = 1000;

/// Largest relay frame (and WebSocket message) accepted; larger closes the connection with 1009.
pub const DEFAULT_MAX_FRAME: usize = 64 * 1024;
/// tungstenite's read buffer per WebSocket connection (its 128 KiB default would cost 12 GiB at
/// 100k connections).
pub const DEFAULT_WS_READ_BUFFER: usize = 4 * 1024;
/// Frames per second one WebSocket connection may send (token bucket rate)...
pub const DEFAULT_RATE_PER_SEC: u32 = 2_000;
/// ...and the bucket's size (burst).
pub const DEFAULT_RATE_BURST: u32 = 4_000;
/// Connections one user may hold at once; a further one closes the oldest with 1008.
pub const DEFAULT_MAX_DEVICES: usize = 8;
/// Frames waiting in one user's offline queue at most (ERROR 8 beyond).
pub const DEFAULT_QUEUE_MAX_FRAMES: u64 = 10_000;
/// Bytes waiting in one user's offline queue at most (ERROR 8 beyond).
pub const DEFAULT_QUEUE_MAX_BYTES: u64 = 64 << 20;
/// Unsent bytes queued for one WebSocket connection before it is treated as a slow consumer:
/// its frames go to the offline queue and it is closed with 1013.
pub const DEFAULT_SLOW_CONSUMER_BYTES: usize = 4 << 20;
/// How long a worker waits for room in a full writer queue to store a frame only the server
/// holds (given back by a closing connection, or held behind a drain) before giving it up
/// with an error; a fresh frame is refused at once instead (its sender can retry).
pub const DEFAULT_SPILL_WAIT: Duration = Duration::from_secs(10);
/// A WebSocket connection silent this long is pinged...
pub const DEFAULT_PING_AFTER: Duration = Duration::from_secs(30);
/// ...and closed when nothing at all arrives for this long.
pub const DEFAULT_WS_IDLE_TIMEOUT: Duration = Duration::from_secs(75);
/// A WebSocket session quiet this long (between messages, nothing unsent) frees its buffers,
/// tungstenite's included, and makes them again when data comes.
pub const DEFAULT_WS_RELEASE_AFTER: Duration = Duration::from_secs(1);

/// Everything the server needs to run. Build it with [`Config::default`] and adjust fields.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    pub workers: usize,
    pub data_dir: PathBuf,
    pub max_connections: usize,
    pub max_head_bytes: usize,
    pub max_body_bytes: usize,
    pub max_headers: usize,
    pub request_timeout: Duration,
    pub idle_timeout: Duration,
    pub max_pending_output: usize,
    pub linger: Duration,
    pub shutdown_grace: Duration,
    pub token_ttl: Duration,
    pub refresh_grace: Duration,
    pub max_tokens_per_user: usize,
    pub login_max_failures: usize,
    pub login_window: Duration,
    pub auth_threads: usize,
    pub auth_queue: usize,
    pub argon2_memory_kib: u32,
    pub argon2_iterations: u32,
    pub write_queue: usize,
    pub max_write_batch: usize,
    pub map_size: usize,
    pub max_teachers_page: usize,
    pub max_frame: usize,
    pub ws_read_buffer: usize,
    pub rate_per_sec: u32,
    pub rate_burst: u32,
    pub max_devices: usize,
    pub queue_max_frames: u64,
    pub queue_max_bytes: u64,
    pub slow_consumer_bytes: usize,
    pub spill_wait: Duration,
    pub ping_after: Duration,
    pub ws_idle_timeout: Duration,
    pub ws_release_after: Duration,
}

/// Number of worker threads by default: one per core.
pub fn default_workers() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: DEFAULT_LISTEN.parse().expect("valid default address"),
            workers: default_workers(),
            data_dir: PathBuf::from(DEFAULT_DATA_DIR),
            max_connections: DEFAULT_MAX_CONNECTIONS,
            max_head_bytes: DEFAULT_MAX_HEAD_BYTES,
            max_body_bytes: DEFAULT_MAX_BODY_BYTES,
            max_headers: DEFAULT_MAX_HEADERS,
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            max_pending_output: DEFAULT_MAX_PENDING_OUTPUT,
            linger: DEFAULT_LINGER,
            shutdown_grace: DEFAULT_SHUTDOWN_GRACE,
            token_ttl: DEFAULT_TOKEN_TTL,
            refresh_grace: DEFAULT_REFRESH_GRACE,
            max_tokens_per_user: DEFAULT_MAX_TOKENS_PER_USER,
            login_max_failures: DEFAULT_LOGIN_MAX_FAILURES,
            login_window: DEFAULT_LOGIN_WINDOW,
            auth_threads: DEFAULT_AUTH_THREADS,
            auth_queue: DEFAULT_AUTH_QUEUE,
            argon2_memory_kib: DEFAULT_ARGON2_MEMORY_KIB,
            argon2_iterations: DEFAULT_ARGON2_ITERATIONS,
            write_queue: DEFAULT_WRITE_QUEUE,
            max_write_batch: DEFAULT_MAX_WRITE_BATCH,
            map_size: DEFAULT_MAP_SIZE,
            max_teachers_page: DEFAULT_MAX_TEACHERS_PAGE,
            max_frame: DEFAULT_MAX_FRAME,
            ws_read_buffer: DEFAULT_WS_READ_BUFFER,
            rate_per_sec: DEFAULT_RATE_PER_SEC,
            rate_burst: DEFAULT_RATE_BURST,
            max_devices: DEFAULT_MAX_DEVICES,
            queue_max_frames: DEFAULT_QUEUE_MAX_FRAMES,
            queue_max_bytes: DEFAULT_QUEUE_MAX_BYTES,
            slow_consumer_bytes: DEFAULT_SLOW_CONSUMER_BYTES,
            spill_wait: DEFAULT_SPILL_WAIT,
            ping_after: DEFAULT_PING_AFTER,
            ws_idle_timeout: DEFAULT_WS_IDLE_TIMEOUT,
            ws_release_after: DEFAULT_WS_RELEASE_AFTER,
        }
    }
}

/// A configuration that cannot run, with the flag to fix.
#[derive(Debug, thiserror::Error)]
#[error("invalid configuration: {0}")]
pub struct ConfigError(pub String);

impl Config {
    /// Checks that the values can work together.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: &str| Err(ConfigError(m.to_string()));
        if self.workers == 0 || self.workers > 1024 {
            return bad("--workers must be between 1 and 1024");
        }
        if self.max_connections == 0 {
            return bad("--max-connections must be at least 1");
        }
        if self.max_head_bytes < 256 {
            return bad("--max-head-bytes must be at least 256");
        }
        if self.max_headers == 0 {
            return bad("--max-headers must be at least 1");
        }
        if self.request_timeout.is_zero() || self.idle_timeout.is_zero() {
            return bad("--request-timeout and --idle-timeout must be positive");
        }
        if self.token_ttl.is_zero() {
            return bad("--token-ttl must be positive");
        }
        if self.max_tokens_per_user == 0 {
            return bad("--max-tokens-per-user must be at least 1");
        }
        if self.login_max_failures == 0 {
            return bad("--login-max-failures must be at least 1");
        }
        if self.auth_threads == 0 || self.auth_queue == 0 {
            return bad("--auth-threads and --auth-queue must be at least 1");
        }
        if self.argon2_memory_kib < DEFAULT_ARGON2_MEMORY_KIB
            || self.argon2_iterations < DEFAULT_ARGON2_ITERATIONS
        {
            return bad("argon2 parameters below OWASP's minimum (19 MiB, 2 iterations)");
        }
        if self.write_queue == 0 || self.max_write_batch == 0 {
            return bad("--write-queue and --max-write-batch must be at least 1");
        }
        if self.map_size < (1 << 20) {
            return bad("--map-size must be at least 1 MiB");
        }
        if self.max_frame < crate::frame::MIN_FRAME || self.max_frame > (16 << 20) {
            return bad("--max-frame must be between 29 bytes and 16 MiB");
        }
        if self.ws_read_buffer < 256 || self.ws_read_buffer > 64 * 1024 {
            return bad("--ws-read-buffer must be between 256 bytes and 64 KiB");
        }
        if self.rate_per_sec == 0 || self.rate_burst == 0 {
            return bad("--rate-per-sec and --rate-burst must be at least 1");
        }
        if self.max_devices == 0 {
            return bad("--max-devices must be at least 1");
        }
        if self.queue_max_frames == 0 || self.queue_max_bytes < self.max_frame as u64 {
            return bad(
                "--queue-max-frames must be at least 1 and --queue-max-bytes at least --max-frame",
            );
        }
        if self.slow_consumer_bytes < self.max_frame {
            return bad("--slow-consumer-bytes must be at least --max-frame");
        }
        if self.ping_after.is_zero() || self.ws_idle_timeout <= self.ping_after {
            return bad("--ws-idle-timeout must be longer than --ping-after");
        }
        if self.max_teachers_page == 0 {
            return bad("--max-teachers-page must be at least 1");
        }
        Ok(())
    }
}
