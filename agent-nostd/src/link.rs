//! The byte link under TLS: a TCP socket of a network stack, or a modem's
//! UART in transparent mode.
//!
//! [`Link`] adds two things the session needs and embedded-tls does not
//! give:
//!
//! - [`Link::readable`], a wait for the next byte that may be cancelled
//!   (by a keepalive or telemetry deadline) without losing anything: the
//!   byte is kept and handed to TLS on its next read. embedded-tls's own
//!   `read` cannot be cancelled safely: a record header half read is lost.
//! - byte counters, from which the session bounds the number of TLS
//!   records per connection (see [`crate::session`] on KeyUpdate).
//!
//! A `&Link` is what embedded-tls gets as its socket, so the session keeps
//! its own `&Link` to wait on while the TLS connection holds another.
//! The session never polls two link operations at the same time (a wait
//! is dropped before TLS reads or writes), so the `RefCell` borrow held
//! across each await never meets another.
#![allow(clippy::await_holding_refcell_ref)]

use core::cell::{Cell, RefCell};

use embedded_io_async::{ErrorType, Read, Write};

/// A link with a one-byte lookahead and byte counters.
pub struct Link<T> {
    io: RefCell<T>,
    peeked: Cell<Option<u8>>,
    received: Cell<u64>,
    sent: Cell<u64>,
}

impl<T: Read + Write> Link<T> {
    pub fn new(io: T) -> Self {
        Link {
            io: RefCell::new(io),
            peeked: Cell::new(None),
            received: Cell::new(0),
            sent: Cell::new(0),
        }
    }

    /// Waits until at least one byte has arrived. Cancel-safe as long as
    /// the underlying `read` is (a TCP socket's or a UART's read either
    /// returns bytes or has taken none).
    pub async fn readable(&self) -> Result<(), T::Error> {
        if self.peeked.get().is_some() {
            return Ok(());
        }
        let mut byte = [0u8; 1];
        let n = self.io.borrow_mut().read(&mut byte).await?;
        if n == 1 {
            self.received.set(self.received.get() + 1);
            self.peeked.set(Some(byte[0]));
        }
        // n == 0 is end of stream: the next TLS read sees it too.
        Ok(())
    }

    /// Bytes received since the link was made.
    pub fn received(&self) -> u64 {
        self.received.get()
    }

    /// Bytes sent since the link was made.
    pub fn sent(&self) -> u64 {
        self.sent.get()
    }

    /// The link itself, e.g. to close a socket.
    pub fn into_inner(self) -> T {
        self.io.into_inner()
    }
}

impl<T: ErrorType> ErrorType for &Link<T> {
    type Error = T::Error;
}

impl<T: Read + Write> Read for &Link<T> {
    async fn read(&mut self, buf: &mut [u8]) -> Result<usize, Self::Error> {
        if buf.is_empty() {
            return Ok(0);
        }
        if let Some(b) = self.peeked.take() {
            buf[0] = b;
            return Ok(1);
        }
        let n = self.io.borrow_mut().read(buf).await?;
        self.received.set(self.received.get() + n as u64);
        Ok(n)
    }
}

impl<T: Read + Write> Write for &Link<T> {
    async fn write(&mut self, buf: &[u8]) -> Result<usize, Self::Error> {
        let n = self.io.borrow_mut().write(buf).await?;
        self.sent.set(self.sent.get() + n as u64);
        Ok(n)
    }

    async fn flush(&mut self) -> Result<(), Self::Error> {
        self.io.borrow_mut().flush().await
    }
}
