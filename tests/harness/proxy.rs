//! A loopback TCP proxy that can misbehave like a real network: cut a connection once after
//! some bytes (a dropped link mid-download) or throttle the server-to-client direction (a slow
//! link). TLS passes through untouched, so the client still verifies the real server.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

#[derive(Default)]
struct Knobs {
    /// Cut the next connection that has sent this many bytes to the client (0: off). One-shot.
    cut_after: AtomicU64,
    /// Bytes per second towards the client (0: unlimited).
    rate: AtomicU64,
    /// Bytes sent towards clients, all connections.
    down_bytes: AtomicU64,
    cuts: AtomicU64,
    stop: AtomicBool,
}

pub struct TcpProxy {
    pub port: u16,
    knobs: Arc<Knobs>,
}

impl TcpProxy {
    /// Forward `127.0.0.1:<port>` to `127.0.0.1:<target>`.
    pub fn start(target: u16) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap_or_else(|e| panic!("proxy: {e}"));
        let port = listener.local_addr().map(|a| a.port()).unwrap_or_default();
        let knobs = Arc::new(Knobs::default());
        let k = knobs.clone();
        std::thread::spawn(move || {
            for client in listener.incoming() {
                if k.stop.load(Ordering::Relaxed) {
                    return;
                }
                let Ok(client) = client else { continue };
                let Ok(server) = TcpStream::connect(("127.0.0.1", target)) else {
                    continue;
                };
                let k = k.clone();
                std::thread::spawn(move || relay(client, server, k));
            }
        });
        Self { port, knobs }
    }

    pub fn cut_once_after(&self, bytes: u64) {
        self.knobs.cut_after.store(bytes, Ordering::SeqCst);
    }

    pub fn throttle(&self, bytes_per_sec: u64) {
        self.knobs.rate.store(bytes_per_sec, Ordering::SeqCst);
    }

    pub fn down_bytes(&self) -> u64 {
        self.knobs.down_bytes.load(Ordering::SeqCst)
    }

    pub fn cuts(&self) -> u64 {
        self.knobs.cuts.load(Ordering::SeqCst)
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        self.knobs.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop so it sees the flag.
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}

fn relay(client: TcpStream, server: TcpStream, k: Arc<Knobs>) {
    let (Ok(mut c_read), Ok(mut s_write)) = (client.try_clone(), server.try_clone()) else {
        return;
    };
    // Client to server: plain copy.
    std::thread::spawn(move || {
        let _ = std::io::copy(&mut c_read, &mut s_write);
        let _ = s_write.shutdown(Shutdown::Write);
    });
    // Server to client: counted, throttled, maybe cut.
    let (mut s_read, mut c_write) = (server, client);
    let mut sent = 0u64;
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match s_read.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let cut = k.cut_after.load(Ordering::SeqCst);
        if cut > 0 && sent + n as u64 > cut {
            k.cut_after.store(0, Ordering::SeqCst);
            k.cuts.fetch_add(1, Ordering::SeqCst);
            let _ = c_write.shutdown(Shutdown::Both);
            let _ = s_read.shutdown(Shutdown::Both);
            return;
        }
        if c_write.write_all(&buf[..n]).is_err() {
            break;
        }
        sent += n as u64;
        k.down_bytes.fetch_add(n as u64, Ordering::SeqCst);
        let rate = k.rate.load(Ordering::Relaxed);
        if rate > 0 {
            std::thread::sleep(Duration::from_secs_f64(n as f64 / rate as f64));
        }
    }
    let _ = c_write.shutdown(Shutdown::Write);
}
