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
//! - the handshake [`Gate`], which keeps the device's second flight in
//!   until the server has proven itself.
//!
//! A `&Link` is what embedded-tls gets as its socket, so the session keeps
//! its own `&Link` to wait on while the TLS connection holds another.
//! The session never polls two link operations at the same time (a wait
//! is dropped before TLS reads or writes), so the `RefCell` borrow held
//! across each await never meets another.
#![allow(clippy::await_holding_refcell_ref)]

use core::cell::{Cell, RefCell};

use embedded_io::{Error as _, ErrorKind};
use embedded_io_async::{ErrorType, Read, Write};
use embedded_tls::alert::AlertDescription;

/// A link with a one-byte lookahead, byte counters and a handshake gate.
pub struct Link<T> {
    io: RefCell<T>,
    peeked: Cell<Option<u8>>,
    received: Cell<u64>,
    sent: Cell<u64>,
    gate: Gate,
}

/// The handshake gate.
///
/// embedded-tls 0.19 sends the device's second flight (Certificate,
/// CertificateVerify, Finished) as soon as the server's Finished checks
/// out, whether or not the server sent a Certificate and a
/// CertificateVerify: its handshake never insists on them, the verifier
/// is only called when they come, and nothing the provider is asked
/// afterwards can end the handshake (`client_cert()` can only decline,
/// which sends an empty Certificate and a Finished). So the link does it:
/// once [armed](Gate::arm), it lets the ClientHello out, and from the
/// server's first byte on it writes nothing until the verifier
/// [opens](Gate::open) the gate (chain and CertificateVerify verified).
/// A write held back fails with `PermissionDenied`, which ends the
/// handshake before anything of the device's identity is sent or signed.
#[derive(Default)]
pub struct Gate(Cell<Phase>);

#[derive(Clone, Copy, Default, PartialEq, Eq)]
enum Phase {
    /// Not armed: everything passes (a link used without the gate).
    #[default]
    Unguarded,
    /// Armed, nothing received yet: the ClientHello may go.
    Hello,
    /// The server has spoken and not proven itself.
    Held,
    /// As `Held`, and a write has been held back.
    HeldBack,
    /// The server has proven itself.
    Open,
}

impl Gate {
    /// Guards the handshake about to start.
    pub fn arm(&self) {
        self.0.set(Phase::Hello);
    }

    /// The server has proven itself: the device may answer.
    pub fn open(&self) {
        self.0.set(Phase::Open);
    }

    /// Whether a write was held back because the server had not proven
    /// itself.
    pub fn held_back(&self) -> bool {
        self.0.get() == Phase::HeldBack
    }

    fn received(&self) {
        if self.0.get() == Phase::Hello {
            self.0.set(Phase::Held);
        }
    }

    fn may_write(&self) -> bool {
        match self.0.get() {
            Phase::Unguarded | Phase::Hello | Phase::Open => true,
            Phase::Held | Phase::HeldBack => {
                self.0.set(Phase::HeldBack);
                false
            }
        }
    }
}

impl<T: Read + Write> Link<T> {
    pub fn new(io: T) -> Self {
        Link {
            io: RefCell::new(io),
            peeked: Cell::new(None),
            received: Cell::new(0),
            sent: Cell::new(0),
            gate: Gate::default(),
        }
    }

    /// The handshake gate of this link.
    pub fn gate(&self) -> &Gate {
        &self.gate
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
            self.gate.received();
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

    /// Sends a fatal TLS alert as a plaintext record, past the gate: the
    /// device refusing the server during the handshake, so the gateway can
    /// record why.
    ///
    /// Plaintext because embedded-tls 0.19 offers no way to send an alert
    /// under the handshake keys (its own handshake alerts go out as
    /// plaintext records typed ChangeCipherSpec, which servers reject as
    /// a malformed ChangeCipherSpec). A TLS 1.3 server takes a plaintext
    /// alert until it has decrypted a record from the client (rustls
    /// does), and nothing encrypted has left the device by then.
    pub async fn send_alert(&self, description: AlertDescription) -> Result<(), ErrorKind> {
        const FATAL: u8 = 2;
        let record = [21, 3, 3, 0, 2, FATAL, description as u8];
        let mut io = self.io.borrow_mut();
        io.write_all(&record).await.map_err(|e| e.kind())?;
        self.sent.set(self.sent.get() + record.len() as u64);
        io.flush().await.map_err(|e| e.kind())
    }

    /// The link itself, e.g. to close a socket.
    pub fn into_inner(self) -> T {
        self.io.into_inner()
    }
}

impl<T: ErrorType> ErrorType for &Link<T> {
    type Error = ErrorKind;
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
        let n = self.io.borrow_mut().read(buf).await.map_err(|e| e.kind())?;
        self.received.set(self.received.get() + n as u64);
        if n > 0 {
            self.gate.received();
        }
        Ok(n)
    }
}

impl<T: Read + Write> Write for &Link<T> {
    async fn write(&mut self, buf: &[u8]) -> Result<usize, Self::Error> {
        if !self.gate.may_write() {
            return Err(ErrorKind::PermissionDenied);
        }
        let n = self
            .io
            .borrow_mut()
            .write(buf)
            .await
            .map_err(|e| e.kind())?;
        self.sent.set(self.sent.get() + n as u64);
        Ok(n)
    }

    async fn flush(&mut self) -> Result<(), Self::Error> {
        self.io.borrow_mut().flush().await.map_err(|e| e.kind())
    }
}
