//! A minimal relay of polyge's frames written the way a Rust team would by default: tokio,
//! tokio-tungstenite with default settings, one task per connection plus one writer task, and a
//! shared map of senders behind a mutex. Live delivery only (no offline queue, no auth: the
//! `token` query parameter is taken as the uid). It exists so relay figures can be quoted as a
//! ratio against it: `polyge-load relay --baseline` drives it.
//!
//! `polyge-baseline [ADDR] [WORKER_THREADS]` (default 127.0.0.1:5919, 1 thread).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use futures_util::{SinkExt, StreamExt};
use polyge::frame::Frame;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc::{UnboundedSender, unbounded_channel};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::handshake::server::{Request, Response};

type Peers = Arc<Mutex<HashMap<u64, Vec<(u64, UnboundedSender<Message>)>>>>;

fn main() {
    let mut args = std::env::args().skip(1);
    let addr = args.next().unwrap_or_else(|| "127.0.0.1:5919".into());
    let threads: usize = args.next().map_or(1, |t| t.parse().expect("thread count"));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async move {
        let listener = TcpListener::bind(&addr).await.expect("bind");
        eprintln!("baseline relay on {addr} with {threads} worker threads");
        let peers: Peers = Arc::default();
        let mut next_id = 0u64;
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            next_id += 1;
            tokio::spawn(serve(stream, peers.clone(), next_id));
        }
    });
}

// The handshake callback's error type is tungstenite's `ErrorResponse`; its size is not ours.
#[allow(clippy::result_large_err)]
async fn serve(stream: TcpStream, peers: Peers, id: u64) {
    let _ = stream.set_nodelay(true);
    let mut uid = 0u64;
    let callback = |req: &Request, resp: Response| {
        uid = req
            .uri()
            .query()
            .and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix("token=")))
            .and_then(|t| t.parse().ok())
            .unwrap_or(0);
        Ok(resp)
    };
    let Ok(ws) = tokio_tungstenite::accept_hdr_async(stream, callback).await else {
        return;
    };
    let (mut sink, mut source) = ws.split();
    let (tx, mut rx) = unbounded_channel::<Message>();
    peers.lock().unwrap().entry(uid).or_default().push((id, tx));
    let writer = tokio::spawn(async move {
        while let Some(msg) = rx.recv().await {
            if sink.send(msg).await.is_err() {
                break;
            }
        }
    });
    while let Some(Ok(msg)) = source.next().await {
        let Message::Binary(bytes) = msg else {
            continue;
        };
        let Ok(frame) = Frame::parse(&bytes) else {
            continue;
        };
        if frame.uid() != uid {
            continue;
        }
        let target = frame.target();
        let map = peers.lock().unwrap();
        if let Some(conns) = map.get(&target) {
            for (_, tx) in conns {
                let _ = tx.send(Message::Binary(bytes.clone()));
            }
        }
    }
    if let Some(conns) = peers.lock().unwrap().get_mut(&uid) {
        conns.retain(|(c, _)| *c != id);
    }
    writer.abort();
}
