//! The device side of the remote terminal: a ttyd-compatible WebSocket server that runs one
//! PTY per session, only for sessions that present a bridge-signed single-use ticket.

mod input;
pub mod protocol;
mod server;
mod session;
pub mod ticket;

pub use server::{MAX_INPUT_MESSAGE, TerminalConfig, close, offers_tty, serve};
pub use session::{SessionConfig, is_own_user};
