//! Operator input waiting for the PTY. The session never blocks on the PTY: input is queued
//! here and written whenever the PTY takes it, so output, pause/resume, resize, the client's
//! close, the idle timeout and shutdown are all seen while a program ignores its stdin
//! (a paste into `tail -f`).
//!
//! Invariants:
//! - bytes leave in the order they came, none twice, none lost (but see the next point);
//! - an interrupt character (^C, ^\, ^Z) discards the input still queued before it and goes
//!   next, as the terminal driver discards its own input queue on INTR/QUIT/SUSP (POSIX
//!   termios without NOFLSH), so ^C works after a paste the program never read;
//! - at most [`MAX_BACKLOG`] bytes wait; a message that would go over is refused whole
//!   (nothing of it queued), and the caller ends the session with 1009.

use std::collections::VecDeque;

/// Input waiting at most; also the largest message the device accepts (the bridge's proxy
/// allows the same), so one paste always fits an empty queue.
pub const MAX_BACKLOG: usize = 1024 * 1024;

/// VINTR, VQUIT, VSUSP at their defaults.
const INTERRUPTS: [u8; 3] = [0x03, 0x1c, 0x1a];

/// One of the characters that discard the queue before them.
pub fn is_interrupt(b: u8) -> bool {
    INTERRUPTS.contains(&b)
}

#[derive(Debug, PartialEq, Eq)]
pub struct Overflow {
    pub queued: usize,
    pub offered: usize,
}

#[derive(Default)]
pub struct InputQueue {
    bytes: VecDeque<u8>,
}

impl InputQueue {
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.bytes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    /// Queue `data`, or refuse it whole if the backlog would exceed [`MAX_BACKLOG`].
    pub fn push(&mut self, data: &[u8]) -> Result<(), Overflow> {
        let (data, flushed) = match data.iter().rposition(|b| INTERRUPTS.contains(b)) {
            Some(i) => (&data[i..], true),
            None => (data, false),
        };
        if flushed {
            self.bytes.clear();
        }
        if self.bytes.len() + data.len() > MAX_BACKLOG {
            return Err(Overflow {
                queued: self.bytes.len(),
                offered: data.len(),
            });
        }
        self.bytes.extend(data);
        Ok(())
    }

    /// The next bytes to write (a contiguous slice of the front).
    pub fn front(&self) -> &[u8] {
        self.bytes.as_slices().0
    }

    /// `n` bytes of [`InputQueue::front`] were written.
    pub fn consume(&mut self, n: usize) {
        self.bytes.drain(..n.min(self.bytes.len()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn drain(q: &mut InputQueue) -> Vec<u8> {
        let mut out = Vec::new();
        while !q.is_empty() {
            let n = q.front().len().min(3); // the PTY takes a little at a time
            out.extend_from_slice(&q.front()[..n]);
            q.consume(n);
        }
        out
    }

    #[test]
    fn bytes_leave_in_order_once() {
        let mut q = InputQueue::default();
        q.push(b"echo ").unwrap();
        q.push(b"hello\r").unwrap();
        assert_eq!(drain(&mut q), b"echo hello\r");
        assert!(q.is_empty());
    }

    #[test]
    fn an_interrupt_discards_what_waits_before_it_and_goes_next() {
        let mut q = InputQueue::default();
        q.push(&[b'x'; 16 * 1024]).unwrap();
        q.push(b"more\x03after").unwrap();
        assert_eq!(drain(&mut q), b"\x03after");
        q.push(b"a\x1cb\x1ac").unwrap();
        assert_eq!(drain(&mut q), b"\x1ac", "the last interrupt wins");
    }

    #[test]
    fn over_the_backlog_a_message_is_refused_whole() {
        let mut q = InputQueue::default();
        q.push(&vec![b'a'; MAX_BACKLOG]).unwrap();
        let e = q.push(b"b").unwrap_err();
        assert_eq!(
            e,
            Overflow {
                queued: MAX_BACKLOG,
                offered: 1
            }
        );
        assert_eq!(q.len(), MAX_BACKLOG, "nothing of it queued");
        q.consume(10);
        q.push(b"0123456789").unwrap();
        assert!(q.push(&vec![b'c'; MAX_BACKLOG + 1]).is_err());
        // ^C still gets through a full queue.
        q.push(b"\x03").unwrap();
        assert_eq!(drain(&mut q), b"\x03");
    }
}
