//! A TLS server stream on rustls' unbuffered API, so that an idle connection holds no buffer.
//!
//! tokio-rustls drives rustls' buffered `ServerConnection`, which keeps a 4 KiB receive buffer
//! for every connection from its first read until it closes: 40 MB for 10,000 idle devices, the
//! half of what such a connection costs. Here the buffers belong to the stream and exist only
//! while they hold bytes: the receive buffer is taken for a read and given back when its
//! records are processed, the send buffer when it has been written out, the plaintext one
//! when the reader has taken it. `thingsly-bench connections` measures the difference.
//!
//! The state machine is rustls' (`rustls::unbuffered`): this file only moves bytes between it
//! and the socket. The order rules it relies on: TLS bytes queued by the state machine are
//! written before anything queued after them, and nothing is read from the socket while
//! decrypted data waits for the reader (so what one connection buffers stays bounded).

use rustls::server::UnbufferedServerConnection;
use rustls::unbuffered::{
    AppDataRecord, ConnectionState, EncodeError, EncryptError, InsufficientSizeError,
    UnbufferedStatus,
};
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// One socket read: a whole TLS record (16 KiB of payload plus its header and AEAD overhead).
const READ_SIZE: usize = 16 * 1024 + 512;
/// Unprocessed TLS bytes one connection may hold: a handshake message may span records, and
/// rustls allows such a message up to 64 KiB (a client certificate chain).
const MAX_INCOMING: usize = 64 * 1024 + 2 * READ_SIZE;
/// Plaintext encrypted per `poll_write`: four full records, so that one write's TLS output
/// stays bounded.
const MAX_WRITE_CHUNK: usize = 4 * 16 * 1024;

/// What the state machine needs next, once it has done what it could without I/O.
#[derive(Debug, PartialEq, Eq)]
enum Next {
    /// The handshake waits for more bytes from the peer.
    Input,
    /// Handshake done; the number is how much of the offered plaintext was encrypted.
    Traffic(usize),
    /// Both sides sent close_notify.
    Closed,
}

pub struct TlsStream<S> {
    io: S,
    conn: UnbufferedServerConnection,
    /// TLS bytes read and not yet processed.
    incoming: Vec<u8>,
    /// Decrypted bytes the reader has not taken yet, from `plaintext_read` on.
    plaintext: Vec<u8>,
    plaintext_read: usize,
    /// TLS bytes to write, from `outgoing_sent` on.
    outgoing: Vec<u8>,
    outgoing_sent: usize,
    /// The peer's close_notify came, or its socket ended: reads return end of stream.
    read_closed: bool,
    /// Our close_notify is queued.
    close_sent: bool,
    /// The connection failed (rustls must not see its input again): every call says so.
    failed: Option<io::ErrorKind>,
}

impl<S: AsyncRead + AsyncWrite + Unpin> TlsStream<S> {
    /// Runs the handshake on `io`. On failure rustls' alert is sent, as far as the socket
    /// takes it, before the error is returned.
    pub async fn accept(config: Arc<rustls::ServerConfig>, io: S) -> io::Result<Self> {
        let conn = UnbufferedServerConnection::new(config).map_err(invalid)?;
        let mut s = Self {
            io,
            conn,
            incoming: Vec::new(),
            plaintext: Vec::new(),
            plaintext_read: 0,
            outgoing: Vec::new(),
            outgoing_sent: 0,
            read_closed: false,
            close_sent: false,
            failed: None,
        };
        match std::future::poll_fn(|cx| s.poll_handshake(cx)).await {
            Ok(()) => Ok(s),
            Err(e) => {
                s.queue_alert();
                let _ = std::future::poll_fn(|cx| s.poll_send(cx)).await;
                Err(e)
            }
        }
    }

    pub fn get_ref(&self) -> &S {
        &self.io
    }

    /// The certificates the client presented (verified against the listener's roots).
    pub fn peer_certificates(&self) -> Option<&[rustls_pki_types::CertificateDer<'static>]> {
        self.conn.peer_certificates()
    }

    /// Whether the stream holds bytes already, so that waiting on the socket would be wrong.
    pub fn has_buffered(&self) -> bool {
        !self.incoming.is_empty() || self.plaintext_waiting() || self.sending()
    }

    fn plaintext_waiting(&self) -> bool {
        self.plaintext_read < self.plaintext.len()
    }

    fn sending(&self) -> bool {
        self.outgoing_sent < self.outgoing.len()
    }

    fn poll_handshake(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        loop {
            match self.advance(None, false)? {
                Next::Input => {
                    ready!(self.poll_send(cx))?;
                    if ready!(self.poll_fill(cx))? == 0 {
                        return Poll::Ready(Err(io::ErrorKind::UnexpectedEof.into()));
                    }
                }
                // The session tickets rustls sends after the client's Finished go out now.
                Next::Traffic(_) => return self.poll_send(cx),
                Next::Closed => return Poll::Ready(Err(io::ErrorKind::UnexpectedEof.into())),
            }
        }
    }

    /// Lets the state machine process what `incoming` holds until it needs I/O. Offered
    /// `plaintext` is encrypted (up to [`MAX_WRITE_CHUNK`]) once the handshake is done;
    /// `close` queues our close_notify then.
    fn advance(&mut self, plaintext: Option<&[u8]>, close: bool) -> io::Result<Next> {
        if let Some(kind) = self.failed {
            return Err(io::Error::new(kind, "TLS connection failed earlier"));
        }
        let r = self.advance_unchecked(plaintext, close);
        if let Err(e) = &r {
            self.failed = Some(e.kind());
        }
        r
    }

    fn advance_unchecked(&mut self, plaintext: Option<&[u8]>, close: bool) -> io::Result<Next> {
        loop {
            let UnbufferedStatus { mut discard, state } =
                self.conn.process_tls_records(&mut self.incoming);
            let mut next = None;
            let outcome = match state {
                Err(e) => Err(invalid(e)),
                Ok(ConnectionState::ReadTraffic(mut records)) => {
                    let mut r = Ok(());
                    while let Some(record) = records.next_record() {
                        match record {
                            Ok(AppDataRecord {
                                discard: used,
                                payload,
                            }) => {
                                discard += used;
                                self.plaintext.extend_from_slice(payload);
                            }
                            Err(e) => {
                                r = Err(invalid(e));
                                break;
                            }
                        }
                    }
                    r
                }
                Ok(ConnectionState::PeerClosed) => {
                    self.read_closed = true;
                    Ok(())
                }
                Ok(ConnectionState::Closed) => {
                    self.read_closed = true;
                    next = Some(Next::Closed);
                    Ok(())
                }
                Ok(ConnectionState::EncodeTlsData(mut record)) => {
                    append_with(&mut self.outgoing, 1024, |buf| encoded(record.encode(buf)))
                }
                // The bytes wait in `outgoing`, which is written out before anything queued
                // later and before the next wait for input.
                Ok(ConnectionState::TransmitTlsData(t)) => {
                    t.done();
                    Ok(())
                }
                Ok(ConnectionState::BlockedHandshake) => {
                    next = Some(Next::Input);
                    Ok(())
                }
                Ok(ConnectionState::WriteTraffic(mut w)) => {
                    let data = plaintext.map_or(&[][..], |p| &p[..p.len().min(MAX_WRITE_CHUNK)]);
                    let mut r = Ok(());
                    if !data.is_empty() {
                        r = append_with(&mut self.outgoing, data.len() + 256, |buf| {
                            encrypted(w.encrypt(data, buf))
                        });
                    }
                    if r.is_ok() && close && !self.close_sent {
                        r = append_with(&mut self.outgoing, 64, |buf| {
                            encrypted(w.queue_close_notify(buf))
                        });
                        self.close_sent = r.is_ok();
                    }
                    next = Some(Next::Traffic(data.len()));
                    r
                }
                // Early data is off (`max_early_data_size` is 0), so this is not expected.
                Ok(_) => Err(invalid("unexpected TLS state (early data)")),
            };
            self.incoming.drain(..discard);
            if self.incoming.is_empty() {
                self.incoming = Vec::new();
            }
            outcome?;
            if let Some(next) = next {
                return Ok(next);
            }
        }
    }

    /// After an error, rustls has queued its fatal alert (one message) for the peer: take it
    /// into `outgoing`. Once only: a second call would process the bad input again.
    fn queue_alert(&mut self) {
        let UnbufferedStatus { state, .. } = self.conn.process_tls_records(&mut self.incoming);
        if let Ok(ConnectionState::EncodeTlsData(mut record)) = state {
            let _ = append_with(&mut self.outgoing, 64, |buf| encoded(record.encode(buf)));
        }
        self.incoming = Vec::new();
    }

    /// Reads once from the socket into `incoming`; 0 means the peer's socket ended.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        let start = self.incoming.len();
        if start >= MAX_INCOMING {
            return Poll::Ready(Err(invalid("TLS message too large")));
        }
        self.incoming.resize(start + READ_SIZE, 0);
        let mut buf = ReadBuf::new(&mut self.incoming[start..]);
        let r = Pin::new(&mut self.io).poll_read(cx, &mut buf);
        let n = buf.filled().len();
        self.incoming.truncate(start + n);
        if self.incoming.is_empty() {
            // Nothing came: an idle connection keeps no buffer while it waits.
            self.incoming = Vec::new();
        }
        ready!(r)?;
        Poll::Ready(Ok(n))
    }

    /// Writes `outgoing` out; its buffer is given back once it is all sent.
    fn poll_send(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.sending() {
            let n = ready!(
                Pin::new(&mut self.io).poll_write(cx, &self.outgoing[self.outgoing_sent..])
            )?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.outgoing_sent += n;
        }
        self.outgoing = Vec::new();
        self.outgoing_sent = 0;
        Poll::Ready(Ok(()))
    }

    fn take_plaintext(&mut self, buf: &mut ReadBuf<'_>) -> bool {
        let pending = &self.plaintext[self.plaintext_read..];
        if pending.is_empty() {
            return false;
        }
        let n = pending.len().min(buf.remaining());
        buf.put_slice(&pending[..n]);
        self.plaintext_read += n;
        if self.plaintext_read == self.plaintext.len() {
            self.plaintext = Vec::new();
            self.plaintext_read = 0;
        }
        true
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for TlsStream<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            // Nothing taken once closed: the end of the stream.
            if this.take_plaintext(buf) || this.read_closed {
                return Poll::Ready(Ok(()));
            }
            // `Closed` and `PeerClosed` set `read_closed`.
            this.advance(None, false)?;
            if this.plaintext_waiting() || this.read_closed {
                continue;
            }
            // What processing queued (a key update's answer, an alert) goes out without
            // making the read wait for a peer that does not read.
            if let Poll::Ready(Err(e)) = this.poll_send(cx) {
                return Poll::Ready(Err(e));
            }
            if ready!(this.poll_fill(cx))? == 0 {
                // The socket ended without close_notify; HTTP's own framing tells a cut
                // request from a whole one.
                this.read_closed = true;
            }
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for TlsStream<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        // Backpressure: encrypt more only when the last output is out.
        ready!(this.poll_send(cx))?;
        if this.close_sent {
            return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
        }
        match this.advance(Some(data), false)? {
            Next::Traffic(n) => {
                if let Poll::Ready(Err(e)) = this.poll_send(cx) {
                    return Poll::Ready(Err(e));
                }
                Poll::Ready(Ok(n))
            }
            Next::Input | Next::Closed => Poll::Ready(Err(io::ErrorKind::BrokenPipe.into())),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_send(cx))?;
        Pin::new(&mut this.io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.close_sent {
            ready!(this.poll_send(cx))?;
            // A connection that already failed has nothing to close cleanly.
            let _ = this.advance(None, true);
            this.close_sent = true;
        }
        ready!(this.poll_send(cx))?;
        Pin::new(&mut this.io).poll_shutdown(cx)
    }
}

/// What rustls answers when it writes into a buffer the caller gave it.
enum Fit {
    Written(usize),
    /// The buffer was too small: this many bytes are needed.
    Needs(usize),
}

fn encoded(r: Result<usize, EncodeError>) -> io::Result<Fit> {
    match r {
        Ok(n) => Ok(Fit::Written(n)),
        Err(EncodeError::InsufficientSize(InsufficientSizeError { required_size })) => {
            Ok(Fit::Needs(required_size))
        }
        Err(e) => Err(invalid(e)),
    }
}

fn encrypted(r: Result<usize, EncryptError>) -> io::Result<Fit> {
    match r {
        Ok(n) => Ok(Fit::Written(n)),
        Err(EncryptError::InsufficientSize(InsufficientSizeError { required_size })) => {
            Ok(Fit::Needs(required_size))
        }
        Err(e) => Err(invalid(e)),
    }
}

/// Appends what `write` puts into a buffer of `guess` bytes to `out`, retrying once with
/// the size `write` says it needs.
fn append_with(
    out: &mut Vec<u8>,
    guess: usize,
    mut write: impl FnMut(&mut [u8]) -> io::Result<Fit>,
) -> io::Result<()> {
    let start = out.len();
    let mut size = guess;
    loop {
        out.resize(start + size, 0);
        match write(&mut out[start..]) {
            Ok(Fit::Written(n)) => {
                out.truncate(start + n);
                return Ok(());
            }
            Ok(Fit::Needs(required)) if required > size => size = required,
            r => {
                out.truncate(start);
                return Err(r
                    .err()
                    .unwrap_or_else(|| invalid("TLS output buffer sizing")));
            }
        }
    }
}

fn invalid(e: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    struct Pki {
        server: Arc<rustls::ServerConfig>,
        client: Arc<rustls::ClientConfig>,
        /// Trusts the same CA, presents no certificate.
        anonymous: Arc<rustls::ClientConfig>,
        client_cert: CertificateDer<'static>,
    }

    /// A CA, a server certificate for `localhost`, and a client certificate, all rcgen's.
    fn pki(client_auth: bool) -> Pki {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca_cert = ca.self_signed(&ca_key).unwrap();
        let issuer = rcgen::Issuer::new(ca, ca_key);
        let issue = |names: Vec<String>| {
            let key = rcgen::KeyPair::generate().unwrap();
            let cert = rcgen::CertificateParams::new(names)
                .unwrap()
                .signed_by(&key, &issuer)
                .unwrap();
            (
                CertificateDer::from(cert.der().to_vec()),
                PrivateKeyDer::try_from(key.serialize_der()).unwrap(),
            )
        };
        let (server_cert, server_key) = issue(vec!["localhost".into()]);
        let (client_cert, client_key) = issue(vec!["device-1".into()]);
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca_cert.der().clone()).unwrap();
        let roots = Arc::new(roots);
        let server = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .unwrap();
        let server = if client_auth {
            let v = rustls::server::WebPkiClientVerifier::builder_with_provider(
                roots.clone(),
                provider.clone(),
            )
            .build()
            .unwrap();
            server.with_client_cert_verifier(v)
        } else {
            server.with_no_client_auth()
        }
        .with_single_cert(vec![server_cert], server_key)
        .unwrap();
        let client = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots);
        let anonymous = Arc::new(client.clone().with_no_client_auth());
        let client = if client_auth {
            Arc::new(
                client
                    .with_client_auth_cert(vec![client_cert.clone()], client_key)
                    .unwrap(),
            )
        } else {
            anonymous.clone()
        };
        Pki {
            server: Arc::new(server),
            client,
            anonymous,
            client_cert,
        }
    }

    async fn pair(
        pki: &Pki,
    ) -> (
        TlsStream<tokio::io::DuplexStream>,
        tokio_rustls::client::TlsStream<tokio::io::DuplexStream>,
    ) {
        let (a, b) = tokio::io::duplex(8 * 1024);
        let connector = tokio_rustls::TlsConnector::from(pki.client.clone());
        let name = ServerName::try_from("localhost").unwrap();
        let (server, client) = tokio::join!(
            TlsStream::accept(pki.server.clone(), a),
            connector.connect(name, b)
        );
        (server.unwrap(), client.unwrap())
    }

    /// Sends `send` and, at the same time, reads and checks `expect`.
    async fn exchange<S: AsyncRead + AsyncWrite + Unpin>(
        stream: &mut S,
        send: &[u8],
        expect: &[u8],
    ) {
        let (mut r, mut w) = tokio::io::split(stream);
        let sending = async {
            w.write_all(send).await.unwrap();
            w.flush().await.unwrap();
        };
        let receiving = async {
            let mut got = vec![0; expect.len()];
            r.read_exact(&mut got).await.unwrap();
            got
        };
        let ((), got) = tokio::join!(sending, receiving);
        assert!(got == expect, "received what the other side sent");
    }

    #[tokio::test]
    async fn carries_a_mebibyte_each_way_and_holds_no_buffer_when_idle() {
        let pki = pki(false);
        let (mut server, mut client) = pair(&pki).await;
        assert!(!server.has_buffered(), "idle after the handshake");
        assert_eq!(server.incoming.capacity(), 0);
        assert_eq!(server.outgoing.capacity(), 0);
        let up: Vec<u8> = (0..1 << 20).map(|i| (i % 251) as u8).collect();
        let down: Vec<u8> = up.iter().rev().copied().collect();
        tokio::join!(
            exchange(&mut client, &up, &down),
            exchange(&mut server, &down, &up)
        );
        assert_eq!(
            server.incoming.capacity(),
            0,
            "nothing held once all is read"
        );
        assert_eq!(server.plaintext.capacity(), 0);
        assert_eq!(server.outgoing.capacity(), 0);
    }

    #[tokio::test]
    async fn close_notify_each_way_ends_the_stream() {
        let pki = pki(false);
        let (mut server, mut client) = pair(&pki).await;
        client.write_all(b"last words").await.unwrap();
        client.shutdown().await.unwrap();
        let mut got = Vec::new();
        server.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"last words");
        server.write_all(b"reply").await.unwrap();
        server.shutdown().await.unwrap();
        let mut got = Vec::new();
        client.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"reply");
        assert!(
            server.write_all(b"more").await.is_err(),
            "no writes after close"
        );
    }

    #[tokio::test]
    async fn client_certificate_is_verified_and_visible() {
        let pki = pki(true);
        let (server, _client) = pair(&pki).await;
        assert_eq!(server.peer_certificates().unwrap()[0], pki.client_cert);
    }

    #[tokio::test]
    async fn refused_client_gets_an_alert_and_the_server_an_error() {
        let pki = pki(true);
        // A client that trusts the CA but brings no certificate, on a listener that needs one.
        let (a, b) = tokio::io::duplex(8 * 1024);
        let name = ServerName::try_from("localhost").unwrap();
        let (server, client) = tokio::join!(TlsStream::accept(pki.server.clone(), a), async {
            let mut c = tokio_rustls::TlsConnector::from(pki.anonymous.clone())
                .connect(name, b)
                .await?;
            // TLS 1.3: the client's handshake ends before the server's verdict; it comes as an
            // alert on the first read.
            let mut byte = [0u8; 1];
            c.read(&mut byte).await
        });
        assert!(server.is_err(), "server refuses");
        let e = client.expect_err("client sees the refusal");
        assert!(
            e.to_string().to_lowercase().contains("certificate"),
            "alert names the reason: {e}"
        );
    }

    #[tokio::test]
    async fn garbage_instead_of_a_client_hello_is_refused() {
        let pki = pki(false);
        let (a, mut b) = tokio::io::duplex(8 * 1024);
        b.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let server = TlsStream::accept(pki.server.clone(), a).await;
        assert!(server.is_err());
        let mut reply = Vec::new();
        let _ = b.read_to_end(&mut reply).await;
        assert_eq!(reply.first(), Some(&21), "a TLS alert record comes back");
    }

    #[tokio::test]
    async fn eof_mid_handshake_is_an_error() {
        let pki = pki(false);
        let (a, b) = tokio::io::duplex(8 * 1024);
        drop(b);
        assert!(TlsStream::accept(pki.server.clone(), a).await.is_err());
    }

    #[tokio::test]
    async fn client_key_update_is_followed() {
        let pki = pki(false);
        let (mut server, mut client) = pair(&pki).await;
        for round in 0..3u8 {
            client.get_mut().1.refresh_traffic_keys().unwrap();
            client.write_all(&[round; 100]).await.unwrap();
            client.flush().await.unwrap();
            let mut got = [0u8; 100];
            server.read_exact(&mut got).await.unwrap();
            assert_eq!(got, [round; 100]);
            server.write_all(&[round + 10; 50]).await.unwrap();
            server.flush().await.unwrap();
            let mut got = [0u8; 50];
            client.read_exact(&mut got).await.unwrap();
            assert_eq!(got, [round + 10; 50]);
        }
    }
}
