//! One terminal session: a PTY running the configured command, bridged to the WebSocket.
//!
//! Flow control: the PTY is read only while the client is not paused and only as fast as the
//! WebSocket takes frames, so a fast producer with a slow client stalls the producer instead of
//! growing memory. When the child exits the PTY is read to its end before the close frame
//! (1000, the exit status in the reason). When the client goes away the session's process group
//! gets SIGHUP, then SIGKILL after a grace period, so no shell is left behind.

use crate::input::InputQueue;
use crate::protocol::{self, ClientMessage, Hello};
use crate::server::close;
use crate::ticket::Claims;
use futures_util::{Sink, SinkExt, StreamExt};
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_util::sync::CancellationToken;

/// Bytes read from the PTY per output frame.
const CHUNK: usize = 16 * 1024;
/// A client that answers nothing (a dead tunnel) for this many ping intervals is gone, and
/// its session slot is freed.
const PINGS_UNANSWERED: u32 = 3;
/// After the child exits, how long to wait for the PTY to drain (a background job may keep
/// it open forever).
const DRAIN_AFTER_EXIT: Duration = Duration::from_secs(1);

#[derive(Debug, Clone)]
pub struct SessionConfig {
    /// argv of the session's process (default: a login shell).
    pub command: Vec<String>,
    /// Run as this user (name from /etc/passwd); the agent's own user when `None`.
    pub user: Option<String>,
    pub term: String,
    pub idle_timeout: Duration,
    pub read_only: bool,
    /// Between SIGHUP and SIGKILL of the session's process group.
    pub hangup_grace: Duration,
    /// Shown as the window title.
    pub title: String,
    /// A WebSocket ping this often; nothing from the client for three of them ends the
    /// session (a dead tunnel frees its slot in a minute, not at the idle timeout).
    pub ping_interval: Duration,
}

impl Default for SessionConfig {
    fn default() -> Self {
        Self {
            command: vec!["/bin/sh".into(), "-l".into()],
            user: None,
            term: "xterm-256color".into(),
            idle_timeout: Duration::from_secs(15 * 60),
            read_only: false,
            hangup_grace: Duration::from_secs(2),
            title: "thingsly".into(),
            ping_interval: Duration::from_secs(20),
        }
    }
}

struct Account {
    uid: u32,
    gid: u32,
    home: String,
    shell: String,
}

/// Whether `name` (from /etc/passwd) is the user this process runs as.
pub fn is_own_user(name: &str) -> Result<bool, String> {
    account(name).map(|a| a.uid == rustix::process::geteuid().as_raw())
}

/// `/etc/passwd` lookup (the format is fixed; no NSS on these boards).
fn account(name: &str) -> Result<Account, String> {
    let passwd = std::fs::read_to_string("/etc/passwd").map_err(|e| format!("/etc/passwd: {e}"))?;
    passwd
        .lines()
        .map(|l| l.split(':').collect::<Vec<_>>())
        .find(|f| f.len() >= 7 && f[0] == name)
        .and_then(|f| {
            Some(Account {
                uid: f[2].parse().ok()?,
                gid: f[3].parse().ok()?,
                home: f[5].to_string(),
                shell: f[6].to_string(),
            })
        })
        .ok_or_else(|| format!("terminal.user {name:?} not in /etc/passwd"))
}

enum End {
    Exited(String),
    /// The client sent a close frame.
    ClientClosed,
    /// The connection broke; with the close code and reason when it broke the protocol.
    ClientGone(Option<(CloseCode, String)>),
    /// Nothing from the client (not even a pong) for `PINGS_UNANSWERED` ping intervals.
    Unresponsive,
    InputOverflow(crate::input::Overflow),
    Idle,
    Shutdown,
}

/// What the terminal driver does when it reads INTR, QUIT or SUSP with ISIG set: discard
/// its input queue (unless NOFLSH) and signal the foreground process group. False when `c`
/// is not one of those characters in the current settings (a raw-mode program gets the
/// byte instead).
fn interrupt_foreground(master: &std::os::fd::OwnedFd, c: u8) -> bool {
    use rustix::process::{Signal, kill_process_group};
    use rustix::termios::{
        LocalModes, QueueSelector, SpecialCodeIndex as I, tcflush, tcgetattr, tcgetpgrp,
    };
    // (qemu-user lacks TCGETS2, which rustix uses: there, assume the defaults a fresh PTY
    // has, ISIG on with ^C ^\\ ^Z.)
    let (isig, noflsh, intr, quit, susp) = match tcgetattr(master) {
        Ok(t) => (
            t.local_modes.contains(LocalModes::ISIG),
            t.local_modes.contains(LocalModes::NOFLSH),
            t.special_codes[I::VINTR],
            t.special_codes[I::VQUIT],
            t.special_codes[I::VSUSP],
        ),
        Err(_) => (true, false, 0x03, 0x1c, 0x1a),
    };
    if !isig {
        return false;
    }
    let sig = if c == intr {
        Signal::INT
    } else if c == quit {
        Signal::QUIT
    } else if c == susp {
        Signal::TSTP
    } else {
        return false;
    };
    if !noflsh
        && let Ok(name) = rustix::pty::ptsname(master, Vec::new())
        && let Ok(slave) = rustix::fs::open(
            name.as_c_str(),
            rustix::fs::OFlags::RDWR
                | rustix::fs::OFlags::NOCTTY
                | rustix::fs::OFlags::NONBLOCK
                | rustix::fs::OFlags::CLOEXEC,
            rustix::fs::Mode::empty(),
        )
    {
        // What the program never read is not meant for whatever reads next.
        let _ = tcflush(&slave, QueueSelector::IFlush);
    }
    match tcgetpgrp(master) {
        Ok(pgrp) => kill_process_group(pgrp, sig).is_ok(),
        Err(_) => false,
    }
}

/// Move the pending frame into the sink and flush it, without ever holding it in a future
/// (so the select loop can drop this at any point and lose nothing). Ready once flushed.
fn drive_send<S: Sink<Message> + Unpin>(
    tx: &mut S,
    pending: &mut Option<Message>,
    flushing: &mut bool,
    cx: &mut std::task::Context<'_>,
) -> std::task::Poll<Result<(), S::Error>> {
    use std::task::Poll;
    if pending.is_some() {
        match tx.poll_ready_unpin(cx) {
            Poll::Ready(Ok(())) => {
                if let Some(m) = pending.take() {
                    tx.start_send_unpin(m)?;
                }
                *flushing = true;
            }
            Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
            Poll::Pending => return Poll::Pending,
        }
    }
    match tx.poll_flush_unpin(cx) {
        Poll::Ready(r) => {
            *flushing = false;
            Poll::Ready(r)
        }
        Poll::Pending => Poll::Pending,
    }
}

/// The close a protocol error from the client deserves (RFC 6455 §7.4.1), if any.
fn refusal_for(e: &tokio_tungstenite::tungstenite::Error) -> Option<(CloseCode, String)> {
    use tokio_tungstenite::tungstenite::Error as E;
    match e {
        E::Capacity(c) => Some((CloseCode::Size, format!("message too big: {c}"))),
        E::Utf8(_) => Some((CloseCode::Invalid, "text frame is not UTF-8".into())),
        E::Protocol(p) => Some((CloseCode::Protocol, p.to_string())),
        _ => None,
    }
}

pub async fn run<S>(
    ws: WebSocketStream<S>,
    cfg: &SessionConfig,
    hello: &Hello,
    claims: &Claims,
    peer: SocketAddr,
    shutdown: CancellationToken,
) -> Result<(), String>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let mut ws = ws;
    let spawned = spawn(cfg, hello);
    let (mut child, pty) = match spawned {
        Ok(x) => x,
        Err(e) => {
            close(
                &mut ws,
                CloseCode::Error,
                &format!("cannot start session: {e}"),
            )
            .await;
            return Err(e);
        }
    };
    let pgid = child
        .id()
        .and_then(|p| rustix::process::Pid::from_raw(p as i32));
    let read_only = cfg.read_only || claims.read_only;
    let started = Instant::now();
    tracing::info!(target: "audit", operator = %claims.sub, ticket = %claims.jti, %peer, pid = ?child.id(), read_only, "terminal session started");

    // A second handle on the master, for the terminal driver's settings and foreground group.
    let master = std::os::fd::AsFd::as_fd(&pty)
        .try_clone_to_owned()
        .map_err(|e| format!("PTY: {e}"))?;
    let (mut pty_r, mut pty_w) = pty.into_split();
    let (mut tx, mut rx) = ws.split();
    let title = protocol::server_frame(protocol::SET_WINDOW_TITLE, cfg.title.as_bytes());
    let prefs = protocol::server_frame(protocol::SET_PREFERENCES, b"{}");
    for f in [title, prefs] {
        tx.send(Message::Binary(f.into()))
            .await
            .map_err(|e| e.to_string())?;
    }

    let (mut bytes_in, mut bytes_out) = (0u64, 0u64);
    let mut paused = false;
    let mut pty_open = true;
    let mut exit: Option<String> = None;
    let mut drain_deadline: Option<tokio::time::Instant> = None;
    let mut last_activity = tokio::time::Instant::now();
    // Anything from the client (a pong included) proves the path to it is alive.
    let mut last_heard = tokio::time::Instant::now();
    let mut ping = tokio::time::interval(cfg.ping_interval);
    ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut input = InputQueue::default();
    // One output frame at a time: the PTY is read again only once it is flushed, so a slow
    // client slows the program instead of growing memory; but the loop never waits inside a
    // send, so input, close, pings and timeouts are handled meanwhile.
    let mut out_pending: Option<Message> = None;
    let mut flushing = false;
    let mut buf = vec![0u8; CHUNK];
    let end = loop {
        if exit.is_some()
            && (!pty_open || drain_deadline.is_some_and(|d| d <= tokio::time::Instant::now()))
            && out_pending.is_none()
        {
            break End::Exited(exit.take().unwrap_or_default());
        }
        let idle_at = last_activity + cfg.idle_timeout;
        let drain_at = drain_deadline.unwrap_or(idle_at);
        let deaf_at = last_heard + cfg.ping_interval * PINGS_UNANSWERED;
        tokio::select! {
            _ = shutdown.cancelled() => break End::Shutdown,
            _ = tokio::time::sleep_until(idle_at) => break End::Idle,
            _ = tokio::time::sleep_until(deaf_at) => break End::Unresponsive,
            // Wakes the loop once at the drain deadline (then the check above ends the session,
            // or, with output still waiting for a slow client, the other arms do): never again,
            // or a deadline in the past would spin.
            _ = tokio::time::sleep_until(drain_at), if drain_deadline.is_some_and(|d| d > tokio::time::Instant::now()) => continue,
            _ = ping.tick(), if out_pending.is_none() => {
                out_pending = Some(Message::Ping(Vec::new().into()));
            }
            status = child.wait(), if exit.is_none() => {
                exit = Some(match status {
                    Ok(s) => match (s.code(), std::os::unix::process::ExitStatusExt::signal(&s)) {
                        (Some(c), _) => format!("exit status {c}"),
                        (None, Some(sig)) => format!("killed by signal {sig}"),
                        _ => "exited".into(),
                    },
                    Err(e) => format!("wait failed: {e}"),
                });
                drain_deadline = Some(tokio::time::Instant::now() + DRAIN_AFTER_EXIT);
            }
            r = std::future::poll_fn(|cx| drive_send(&mut tx, &mut out_pending, &mut flushing, cx)),
                if out_pending.is_some() || flushing => {
                if r.is_err() {
                    break End::ClientGone(None);
                }
            }
            n = pty_r.read(&mut buf), if pty_open && !paused && out_pending.is_none() && !flushing => {
                match n {
                    // EIO: every slave fd is closed (the child and its children are gone).
                    Ok(0) | Err(_) => pty_open = false,
                    Ok(n) => {
                        bytes_out += n as u64;
                        last_activity = tokio::time::Instant::now();
                        let frame = protocol::server_frame(protocol::OUTPUT, &buf[..n]);
                        out_pending = Some(Message::Binary(frame.into()));
                    }
                }
            }
            // A write only ever takes what the PTY accepts now: never blocks the loop.
            w = pty_w.write(input.front()), if pty_open && !input.is_empty() => {
                match w {
                    Ok(0) | Err(_) => pty_open = false,
                    Ok(n) => input.consume(n),
                }
            }
            msg = rx.next() => {
                last_heard = tokio::time::Instant::now();
                let data = match msg {
                    Some(Ok(Message::Binary(b))) => b.to_vec(),
                    Some(Ok(Message::Text(t))) => t.as_bytes().to_vec(),
                    Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => continue,
                    Some(Ok(Message::Close(_))) => break End::ClientClosed,
                    None => break End::ClientGone(None),
                    Some(Err(e)) => break End::ClientGone(refusal_for(&e)),
                };
                last_activity = tokio::time::Instant::now();
                match protocol::parse_client(&data) {
                    Ok(ClientMessage::Input(bytes)) if !read_only => {
                        bytes_in += bytes.len() as u64;
                        if let Err(o) = input.push(&bytes) {
                            break End::InputOverflow(o);
                        }
                        // With ISIG the agent does the driver's job for ^C (^\\, ^Z) itself:
                        // the driver would only see it after every byte queued before it, and a
                        // program that reads nothing leaves that queue full for good.
                        if let Some(&c) = input.front().first()
                            && crate::input::is_interrupt(c)
                            && interrupt_foreground(&master, c)
                        {
                            input.consume(1);
                        }
                    }
                    Ok(ClientMessage::Input(_)) => {}
                    Ok(ClientMessage::Resize { columns, rows }) => {
                        let _ = pty_w.resize(pty_process::Size::new(rows, columns));
                    }
                    Ok(ClientMessage::Pause) => paused = true,
                    // Repeating resume is harmless: it only lifts the read guard.
                    Ok(ClientMessage::Resume) => paused = false,
                    Err(e) => tracing::debug!(error = %e, "ignored client message"),
                }
            }
        }
    };

    let (code, reason) = match &end {
        End::Exited(s) => (CloseCode::Normal, s.clone()),
        End::ClientClosed => (CloseCode::Normal, "client closed".into()),
        End::ClientGone(None) => (CloseCode::Normal, "client gone".into()),
        End::ClientGone(Some((code, why))) => (*code, why.clone()),
        End::Unresponsive => (
            CloseCode::Away,
            format!(
                "no answer to pings for {}s",
                (cfg.ping_interval * PINGS_UNANSWERED).as_secs()
            ),
        ),
        End::InputOverflow(o) => (
            CloseCode::Size,
            format!(
                "input not read by the program: {} bytes waiting, {} more offered",
                o.queued, o.offered
            ),
        ),
        End::Idle => (
            CloseCode::Normal,
            format!("idle for {}s", cfg.idle_timeout.as_secs()),
        ),
        End::Shutdown => (CloseCode::Away, "agent stopping".into()),
    };
    if !matches!(end, End::Exited(_)) {
        hang_up(&mut child, pgid, cfg.hangup_grace).await;
    }
    match &end {
        // tungstenite queued the reply to the client's close: send it, so the client sees
        // a clean 1000 instead of 1006.
        End::ClientClosed => {
            if let Ok(mut ws) = tx.reunite(rx) {
                let _ = tokio::time::timeout(Duration::from_secs(2), ws.flush()).await;
            }
        }
        End::ClientGone(None) => {}
        _ => {
            if let Ok(mut ws) = tx.reunite(rx) {
                close(&mut ws, code, &reason).await;
            }
        }
    }
    tracing::info!(target: "audit", operator = %claims.sub, ticket = %claims.jti, %peer, bytes_in, bytes_out,
        seconds = started.elapsed().as_secs(), end = %reason, "terminal session ended");
    Ok(())
}

fn spawn(
    cfg: &SessionConfig,
    hello: &Hello,
) -> Result<(tokio::process::Child, pty_process::Pty), String> {
    let (pty, pts) = pty_process::open().map_err(|e| format!("no PTY: {e}"))?;
    pty.resize(pty_process::Size::new(hello.rows, hello.columns))
        .map_err(|e| format!("PTY resize: {e}"))?;
    let (program, args) = cfg
        .command
        .split_first()
        .ok_or("terminal.command is empty")?;
    // A clean environment: nothing of the agent's (its systemd sockets, credentials paths)
    // reaches the operator's shell.
    let mut cmd = pty_process::Command::new(program)
        .args(args)
        .env_clear()
        .env(
            "PATH",
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        )
        .env("TERM", &cfg.term)
        .kill_on_drop(true);
    if let Some(lang) = std::env::var_os("LANG") {
        cmd = cmd.env("LANG", lang);
    }
    if let Some(name) = &cfg.user {
        let a = account(name)?;
        cmd = cmd
            .uid(a.uid)
            .gid(a.gid)
            .env("HOME", &a.home)
            .env("USER", name)
            .env("LOGNAME", name)
            .env("SHELL", &a.shell)
            .current_dir(&a.home);
    }
    // SAFETY: `reset_signals` runs in the forked child before exec and only calls signal(2),
    // which is async-signal-safe; it allocates nothing and takes no lock.
    #[allow(unsafe_code)]
    let cmd = unsafe { cmd.pre_exec(reset_signals) };
    let child = cmd.spawn(pts).map_err(|e| format!("{program}: {e}"))?;
    Ok((child, pty))
}

/// Every signal back to its default disposition in the session's child. exec keeps ignored
/// signals ignored, and an agent started from a shell with `&` has SIGINT and SIGQUIT ignored
/// (POSIX, without job control): its operators' shells then ignored ^C, and a shell cannot
/// even trap a signal that was ignored on entry. A login (sshd, ttyd) starts from defaults.
/// (std already resets the signal mask and SIGPIPE.)
#[allow(unsafe_code)]
fn reset_signals() -> std::io::Result<()> {
    for sig in 1..32 {
        if sig == libc::SIGKILL || sig == libc::SIGSTOP {
            continue;
        }
        // SAFETY: signal(2) with SIG_DFL, async-signal-safe; errors (none expected for the
        // standard signals) leave that one as it was.
        unsafe {
            libc::signal(sig, libc::SIG_DFL);
        }
    }
    Ok(())
}

/// SIGHUP to the session's process group (the shell is its leader), SIGKILL after `grace`.
async fn hang_up(
    child: &mut tokio::process::Child,
    pgid: Option<rustix::process::Pid>,
    grace: Duration,
) {
    use rustix::process::{Signal, kill_process_group};
    let Some(pgid) = pgid else { return };
    let _ = kill_process_group(pgid, Signal::HUP);
    if tokio::time::timeout(grace, child.wait()).await.is_err() {
        let _ = kill_process_group(pgid, Signal::KILL);
        let _ = child.wait().await;
    } else {
        // The leader left; anything it started in the group goes too.
        let _ = kill_process_group(pgid, Signal::KILL);
    }
}
