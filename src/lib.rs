//! polyge: the server behind a language-learning app where students and teachers meet.
//!
//! An account API over HTTP/1.1 and (see the README) a realtime relay over WebSocket, served by a
//! hand-rolled mio reactor with one worker per core. Requests flow one way:
//! `server` (event loops) -> `conn` (one connection's state machine) -> `http` (parsing and
//! encoding) -> `api` (the endpoints) -> `store` (LMDB), with `auth` (argon2id pool, tokens)
//! beside the API. `api`, `http` and `store` do no socket I/O, so they are tested and
//! benchmarked without a network.
#![deny(unsafe_code)]

pub mod api;
pub mod auth;
pub mod config;
pub mod conn;
pub mod frame;
pub mod http;
pub mod relay;
pub mod server;
pub mod store;
pub mod ws;

pub use config::Config;
pub use server::{ServerHandle, Stopper, start};
