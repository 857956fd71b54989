//! The I/O shell: one tokio task per session reads both streams, hands
//! what it reads to the [`Session`](super::Session) and performs the
//! actions it returns.

use super::*;

pub(super) type UpstreamHalves = (
    Box<dyn AsyncRead + Send + Unpin>,
    Box<dyn AsyncWrite + Send + Unpin>,
);

/// Opens the connection to the broker, over TLS for `mqtts://`.
pub(super) async fn connect_upstream(
    addr: SocketAddr,
    tls: Option<&UpstreamTls>,
) -> std::io::Result<UpstreamHalves> {
    let tcp = TcpStream::connect(addr).await?;
    let _ = tcp.set_nodelay(true);
    Ok(match tls {
        None => {
            let (rd, wr) = tcp.into_split();
            (Box::new(rd), Box::new(wr))
        }
        Some(tls) => {
            let stream = tls.connector.connect(tls.server_name.clone(), tcp).await?;
            let (rd, wr) = tokio::io::split(stream);
            (Box::new(rd), Box::new(wr))
        }
    })
}

/// The most bytes of queued messages joined into one write to a device.
pub(super) const WRITE_BATCH: usize = 16 * 1024;
/// Runs a session to its end. Every refusal is audited exactly once.
pub async fn run<S>(
    stream: S,
    peer: Peer,
    broker: BrokerTarget,
    limits: Limits,
    audit: Audit,
    mut revocations: watch::Receiver<Arc<RevocationList>>,
    mut shutdown: watch::Receiver<bool>,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let refuse = |reason: Reason, detail: String, client_id: Option<&str>| {
        let mut e = Event::refused(peer.addr, reason, detail)
            .with_certificate(Some(peer.cert.clone()))
            .with_identity(peer.identity.clone());
        if let Some(id) = client_id {
            e = e.with_client_id(id);
        }
        audit.record(&e);
    };
    let (mut rd, mut wr) = tokio::io::split(stream);
    let max = limits.max_packet_size;
    let mut buf = BytesMut::with_capacity(512);

    let frame =
        match tokio::time::timeout(limits.connect_timeout, read_connect(&mut rd, &mut buf, max))
            .await
        {
            Err(_) => {
                return refuse(
                    Reason::HandshakeTimeout,
                    format!("no CONNECT within {:?}", limits.connect_timeout),
                    None,
                );
            }
            Ok(Err(FrameError::Closed | FrameError::Broken(_))) => return,
            Ok(Err(FrameError::TooLarge(n))) => {
                return refuse(
                    Reason::ProtocolError,
                    format!("first packet is {n} bytes; the limit is {max}"),
                    None,
                );
            }
            Ok(Err(FrameError::Malformed(e))) => {
                return refuse(
                    Reason::ProtocolError,
                    format!("malformed packet: {e}"),
                    None,
                );
            }
            Ok(Ok(frame)) => frame,
        };

    let credential = broker.credential.as_ref();
    let quirks = if broker.embedded {
        Quirks::EMBEDDED
    } else {
        Quirks::NONE
    };
    let (version, connect) = match admit(frame, &peer.principal, credential, max, quirks) {
        Ok(admitted) => admitted,
        Err(refusal) => {
            if let Some(reply) = &refusal.reply {
                let _ = wr.write_all(reply).await;
                let _ = wr.shutdown().await;
            }
            return refuse(refusal.reason, refusal.detail, refusal.client_id.as_deref());
        }
    };
    let client_id = connect.client_id.clone();

    let addr = match version {
        Version::V311 => broker.v4,
        Version::V5 => broker.v5,
    };
    let unavailable = match version {
        Version::V311 => v4_connack(v4::ConnectReturnCode::ServiceUnavailable),
        Version::V5 => v5_connack(v5::ConnectReturnCode::ServerUnavailable),
    };
    let upstream =
        match tokio::time::timeout(BROKER_TIMEOUT, connect_upstream(addr, broker.tls.as_ref()))
            .await
        {
            Ok(Ok(s)) => s,
            failed => {
                let error = match failed {
                    Ok(Err(e)) => e.to_string(),
                    _ => "timed out".into(),
                };
                tracing::error!(broker = %addr, %error, "cannot reach the broker");
                let _ = wr.write_all(&unavailable).await;
                return refuse(
                    Reason::BrokerUnavailable,
                    format!("cannot reach the broker at {addr}: {error}"),
                    Some(&client_id),
                );
            }
        };
    let (mut up_rd, mut up_wr) = upstream;
    let mut up_buf = BytesMut::with_capacity(READ_CHUNK_MIN);
    // The session exists once the broker has accepted it: the device's
    // later packets wait in its socket until then.
    let connack = async {
        up_wr.write_all(&connect.forward).await.ok()?;
        read_frame(&mut up_rd, &mut up_buf, usize::MAX).await.ok()
    };
    let connack = match tokio::time::timeout(BROKER_TIMEOUT, connack).await {
        Ok(Some(frame)) => answer_connack(version, frame, &connect, &peer.principal, max),
        _ => Err(("no CONNACK from the broker".to_owned(), unavailable)),
    };
    let connack = match connack {
        Ok(connack) => connack,
        Err((why, reply)) => {
            let _ = wr.write_all(&reply).await;
            let _ = wr.shutdown().await;
            return refuse(Reason::BrokerUnavailable, why, Some(&client_id));
        }
    };
    let metrics = audit.metrics().clone();
    metrics.session_started(peer.cert.not_after);
    let presence = audit.presence().clone();
    let broker_id = identity::broker_client_id(&peer.principal, &client_id);
    let (token, previous) = presence.arrive(&broker_id, peer.addr);
    audit.record(
        &Event::new(EventKind::Connected, peer.addr)
            .with_identity(peer.identity.clone())
            .with_client_id(client_id.clone())
            .with_certificate(Some(peer.cert.clone())),
    );
    if let Some(previous) = previous {
        audit.record(&Event::taken_over(&peer, &client_id, previous));
    }

    let mut session = Session::new(
        version,
        peer.principal,
        max,
        quirks,
        connect.keep_alive,
        Instant::now(),
    );
    // One writer owns the device side, so that a slow device holds up
    // only its own session; what it gets is in order already.
    let (to_device, outbox) = mpsc::channel::<Bytes>(16);
    let _ = to_device.send(connack).await;
    let writer = tokio::spawn(device_writer(wr, outbox));
    let mut device_reads = Reads::new();
    let mut broker_reads = Reads::new();
    let mut watching = true;
    // Bytes the broker sent after its CONNACK come first.
    let mut actions = session.handle_broker(&mut up_buf);
    // Why the session ended, when neither side simply closed it.
    let mut ended: Option<String>;
    'session: loop {
        for action in actions.drain(..) {
            match action {
                Action::ToDevice(bytes) => {
                    if to_device.send(bytes).await.is_err() {
                        ended = Some("the device's connection failed".into());
                        break 'session;
                    }
                }
                Action::ToBroker(frames) => {
                    if up_wr.write_all(&frames).await.is_err() {
                        ended = Some("the broker connection failed".into());
                        break 'session;
                    }
                }
                Action::Refused(reason, detail) => refuse(reason, detail, Some(&client_id)),
                Action::Relayed {
                    direction,
                    messages,
                    bytes,
                } => metrics.relayed(direction, messages, bytes),
                Action::Close(why) => {
                    ended = why;
                    break 'session;
                }
            }
        }
        let deadline = session.poll_timeout();
        let silence = async {
            match deadline {
                Some(at) => tokio::time::sleep_until(at.into()).await,
                None => std::future::pending().await,
            }
        };
        actions = tokio::select! {
            read = device_reads.frame(&mut rd, &mut buf, max) => match read {
                Ok(()) => session.handle_device(&mut buf, Instant::now()),
                Err(FrameError::Broken(e)) => session.handle_device_end(Some(e)),
                Err(_) => session.handle_device_end(None),
            },
            read = broker_reads.more(&mut up_rd, &mut up_buf) => match read {
                Read::Data => session.handle_broker(&mut up_buf),
                Read::End | Read::Failed(_) => session.handle_broker_end(),
            },
            _ = shutdown.changed() => session.handle_shutdown(),
            changed = revocations.changed(), if watching => {
                if changed.is_err() {
                    watching = false;
                    Vec::new()
                } else {
                    let revoked = revocations
                        .borrow_and_update()
                        .is_revoked(&peer.cert.issuer, &peer.cert.serial);
                    session.handle_revocation(revoked)
                }
            }
            _ = silence => session.handle_timeout(Instant::now()),
        };
    }
    metrics.session_ended(peer.cert.not_after);
    drop(to_device);
    let _ = tokio::time::timeout(Duration::from_secs(2), writer).await;
    // A lingering close: what the device still sends is read and dropped
    // until it closes too (at most half a second), since closing a socket
    // with unread bytes resets it, and the reset can destroy the last
    // packet (a DISCONNECT with its reason) before the device reads it.
    let _ = tokio::time::timeout(Duration::from_millis(500), async {
        let mut sink = [0u8; 1024];
        while matches!(rd.read(&mut sink).await, Ok(n) if n > 0) {}
    })
    .await;
    if let Some(holder) = presence.leave(&broker_id, token) {
        ended = Some(format!(
            "taken over by another connection of this identity from {holder}"
        ));
    }
    let mut event = Event::new(EventKind::Disconnected, peer.addr)
        .with_identity(peer.identity.clone())
        .with_client_id(client_id);
    if let Some(why) = ended {
        event = event.with_detail(why);
    }
    audit.record(&event);
}

/// Writes what the session sends the device, joining what is queued
/// into one write (and as few TLS records as its size allows), until the
/// session drops its end; then closes the TLS stream.
pub(super) async fn device_writer<W: AsyncWrite + Unpin>(
    mut wr: W,
    mut outbox: mpsc::Receiver<Bytes>,
) {
    while let Some(first) = outbox.recv().await {
        let mut bytes = first;
        if bytes.len() < WRITE_BATCH
            && let Ok(next) = outbox.try_recv()
        {
            let mut joined = BytesMut::with_capacity(WRITE_BATCH);
            joined.extend_from_slice(&bytes);
            joined.extend_from_slice(&next);
            while joined.len() < WRITE_BATCH {
                let Ok(next) = outbox.try_recv() else { break };
                joined.extend_from_slice(&next);
            }
            bytes = joined.freeze();
        }
        if wr.write_all(&bytes).await.is_err() || wr.flush().await.is_err() {
            break;
        }
    }
    let _ = wr.shutdown().await;
}

/// How long the broker has to accept a connection and answer a CONNECT.
pub(super) const BROKER_TIMEOUT: Duration = Duration::from_secs(5);
