//! The bundle relay of a streaming install. RAUC streams a bundle over HTTP range requests
//! (its NBD server, RAUC ≥ 1.7), but RAUC never talks to the DDI server itself: it reads from
//! this loopback endpoint, and the relay fetches every range RAUC asks for from the server
//! with the agent's own client (certificate or token, proxy, the download rate cap).
//!
//! Invariants (the e2e tests in `tests/tests/ota_relay.rs` check each against the real bridge):
//! - **Only RAUC reads it**: it listens on 127.0.0.1 and answers only under a random 128-bit
//!   path; anything else gets 404 before a byte is fetched.
//! - **A cut costs time, not the install**: a range cut mid-way is fetched again from the
//!   first byte not yet given to RAUC (`Range: bytes=pos-end`), a failed or refused fetch
//!   (transport error, 5xx, 429) is retried with backoff, and RAUC's request simply waits.
//! - **Bounded**: one request of RAUC's waits at most [`RelayLimits::hold`] without a byte
//!   from the server. RAUC retries a failed read 5 times, 1 s apart, and the kernel gives one
//!   NBD read 300 s (RAUC's `NBD_ATTR_TIMEOUT`), so the default 40 s keeps six tries inside
//!   that. After that the request fails and [`RelayStats::failure`] says why.
//! - **Counted**: `fetched` is what came from the server (what crossed the link), `served`
//!   what RAUC got; the engine reports both.
//! - **Final errors are final**: 401/403/404/410/416 from the server fail the request at
//!   once (retrying cannot help), with the status in the reason.

use crate::ddi_client::DdiClient;
use crate::rate_limit::TokenBucket;
use bytes::Bytes;
use futures_util::StreamExt;
use http_body_util::{BodyExt, Empty, StreamBody, combinators::BoxBody};
use hyper::body::Frame;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use thingsly_proto::http_range::{Unsatisfiable, parse_range};
use tokio_util::sync::CancellationToken;

/// Connections RAUC may hold at once (it uses one or two); more are closed unanswered.
const MAX_CONNECTIONS: usize = 8;
/// A request's head must arrive within this (a client that never finishes).
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// What to relay: the artifact's URL on the DDI server and its size (from the deployment).
#[derive(Clone)]
pub struct RelaySource {
    pub ddi: DdiClient,
    pub url: String,
    pub size: u64,
}

#[derive(Clone)]
pub struct RelayLimits {
    /// How long one of RAUC's requests may wait for the server (see the module doc).
    pub hold: Duration,
    /// The download rate cap in bytes per second (0: none), asked before every chunk, so a
    /// cap changed from the server applies at once.
    pub rate: Arc<dyn Fn() -> u64 + Send + Sync>,
}

impl Default for RelayLimits {
    fn default() -> Self {
        Self {
            hold: Duration::from_secs(40),
            rate: Arc::new(|| 0),
        }
    }
}

#[derive(Debug, Default)]
pub struct RelayStats {
    /// Body bytes received from the server.
    pub fetched: AtomicU64,
    /// Body bytes given to RAUC.
    pub served: AtomicU64,
    /// Range requests RAUC made.
    pub requests: AtomicU64,
    /// Fetches from the server that were repeated (cuts, errors).
    pub retries: AtomicU64,
    failure: Mutex<Option<String>>,
}

impl RelayStats {
    /// Why the relay last failed one of RAUC's requests, if it did.
    pub fn failure(&self) -> Option<String> {
        self.failure.lock().ok().and_then(|f| f.clone())
    }

    fn fail(&self, why: String) {
        tracing::warn!(reason = %why, "bundle relay failed a request of RAUC's");
        if let Ok(mut f) = self.failure.lock() {
            *f = Some(why);
        }
    }
}

/// A running relay; stopped (listener and every request) on drop.
pub struct Relay {
    url: String,
    stats: Arc<RelayStats>,
    stop: CancellationToken,
}

impl Relay {
    pub async fn start(source: RelaySource, limits: RelayLimits) -> std::io::Result<Self> {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0)).await?;
        let addr = listener.local_addr()?;
        let token = random_token()?;
        let path = format!("/{token}/bundle.raucb");
        let stats = Arc::new(RelayStats::default());
        let stop = CancellationToken::new();
        let bucket = Mutex::new(TokenBucket::new((limits.rate)(), Instant::now()));
        let shared = Arc::new(Shared {
            source,
            limits,
            bucket,
            stats: stats.clone(),
            path: path.clone(),
            stop: stop.clone(),
        });
        tokio::spawn(serve(listener, shared));
        Ok(Self {
            url: format!("http://{addr}{path}"),
            stats,
            stop,
        })
    }

    /// The URL to give RAUC (secret: it is the only credential).
    pub fn url(&self) -> &str {
        &self.url
    }

    pub fn stats(&self) -> &RelayStats {
        &self.stats
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

struct Shared {
    source: RelaySource,
    limits: RelayLimits,
    /// One cap for all of RAUC's requests together (it reads several ranges in parallel).
    bucket: Mutex<TokenBucket>,
    stats: Arc<RelayStats>,
    path: String,
    stop: CancellationToken,
}

fn random_token() -> std::io::Result<String> {
    let mut b = [0u8; 16];
    rustls::crypto::ring::default_provider()
        .secure_random
        .fill(&mut b)
        .map_err(|_| std::io::Error::other("no secure random numbers"))?;
    Ok(hex::encode(b))
}

async fn serve(listener: tokio::net::TcpListener, shared: Arc<Shared>) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let accepted = tokio::select! {
            _ = shared.stop.cancelled() => return,
            a = listener.accept() => a,
        };
        let Ok((stream, _)) = accepted else {
            // EMFILE and friends: do not spin.
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            continue; // dropped: closed unanswered
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(|req| {
                let shared = shared.clone();
                async move { Ok::<_, std::convert::Infallible>(answer(&shared, &req)) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(hyper_util::rt::TokioIo::new(stream), svc);
            tokio::select! {
                _ = shared.stop.cancelled() => {}
                _ = conn => {}
            }
            drop(permit);
        });
    }
}

type Body = BoxBody<Bytes, std::io::Error>;

fn empty() -> Body {
    Empty::<Bytes>::new()
        .map_err(|never| match never {})
        .boxed()
}

fn status(code: hyper::StatusCode) -> hyper::Response<Body> {
    let mut r = hyper::Response::new(empty());
    *r.status_mut() = code;
    r
}

/// What RAUC gets for one request: checked (path, method, range) before anything is fetched.
fn answer<B>(shared: &Arc<Shared>, req: &hyper::Request<B>) -> hyper::Response<Body> {
    use hyper::{Method, StatusCode, header};
    if req.uri().path() != shared.path {
        return status(StatusCode::NOT_FOUND);
    }
    let head = match *req.method() {
        Method::GET => false,
        Method::HEAD => true,
        _ => return status(StatusCode::METHOD_NOT_ALLOWED),
    };
    let size = shared.source.size;
    let range = req
        .headers()
        .get(header::RANGE)
        .and_then(|v| v.to_str().ok());
    let (start, end, code) = match parse_range(range, size) {
        Ok(Some((a, b))) => (a, b, StatusCode::PARTIAL_CONTENT),
        Ok(None) => (0, size.saturating_sub(1), StatusCode::OK),
        Err(Unsatisfiable) => {
            let mut r = status(StatusCode::RANGE_NOT_SATISFIABLE);
            if let Ok(v) = format!("bytes */{size}").parse() {
                r.headers_mut().insert(header::CONTENT_RANGE, v);
            }
            return r;
        }
    };
    let len = if size == 0 { 0 } else { end - start + 1 };
    let body =
        if head || len == 0 {
            empty()
        } else {
            shared.stats.requests.fetch_add(1, Ordering::Relaxed);
            let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, std::io::Error>>(4);
            let shared = shared.clone();
            tokio::spawn(async move {
                tokio::select! {
                    _ = shared.stop.cancelled() => {}
                    _ = pump(&shared, start, end, tx) => {}
                }
            });
            let frames = futures_util::stream::unfold(rx, |mut rx| async move {
                rx.recv().await.map(|f| (f, rx))
            });
            BodyExt::boxed(StreamBody::new(frames))
        };
    let mut r = hyper::Response::new(body);
    *r.status_mut() = code;
    let h = r.headers_mut();
    h.insert(
        header::ACCEPT_RANGES,
        header::HeaderValue::from_static("bytes"),
    );
    h.insert(header::CONTENT_LENGTH, header::HeaderValue::from(len));
    if code == StatusCode::PARTIAL_CONTENT
        && let Ok(v) = format!("bytes {start}-{end}/{size}").parse()
    {
        h.insert(header::CONTENT_RANGE, v);
    }
    r
}

/// One fetch's outcome besides the bytes it delivered.
enum Fetch {
    /// Worth trying again (cut, transport error, 5xx, 429, a bad 206).
    Retry(String),
    /// Retrying cannot help.
    Final(String),
}

/// Deliver bytes `start..=end` into `tx`, fetching again from where a cut left off.
async fn pump(
    shared: &Shared,
    start: u64,
    end: u64,
    tx: tokio::sync::mpsc::Sender<Result<Frame<Bytes>, std::io::Error>>,
) {
    let stats = &shared.stats;
    let mut backoff =
        thingsly_core::backoff::Backoff::new(Duration::from_millis(500), Duration::from_secs(5));
    let mut pos = start;
    // Since when no byte came from the server (None while bytes flow).
    let mut stalled_since: Option<Instant> = None;
    loop {
        let outcome = fetch(shared, &mut pos, end, &tx, &mut stalled_since).await;
        let why = match outcome {
            Ok(()) => return, // all delivered, or RAUC went away
            Err(Fetch::Final(why)) => {
                stats.fail(why.clone());
                let _ = tx.send(Err(std::io::Error::other(why))).await;
                return;
            }
            Err(Fetch::Retry(why)) => why,
        };
        let since = *stalled_since.get_or_insert_with(Instant::now);
        let waited = since.elapsed();
        if waited >= shared.limits.hold {
            let why = format!(
                "no data from the server for {} s while RAUC waited for bytes {pos}-{end}: {why}",
                waited.as_secs()
            );
            stats.fail(why.clone());
            let _ = tx.send(Err(std::io::Error::other(why))).await;
            return;
        }
        stats.retries.fetch_add(1, Ordering::Relaxed);
        tracing::info!(reason = %why, from = pos, "bundle relay: fetching the range again");
        let pause = backoff
            .next_delay()
            .min(shared.limits.hold.saturating_sub(waited));
        tokio::time::sleep(pause).await;
    }
}

/// One request to the server for `pos..=end`, streaming what arrives to RAUC; `pos` advances
/// by what was delivered. `Ok`: done (or RAUC hung up).
async fn fetch(
    shared: &Shared,
    pos: &mut u64,
    end: u64,
    tx: &tokio::sync::mpsc::Sender<Result<Frame<Bytes>, std::io::Error>>,
    stalled_since: &mut Option<Instant>,
) -> Result<(), Fetch> {
    let src = &shared.source;
    let resp = src
        .ddi
        .request(reqwest::Method::GET, &src.url)
        .header(reqwest::header::RANGE, format!("bytes={}-{end}", *pos))
        .send()
        .await
        .map_err(|e| Fetch::Retry(src.ddi.error_text(&e)))?;
    let code = resp.status().as_u16();
    match code {
        206 => {
            let cr = resp
                .headers()
                .get(reqwest::header::CONTENT_RANGE)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default();
            if !cr.starts_with(&format!("bytes {}-", *pos)) {
                return Err(Fetch::Retry(format!(
                    "the server answered bytes={}-{end} with Content-Range {cr:?}",
                    *pos
                )));
            }
        }
        // A server that ignores Range sends everything: usable only from byte 0.
        200 if *pos == 0 => {}
        200 => {
            return Err(Fetch::Final(
                "the server ignores Range requests; streaming needs them".into(),
            ));
        }
        401 | 403 | 404 | 410 | 416 => {
            return Err(Fetch::Final(format!(
                "the server refused the bundle: HTTP {code}"
            )));
        }
        _ => return Err(Fetch::Retry(format!("HTTP {code} from the server"))),
    }
    let stats = &shared.stats;
    let mut body = resp.bytes_stream();
    while *pos <= end {
        let chunk = match body.next().await {
            Some(Ok(c)) => c,
            Some(Err(e)) => {
                return Err(Fetch::Retry(format!(
                    "connection lost at byte {}: {}",
                    *pos,
                    src.ddi.error_text(&e)
                )));
            }
            None => {
                return Err(Fetch::Retry(format!(
                    "the server's answer ended at byte {}",
                    *pos
                )));
            }
        };
        stats
            .fetched
            .fetch_add(chunk.len() as u64, Ordering::Relaxed);
        *stalled_since = None;
        let wanted = usize::try_from(end + 1 - *pos).unwrap_or(usize::MAX);
        let chunk = chunk.slice(..chunk.len().min(wanted));
        let n = chunk.len() as u64;
        let pause = match shared.bucket.lock() {
            Ok(mut b) => {
                let now = Instant::now();
                b.set_rate((shared.limits.rate)(), now);
                b.take(chunk.len(), now)
            }
            Err(_) => Duration::ZERO,
        };
        if tx.send(Ok(Frame::data(chunk))).await.is_err() {
            return Ok(()); // RAUC closed its request: nothing more to deliver
        }
        stats.served.fetch_add(n, Ordering::Relaxed);
        *pos += n;
        if !pause.is_zero() {
            tokio::time::sleep(pause).await;
        }
    }
    Ok(())
}
