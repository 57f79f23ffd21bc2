//! ttyd's WebSocket protocol (ttyd ≥ 1.7, subprotocol `tty`), both directions.
//!
//! The client's first message is JSON `{"AuthToken","columns","rows"}`; after it every message
//! starts with a command byte. Text and binary frames are treated alike (ttyd's own page sends
//! binary, other clients send text); fragmented frames arrive reassembled from tungstenite.

use serde::Deserialize;

/// Client → server command bytes.
pub const INPUT: u8 = b'0';
pub const RESIZE: u8 = b'1';
pub const PAUSE: u8 = b'2';
pub const RESUME: u8 = b'3';
/// Server → client command bytes.
pub const OUTPUT: u8 = b'0';
pub const SET_WINDOW_TITLE: u8 = b'1';
pub const SET_PREFERENCES: u8 = b'2';

/// Largest terminal we accept (a resize beyond it is an error, not an allocation).
pub const MAX_DIMENSION: u16 = 1000;

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ProtocolError {
    #[error("empty message")]
    Empty,
    #[error("unknown command byte {0:#04x}")]
    UnknownCommand(u8),
    #[error("bad JSON: {0}")]
    Json(String),
    #[error("terminal size {0}x{1} out of range 1..={MAX_DIMENSION}")]
    Size(u16, u16),
}

/// The first message of a session.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Hello {
    #[serde(rename = "AuthToken", default)]
    pub auth_token: String,
    #[serde(default = "default_columns")]
    pub columns: u16,
    #[serde(default = "default_rows")]
    pub rows: u16,
}

fn default_columns() -> u16 {
    80
}
fn default_rows() -> u16 {
    24
}

#[derive(Debug, Clone, PartialEq)]
pub enum ClientMessage {
    Input(Vec<u8>),
    Resize { columns: u16, rows: u16 },
    Pause,
    Resume,
}

#[derive(Deserialize)]
struct ResizeBody {
    columns: u16,
    rows: u16,
}

fn check_size(columns: u16, rows: u16) -> Result<(), ProtocolError> {
    if columns == 0 || rows == 0 || columns > MAX_DIMENSION || rows > MAX_DIMENSION {
        return Err(ProtocolError::Size(columns, rows));
    }
    Ok(())
}

pub fn parse_hello(frame: &[u8]) -> Result<Hello, ProtocolError> {
    let hello: Hello =
        serde_json::from_slice(frame).map_err(|e| ProtocolError::Json(e.to_string()))?;
    check_size(hello.columns, hello.rows)?;
    Ok(hello)
}

pub fn parse_client(frame: &[u8]) -> Result<ClientMessage, ProtocolError> {
    let (&cmd, rest) = frame.split_first().ok_or(ProtocolError::Empty)?;
    match cmd {
        INPUT => Ok(ClientMessage::Input(rest.to_vec())),
        RESIZE => {
            let b: ResizeBody =
                serde_json::from_slice(rest).map_err(|e| ProtocolError::Json(e.to_string()))?;
            check_size(b.columns, b.rows)?;
            Ok(ClientMessage::Resize {
                columns: b.columns,
                rows: b.rows,
            })
        }
        PAUSE => Ok(ClientMessage::Pause),
        RESUME => Ok(ClientMessage::Resume),
        other => Err(ProtocolError::UnknownCommand(other)),
    }
}

/// A server frame: command byte then payload.
pub fn server_frame(cmd: u8, payload: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(payload.len() + 1);
    v.push(cmd);
    v.extend_from_slice(payload);
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_client_command() {
        assert_eq!(
            parse_client(b"0ls\r").unwrap(),
            ClientMessage::Input(b"ls\r".to_vec())
        );
        assert_eq!(
            parse_client(br#"1{"columns":120,"rows":40}"#).unwrap(),
            ClientMessage::Resize {
                columns: 120,
                rows: 40
            }
        );
        assert_eq!(parse_client(b"2").unwrap(), ClientMessage::Pause);
        assert_eq!(parse_client(b"3").unwrap(), ClientMessage::Resume);
        assert_eq!(parse_client(b"").unwrap_err(), ProtocolError::Empty);
        assert_eq!(
            parse_client(b"9").unwrap_err(),
            ProtocolError::UnknownCommand(b'9')
        );
        assert!(matches!(
            parse_client(b"1{bad"),
            Err(ProtocolError::Json(_))
        ));
        assert_eq!(
            parse_client(br#"1{"columns":0,"rows":40}"#).unwrap_err(),
            ProtocolError::Size(0, 40)
        );
    }

    #[test]
    fn hello_with_defaults_and_limits() {
        let h = parse_hello(br#"{"AuthToken":"t","columns":100,"rows":30}"#).unwrap();
        assert_eq!((h.auth_token.as_str(), h.columns, h.rows), ("t", 100, 30));
        let h = parse_hello(b"{}").unwrap();
        assert_eq!((h.auth_token.as_str(), h.columns, h.rows), ("", 80, 24));
        assert!(parse_hello(br#"{"columns":65535,"rows":1}"#).is_err());
        assert!(parse_hello(b"not json").is_err());
    }

    proptest::proptest! {
        /// Arbitrary frames, valid command bytes first or not: an error at worst, never a
        /// panic, and the only allocation is a copy of the input.
        #[test]
        fn arbitrary_frames_do_not_panic(
            cmd in proptest::sample::select(b"0123{9\0".to_vec()),
            rest in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..2048),
        ) {
            let mut frame = vec![cmd];
            frame.extend_from_slice(&rest);
            if let Ok(ClientMessage::Input(v)) = parse_client(&frame) {
                proptest::prop_assert_eq!(v.len(), rest.len());
            }
            let _ = parse_hello(&frame);
            let _ = parse_hello(&rest);
        }
    }
}
