//! The `polyge` binary: flags -> Config, logging, open-file limit, signals, then the server.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use polyge::config::{self, Config};

/// polyge: account API and realtime relay for a language-learning app.
///
/// Logs go to stderr; set RUST_LOG (error, warn, info, debug, trace) to change the level.
/// Durations take units: 500ms, 10s, 15m, 7d.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Cli {
    /// Address to listen on.
    #[arg(long, default_value = config::DEFAULT_LISTEN)]
    listen: SocketAddr,
    /// Worker threads, each with its own event loop and listener [default: number of cores].
    #[arg(long)]
    workers: Option<usize>,
    /// Data directory (created with mode 0700 if missing).
    #[arg(long, default_value = config::DEFAULT_DATA_DIR)]
    data_dir: PathBuf,
    /// Most connections open at once; more are accepted and closed at once.
    #[arg(long, default_value_t = config::DEFAULT_MAX_CONNECTIONS)]
    max_connections: usize,
    /// Largest request head in bytes (431 above it).
    #[arg(long, default_value_t = config::DEFAULT_MAX_HEAD_BYTES)]
    max_head_bytes: usize,
    /// Largest request body in bytes (413 above it).
    #[arg(long, default_value_t = config::DEFAULT_MAX_BODY_BYTES)]
    max_body_bytes: usize,
    /// Most header lines per request, at most 64 (431 above it).
    #[arg(long, default_value_t = config::DEFAULT_MAX_HEADERS)]
    max_headers: usize,
    /// Time to receive a whole request after its first byte (408 after it).
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    request_timeout: Duration,
    /// Idle keep-alive connections are closed after this long.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    idle_timeout: Duration,
    /// Unsent answer bytes per connection before it stops reading pipelined requests.
    #[arg(long, default_value_t = config::DEFAULT_MAX_PENDING_OUTPUT)]
    max_pending_output: usize,
    /// How long unread input is drained after an answer that closes the connection.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    linger: Duration,
    /// How long shutdown waits for in-flight requests.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    shutdown_grace: Duration,
    /// Lifetime of a login token.
    #[arg(long, default_value = "7d", value_parser = humantime::parse_duration)]
    token_ttl: Duration,
    /// How long after expiry a token can still be refreshed.
    #[arg(long, default_value = "30d", value_parser = humantime::parse_duration)]
    refresh_grace: Duration,
    /// Most tokens per user; the oldest is revoked beyond it.
    #[arg(long, default_value_t = config::DEFAULT_MAX_TOKENS_PER_USER)]
    max_tokens_per_user: usize,
    /// Wrong passwords per account within --login-window before logins are refused.
    #[arg(long, default_value_t = config::DEFAULT_LOGIN_MAX_FAILURES)]
    login_max_failures: usize,
    /// Window for counting wrong passwords.
    #[arg(long, default_value = "15m", value_parser = humantime::parse_duration)]
    login_window: Duration,
    /// Password-hashing threads.
    #[arg(long, default_value_t = config::DEFAULT_AUTH_THREADS)]
    auth_threads: usize,
    /// Password jobs that may wait for a thread (503 beyond).
    #[arg(long, default_value_t = config::DEFAULT_AUTH_QUEUE)]
    auth_queue: usize,
    /// argon2id memory cost in KiB (at least 19456).
    #[arg(long, default_value_t = config::DEFAULT_ARGON2_MEMORY_KIB)]
    argon2_memory_kib: u32,
    /// argon2id iterations (at least 2).
    #[arg(long, default_value_t = config::DEFAULT_ARGON2_ITERATIONS)]
    argon2_iterations: u32,
    /// Writes that may wait for the writer thread (503 beyond).
    #[arg(long, default_value_t = config::DEFAULT_WRITE_QUEUE)]
    write_queue: usize,
    /// Most writes committed in one transaction.
    #[arg(long, default_value_t = config::DEFAULT_MAX_WRITE_BATCH)]
    max_write_batch: usize,
    /// LMDB map size in bytes: the most the data file can grow to.
    #[arg(long, default_value_t = config::DEFAULT_MAP_SIZE)]
    map_size: usize,
    /// Most teachers in one /show_teachers page.
    #[arg(long, default_value_t = config::DEFAULT_MAX_TEACHERS_PAGE)]
    max_teachers_page: usize,
    /// Largest relay frame in bytes (a larger WebSocket message closes with 1009).
    #[arg(long, default_value_t = config::DEFAULT_MAX_FRAME)]
    max_frame: usize,
    /// Read buffer per WebSocket connection in bytes.
    #[arg(long, default_value_t = config::DEFAULT_WS_READ_BUFFER)]
    ws_read_buffer: usize,
    /// Frames per second one WebSocket connection may send (ERROR 7 beyond).
    #[arg(long, default_value_t = config::DEFAULT_RATE_PER_SEC)]
    rate_per_sec: u32,
    /// Burst of frames allowed above the rate.
    #[arg(long, default_value_t = config::DEFAULT_RATE_BURST)]
    rate_burst: u32,
    /// WebSocket connections per user; a further one closes the oldest with 1008.
    #[arg(long, default_value_t = config::DEFAULT_MAX_DEVICES)]
    max_devices: usize,
    /// Frames in one user's offline queue (ERROR 8 beyond).
    #[arg(long, default_value_t = config::DEFAULT_QUEUE_MAX_FRAMES)]
    queue_max_frames: u64,
    /// Bytes in one user's offline queue (ERROR 8 beyond).
    #[arg(long, default_value_t = config::DEFAULT_QUEUE_MAX_BYTES)]
    queue_max_bytes: u64,
    /// Unsent bytes for one WebSocket connection before it is closed with 1013 and its frames
    /// stored.
    #[arg(long, default_value_t = config::DEFAULT_SLOW_CONSUMER_BYTES)]
    slow_consumer_bytes: usize,
    /// Wait this long for room in a full writer queue to store a frame only the server holds.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    spill_wait: Duration,
    /// Ping a WebSocket connection silent this long.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    ping_after: Duration,
    /// Close a WebSocket connection from which nothing arrived for this long.
    #[arg(long, default_value = "75s", value_parser = humantime::parse_duration)]
    ws_idle_timeout: Duration,
    /// Free a quiet WebSocket session's buffers after this long (made again when data comes).
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    ws_release_after: Duration,
}

impl Cli {
    fn into_config(self) -> Config {
        Config {
            listen: self.listen,
            workers: self.workers.unwrap_or_else(config::default_workers),
            data_dir: self.data_dir,
            max_connections: self.max_connections,
            max_head_bytes: self.max_head_bytes,
            max_body_bytes: self.max_body_bytes,
            max_headers: self.max_headers,
            request_timeout: self.request_timeout,
            idle_timeout: self.idle_timeout,
            max_pending_output: self.max_pending_output,
            linger: self.linger,
            shutdown_grace: self.shutdown_grace,
            token_ttl: self.token_ttl,
            refresh_grace: self.refresh_grace,
            max_tokens_per_user: self.max_tokens_per_user,
            login_max_failures: self.login_max_failures,
            login_window: self.login_window,
            auth_threads: self.auth_threads,
            auth_queue: self.auth_queue,
            argon2_memory_kib: self.argon2_memory_kib,
            argon2_iterations: self.argon2_iterations,
            write_queue: self.write_queue,
            max_write_batch: self.max_write_batch,
            map_size: self.map_size,
            max_teachers_page: self.max_teachers_page,
            max_frame: self.max_frame,
            ws_read_buffer: self.ws_read_buffer,
            rate_per_sec: self.rate_per_sec,
            rate_burst: self.rate_burst,
            max_devices: self.max_devices,
            queue_max_frames: self.queue_max_frames,
            queue_max_bytes: self.queue_max_bytes,
            slow_consumer_bytes: self.slow_consumer_bytes,
            spill_wait: self.spill_wait,
            ping_after: self.ping_after,
            ws_idle_timeout: self.ws_idle_timeout,
            ws_release_after: self.ws_release_after,
        }
    }
}

/// File descriptors kept back for listeners, LMDB, logs and wakers.
const RESERVED_FDS: u64 = 64;

fn raise_fd_limit(max_connections: usize) {
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) => {
            let capacity = limit.saturating_sub(RESERVED_FDS);
            log::info!("open-file limit {limit}: room for about {capacity} connections");
            if (max_connections as u64) > capacity {
                log::warn!(
                    "--max-connections {max_connections} exceeds what the open-file limit allows; \
                     connections beyond about {capacity} will fail to be accepted"
                );
            }
        }
        Err(e) => log::warn!("cannot raise the open-file limit: {e}"),
    }
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let config = Cli::parse().into_config();
    raise_fd_limit(config.max_connections);
    let server = match polyge::start(config) {
        Ok(s) => s,
        Err(e) => {
            log::error!("{e}");
            return ExitCode::FAILURE;
        }
    };
    let stopper = server.stopper();
    let mut signals = match signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGTERM,
    ]) {
        Ok(s) => s,
        Err(e) => {
            log::error!("cannot install signal handlers: {e}");
            server.shutdown();
            return ExitCode::FAILURE;
        }
    };
    std::thread::spawn(move || {
        let mut signals = signals.forever();
        if let Some(sig) = signals.next() {
            log::info!("signal {sig}: shutting down (send it again to exit at once)");
            stopper.stop();
        }
        if signals.next().is_some() {
            log::warn!("second signal: exiting without waiting");
            std::process::exit(1);
        }
    });
    server.join();
    ExitCode::SUCCESS
}
