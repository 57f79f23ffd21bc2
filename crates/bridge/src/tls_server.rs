//! HTTPS with optional client certificates: rustls verifies any certificate a client sends
//! against our root, and the handlers see it as [`PeerCert`]. Enrollment needs none; renewal
//! requires one.

use crate::state::PeerCert;
use crate::tls_stream::TlsStream;
use anyhow::Context;
use hyper_util::rt::TokioIo;
use hyper_util::rt::TokioTimer;
use hyper_util::service::TowerToHyperService;
use rustls::RootCertStore;
use rustls::server::WebPkiClientVerifier;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::task::Poll;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

/// `client_roots_pem`: `None` never asks for a client certificate (the operator port: a
/// browser asked for one prompts its user, and Chromium aborts WebSocket handshakes outright).
pub fn server_config(
    cert_chain: &Path,
    key: &Path,
    client_roots_pem: Option<&[u8]>,
) -> anyhow::Result<rustls::ServerConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert_chain)
        .with_context(|| cert_chain.display().to_string())?
        .collect::<Result<_, _>>()?;
    let key = PrivateKeyDer::from_pem_file(key).with_context(|| key.display().to_string())?;
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?;
    let mut cfg = match client_roots_pem {
        Some(pem) => {
            let mut roots = RootCertStore::empty();
            for c in CertificateDer::pem_slice_iter(pem) {
                roots.add(c?)?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .allow_unauthenticated()
                .build()?;
            builder
                .with_client_cert_verifier(verifier)
                .with_single_cert(chain, key)?
        }
        None => builder.with_no_client_auth().with_single_cert(chain, key)?,
    };
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(cfg)
}

/// What one listener allows a connection (`[limits]` in bridge.toml).
#[derive(Debug, Clone)]
pub struct Limits {
    pub max_connections: usize,
    pub handshake_timeout: Duration,
    pub header_timeout: Duration,
    pub idle_timeout: Duration,
    pub body_timeout: Duration,
    pub body_min_rate: u64,
}

impl From<&crate::config::LimitsSection> for Limits {
    fn from(l: &crate::config::LimitsSection) -> Self {
        Self {
            max_connections: l.max_connections,
            handshake_timeout: l.handshake_timeout,
            header_timeout: l.header_timeout,
            idle_timeout: l.idle_timeout,
            body_timeout: l.body_timeout,
            body_min_rate: l.body_min_rate,
        }
    }
}

/// The soft `nofile` limit in force, from `/proc/self/limits` (read, not raised: the unit's
/// seccomp filter denies `setrlimit`, and `LimitNOFILE=` is the operator's to set).
pub fn nofile_limit() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/self/limits").ok()?;
    parse_nofile(&text)
}

fn parse_nofile(limits: &str) -> Option<u64> {
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    let soft = line
        .trim_start_matches("Max open files")
        .split_whitespace()
        .next()?;
    if soft == "unlimited" {
        return Some(u64::MAX);
    }
    soft.parse().ok()
}

/// The connection cap each of `listeners` listeners can really hold under a `nofile` limit:
/// the configured one, or less, leaving room for the database, artifacts, the hub, the
/// outgoing connections of the terminal proxy (one per session) and the JWKS fetch.
pub fn effective_cap(configured: usize, nofile: u64, listeners: usize, reserve: u64) -> usize {
    let per_listener = nofile.saturating_sub(reserve) / listeners.max(1) as u64;
    configured
        .min(usize::try_from(per_listener).unwrap_or(usize::MAX))
        .max(1)
}

/// Logs a condition once when it starts and once when it ends, never per occurrence (an
/// attacker holding the listener at its cap must not also fill the disk with log lines).
#[derive(Default)]
struct Episode {
    active: bool,
}

impl Episode {
    /// True the first time after `clear`.
    fn begin(&mut self) -> bool {
        !std::mem::replace(&mut self.active, true)
    }
    /// True when an episode was running.
    fn end(&mut self) -> bool {
        std::mem::replace(&mut self.active, false)
    }
}

/// Accept until `shutdown`; each connection gets its own task, bounded by `limits`.
pub async fn serve(
    name: &'static str,
    listener: TcpListener,
    tls: rustls::ServerConfig,
    app: axum::Router,
    limits: Limits,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let tls = Arc::new(tls);
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    // Shared: a copy per connection would cost each idle one its 80 bytes.
    let limits = Arc::new(limits);
    let open = Arc::new(AtomicUsize::new(0));
    let mut at_cap = Episode::default();
    let mut accept_failing = Episode::default();
    loop {
        let (tcp, remote) = tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // EMFILE and friends: the cap below should keep us from here; if not,
                    // say so once and back off instead of spinning.
                    if accept_failing.begin() {
                        tracing::error!(listener = name, error = %e, "accept failing (nofile limit?); retrying every 50 ms, logged once");
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        if accept_failing.end() {
            tracing::info!(listener = name, "accepting connections again");
        }
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            if at_cap.begin() {
                tracing::warn!(
                    listener = name,
                    max_connections = limits.max_connections,
                    "connection cap reached (limits.max_connections); closing new connections until some end"
                );
            }
            drop(tcp);
            continue;
        };
        if at_cap.end() {
            tracing::info!(listener = name, "below the connection cap again");
        }
        // Interactive traffic (the terminal) must not wait for Nagle.
        let _ = tcp.set_nodelay(true);
        let tls = tls.clone();
        let app = app.clone();
        let limits = limits.clone();
        let open = open.clone();
        open.fetch_add(1, Ordering::Relaxed);
        let release = move || {
            drop(permit);
            // After a burst closes, give the freed heap back to the system (glibc keeps it).
            if open.fetch_sub(1, Ordering::Relaxed) == 1 {
                release_freed_memory();
            }
        };
        // An idle connection costs only what it holds while it waits, so each stage's state
        // is built (and heap-allocated) when its first byte is there: the socket alone until
        // the ClientHello, the TLS session alone (no buffers: `tls_stream`) until the first
        // request. The task that waits for the ClientHello ends there, and the TLS stage
        // gets a task of its own, so that a connection does not keep both.
        tokio::spawn(async move {
            let handshake_by = tokio::time::Instant::now() + limits.handshake_timeout;
            if !client_hello_by(&tcp, remote, handshake_by).await {
                release();
                return;
            }
            tokio::spawn(async move {
                serve_tls(tcp, remote, tls, app, &limits, handshake_by).await;
                release();
            });
        });
    }
}

/// Whether the client starts TLS (sends a byte) by `handshake_by`.
async fn client_hello_by(
    tcp: &tokio::net::TcpStream,
    remote: std::net::SocketAddr,
    handshake_by: tokio::time::Instant,
) -> bool {
    // `peek`, not `readable`: a new socket counts as readable before any byte has come.
    let came = tokio::time::timeout_at(handshake_by, tcp.peek(&mut [0u8; 1]))
        .await
        .is_ok();
    if !came {
        tracing::debug!(%remote, "no ClientHello within limits.handshake_timeout");
    }
    came
}

async fn serve_tls(
    tcp: tokio::net::TcpStream,
    remote: std::net::SocketAddr,
    config: Arc<rustls::ServerConfig>,
    app: axum::Router,
    limits: &Limits,
    handshake_by: tokio::time::Instant,
) {
    let activity = Activity::new();
    let tcp = Watched::new(tcp, activity.clone());
    // Boxed: the handshake's state is gone once it is done, not kept in this future's size.
    let accept = Box::pin(TlsStream::accept(config, tcp));
    let tls = match tokio::time::timeout_at(handshake_by, accept).await {
        Ok(Ok(t)) => t,
        Ok(Err(e)) => {
            tracing::debug!(%remote, error = %e, "TLS handshake failed");
            return;
        }
        Err(_) => {
            tracing::debug!(%remote, "TLS handshake timed out");
            return;
        }
    };
    // Bytes may already be there (a request sent with the client's Finished); only with
    // none is it right to wait for the socket.
    if !tls.has_buffered()
        && tokio::time::timeout(
            limits.header_timeout,
            tls.get_ref().inner.peek(&mut [0u8; 1]),
        )
        .await
        .is_err()
    {
        tracing::debug!(%remote, "no request within limits.header_timeout");
        return;
    }
    Box::pin(serve_http(tls, remote, app, limits, activity)).await;
}

async fn serve_http(
    tls: TlsStream<Watched<tokio::net::TcpStream>>,
    remote: std::net::SocketAddr,
    app: axum::Router,
    limits: &Limits,
    activity: Activity,
) {
    let peer = PeerCert(
        tls.peer_certificates()
            .and_then(|c| c.first())
            .map(|c| c.clone().into_owned()),
    );
    let (grace, min_rate) = (limits.body_timeout, limits.body_min_rate);
    // A body that came too slowly ends the connection, not only its request: the client
    // would otherwise go on dripping the rest of it.
    let late = CancellationToken::new();
    let late_body = late.clone();
    let svc = app.map_request(move |mut req: axum::http::Request<hyper::body::Incoming>| {
        req.extensions_mut().insert(peer.clone());
        let late = late_body.clone();
        req.map(|b| axum::body::Body::new(MinRateBody::new(b, grace, min_rate, late)))
    });
    let svc = TowerToHyperService::new(svc);
    let mut conn = Box::pin(
        hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            // Covers the first request and the wait for each keep-alive one.
            .header_read_timeout(limits.header_timeout)
            .max_buf_size(64 * 1024)
            .serve_connection(TokioIo::new(tls), svc)
            .with_upgrades(), // the terminal proxy's WebSocket
    );
    tokio::select! {
        r = &mut conn => {
            if let Err(e) = r {
                tracing::debug!(%remote, error = %e, "connection ended with error");
            }
        }
        () = activity.idle_for(limits.idle_timeout) => {
            tracing::debug!(%remote, "connection idle (limits.idle_timeout); closed");
        }
        () = late.cancelled() => {
            tracing::debug!(%remote, "request body too slow; connection closed after the answer");
            // Let the 400 out (no keep-alive, nothing more read), but not for long.
            conn.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(Duration::from_secs(1), &mut conn).await;
        }
    }
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)] // one FFI call, no arguments that could be wrong
fn release_freed_memory() {
    // SAFETY: malloc_trim only walks glibc's own heap; no pointers are passed.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn release_freed_memory() {}

/// Whether a body that has delivered `bytes` after `elapsed` is still on time: the grace
/// period plus one second per `min_rate` bytes (Apache's mod_reqtimeout `body=…,MinRate=…`).
fn body_on_time(elapsed: Duration, bytes: u64, grace: Duration, min_rate: u64) -> bool {
    elapsed <= grace + Duration::from_secs_f64(bytes as f64 / min_rate.max(1) as f64)
}

/// A request body held to [`body_on_time`]; checked whenever it is read, and woken at the
/// moment it would be late, so a stalled body fails without waiting for another byte.
struct MinRateBody<B> {
    inner: B,
    /// Cancelled when the body is late: the connection goes too.
    late: CancellationToken,
    start: tokio::time::Instant,
    bytes: u64,
    grace: Duration,
    min_rate: u64,
    alarm: Pin<Box<tokio::time::Sleep>>,
}

impl<B> MinRateBody<B> {
    fn new(inner: B, grace: Duration, min_rate: u64, late: CancellationToken) -> Self {
        let start = tokio::time::Instant::now();
        Self {
            inner,
            late,
            start,
            bytes: 0,
            grace,
            min_rate,
            alarm: Box::pin(tokio::time::sleep_until(start + grace)),
        }
    }

    fn deadline(&self) -> tokio::time::Instant {
        self.start + self.grace + Duration::from_secs_f64(self.bytes as f64 / self.min_rate as f64)
    }
}

impl<B> http_body::Body for MinRateBody<B>
where
    B: http_body::Body<Data = hyper::body::Bytes> + Unpin,
    B::Error: Into<axum::BoxError>,
{
    type Data = hyper::body::Bytes;
    type Error = axum::BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(d) = frame.data_ref() {
                    this.bytes += d.len() as u64;
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e.into()))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => {
                let late =
                    !body_on_time(this.start.elapsed(), this.bytes, this.grace, this.min_rate) || {
                        let deadline = this.deadline();
                        this.alarm.as_mut().reset(deadline);
                        this.alarm.as_mut().poll(cx).is_ready()
                    };
                if late {
                    this.late.cancel();
                    return Poll::Ready(Some(Err(
                        "request body too slow (limits.body_timeout, limits.body_min_rate)".into(),
                    )));
                }
                Poll::Pending
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// When a connection last moved a byte, for the idle timeout.
#[derive(Clone)]
struct Activity {
    start: tokio::time::Instant,
    last_ms: Arc<AtomicU64>,
}

impl Activity {
    fn new() -> Self {
        Self {
            start: tokio::time::Instant::now(),
            last_ms: Arc::new(AtomicU64::new(0)),
        }
    }

    fn touch(&self) {
        let ms = u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_ms.store(ms, Ordering::Relaxed);
    }

    /// Resolves once no byte moved for `limit`; sleeps until the earliest moment that can be.
    async fn idle_for(&self, limit: Duration) {
        loop {
            let last = self.start + Duration::from_millis(self.last_ms.load(Ordering::Relaxed));
            let deadline = last + limit;
            if tokio::time::Instant::now() >= deadline {
                return;
            }
            tokio::time::sleep_until(deadline).await;
        }
    }
}

/// A stream that records its progress in an [`Activity`].
struct Watched<T> {
    inner: T,
    activity: Activity,
}

impl<T> Watched<T> {
    fn new(inner: T, activity: Activity) -> Self {
        Self { inner, activity }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Watched<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(r, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.activity.touch();
        }
        r
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Watched<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, data);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        r
    }

    fn poll_flush(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nofile_from_proc_limits() {
        let t = "Limit                     Soft Limit           Hard Limit           Units\nMax cpu time              unlimited            unlimited            seconds\nMax open files            1024                 524288               files\n";
        assert_eq!(parse_nofile(t), Some(1024));
        assert_eq!(
            parse_nofile("Max open files unlimited unlimited files"),
            Some(u64::MAX)
        );
        assert_eq!(parse_nofile("nothing"), None);
        assert!(nofile_limit().is_some(), "this machine has /proc");
    }

    #[test]
    fn the_cap_fits_the_nofile_limit() {
        assert_eq!(effective_cap(16_384, 65_536, 2, 256), 16_384);
        assert_eq!(effective_cap(16_384, 1_024, 2, 256), 384);
        assert_eq!(effective_cap(100, 1_024, 2, 256), 100);
        assert_eq!(effective_cap(100, 10, 2, 256), 1, "never zero");
    }

    #[test]
    fn a_body_gets_its_grace_plus_a_second_per_min_rate_bytes() {
        let g = Duration::from_secs(20);
        assert!(body_on_time(Duration::from_secs(20), 0, g, 500));
        assert!(!body_on_time(Duration::from_secs(21), 0, g, 500));
        assert!(body_on_time(Duration::from_secs(21), 500, g, 500));
        // a byte every 25 s: late after the grace
        assert!(!body_on_time(Duration::from_secs(50), 2, g, 500));
        // 100 MB at 1 MB/s: on time all along
        assert!(body_on_time(Duration::from_secs(100), 100_000_000, g, 500));
    }

    #[test]
    fn an_episode_is_logged_at_its_start_and_end_only() {
        let mut e = Episode::default();
        assert!(e.begin());
        assert!(!e.begin());
        assert!(!e.begin());
        assert!(e.end());
        assert!(!e.end());
        assert!(e.begin());
    }

    #[tokio::test(start_paused = true)]
    async fn idle_means_no_byte_for_the_whole_limit() {
        let a = Activity::new();
        let limit = Duration::from_secs(30);
        let t0 = tokio::time::Instant::now();
        tokio::time::sleep(Duration::from_secs(20)).await;
        a.touch();
        a.idle_for(limit).await;
        assert_eq!(t0.elapsed(), Duration::from_secs(50));
    }
}
