//! The I/O shell: one tokio task per session reads both streams, hands
//! what it reads to the [`Session`](super::Session) and performs the
//! actions it returns.

use super::*;

/// The session's other end: a socket to an external broker, or a link to
/// the embedded one.
enum Upstream {
    Socket {
        rd: Box<dyn AsyncRead + Send + Unpin>,
        wr: Box<dyn AsyncWrite + Send + Unpin>,
        reads: Reads,
    },
    Local(Box<LocalLink>),
}

impl Upstream {
    /// Connects and sends the session's CONNECT; returns the upstream and
    /// the broker's CONNACK frame (with what followed it in `buf`).
    async fn open(
        broker: &BrokerTarget,
        version: Version,
        connect: &[u8],
        buf: &mut BytesMut,
    ) -> Result<(Upstream, BytesMut), String> {
        match broker {
            BrokerTarget::Embedded(embedded) => {
                let (link, connack) = embedded
                    .connect(version == Version::V5, connect)
                    .await
                    .map_err(|e| e.to_string())?;
                Ok((
                    Upstream::Local(Box::new(link)),
                    BytesMut::from(&connack[..]),
                ))
            }
            BrokerTarget::External(external) => {
                let (addr, rd, mut wr) = connect_upstream(external).await?;
                let mut rd: Box<dyn AsyncRead + Send + Unpin> = rd;
                wr.write_all(connect)
                    .await
                    .map_err(|e| format!("the broker at {addr} failed: {e}"))?;
                let frame = read_frame(&mut rd, buf, usize::MAX)
                    .await
                    .map_err(|_| format!("no CONNACK from the broker at {addr}"))?;
                let reads = Reads::new();
                Ok((Upstream::Socket { rd, wr, reads }, frame))
            }
        }
    }

    async fn send(&mut self, frames: &[u8]) -> bool {
        match self {
            Upstream::Socket { wr, .. } => wr.write_all(frames).await.is_ok(),
            Upstream::Local(link) => match link.send(frames).await {
                Ok(()) => true,
                Err(e) => {
                    tracing::error!(error = %e, "embedded broker");
                    false
                }
            },
        }
    }

    /// Reads what the broker sends next into `buf`.
    async fn more(&mut self, buf: &mut BytesMut) -> Read {
        match self {
            Upstream::Socket { rd, reads, .. } => reads.more(rd, buf).await,
            // Boxed: the wait's state would otherwise sit in every idle
            // session's task (its size sets its allocation class).
            Upstream::Local(link) => match Box::pin(link.recv(buf)).await {
                Ok(true) => Read::Data,
                Ok(false) => Read::End,
                Err(e) => {
                    tracing::error!(error = %e, "embedded broker");
                    Read::End
                }
            },
        }
    }

    /// Ends the upstream; returns the will the embedded broker did not
    /// publish itself.
    async fn close(self) -> Option<Box<Will>> {
        match self {
            Upstream::Socket { .. } => None,
            Upstream::Local(link) => link.close().await,
        }
    }
}

/// Opens the connection to an external broker, over TLS for `mqtts://`:
/// at the first of its nodes that answers within a second.
async fn connect_upstream(external: &External) -> Result<UpstreamHalves, String> {
    let mut failed = Vec::new();
    for node in &external.nodes {
        let addr = node.addr;
        let tcp = match tokio::time::timeout(NODE_TIMEOUT, TcpStream::connect(addr)).await {
            Ok(Ok(tcp)) => tcp,
            Ok(Err(e)) => {
                failed.push(format!("{addr}: {e}"));
                continue;
            }
            Err(_) => {
                failed.push(format!("{addr}: no answer within 1 s"));
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        return match &external.tls {
            None => {
                let (rd, wr) = tcp.into_split();
                Ok((addr, Box::new(rd), Box::new(wr)))
            }
            Some(tls) => {
                let stream = tls
                    .connector
                    .connect(node.server_name.clone(), tcp)
                    .await
                    .map_err(|e| format!("cannot reach the broker at {addr}: {e}"))?;
                let (rd, wr) = tokio::io::split(stream);
                Ok((addr, Box::new(rd), Box::new(wr)))
            }
        };
    }
    Err(format!("cannot reach the broker: {}", failed.join("; ")))
}

/// A connection to a broker's node: its address and both halves.
type UpstreamHalves = (
    SocketAddr,
    Box<dyn AsyncRead + Send + Unpin>,
    Box<dyn AsyncWrite + Send + Unpin>,
);

/// How long a node of an external broker has to accept the connection
/// before the next is tried.
const NODE_TIMEOUT: Duration = Duration::from_secs(1);

/// What a session talks to besides its device.
pub struct Backends {
    pub broker: BrokerTarget,
    /// The topic policy in force.
    pub policy: crate::policy::InForce,
    /// The CA service renewals go to, if the gateway has one.
    pub ca: Option<Arc<crate::renewal::CaClient>>,
}

/// The most bytes of queued messages joined into one write to a device.
pub(super) const WRITE_BATCH: usize = 16 * 1024;
/// Runs a session to its end. Every refusal is audited exactly once.
pub async fn run<S>(
    stream: S,
    peer: Peer,
    backends: Backends,
    limits: Limits,
    audit: Audit,
    mut tls: watch::Receiver<Arc<TlsContext>>,
    mut shutdown: watch::Receiver<bool>,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let Backends { broker, policy, ca } = backends;
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

    let (credential, quirks) = match &broker {
        BrokerTarget::Embedded(_) => (None, Quirks::EMBEDDED),
        BrokerTarget::External(external) => (external.credential.as_ref(), external.quirks()),
    };
    let (version, connect) = match admit(frame, &peer.principal, &policy, credential, max, quirks) {
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

    let unavailable = match version {
        Version::V311 => v4_connack(v4::ConnectReturnCode::ServiceUnavailable),
        Version::V5 => v5_connack(v5::ConnectReturnCode::ServerUnavailable),
    };
    let mut up_buf = BytesMut::with_capacity(READ_CHUNK_MIN);
    // The session exists once the broker has accepted it: the device's
    // later packets wait in its socket until then.
    // Boxed: its state is large and only needed until the CONNACK, while
    // the session's task lives as long as the session.
    let opened = tokio::time::timeout(
        BROKER_TIMEOUT,
        Box::pin(Upstream::open(
            &broker,
            version,
            &connect.forward,
            &mut up_buf,
        )),
    )
    .await
    .unwrap_or_else(|_| Err("no CONNACK from the broker within 5 s".into()));
    let (mut upstream, connack) = match opened {
        Ok((upstream, frame)) => (
            Some(upstream),
            answer_connack(version, frame, &connect, &peer.principal, max, quirks),
        ),
        Err(why) => {
            tracing::error!(error = %why, "cannot open a session at the broker");
            (None, Err((why, unavailable)))
        }
    };
    let connack = match connack {
        Ok(connack) => connack,
        Err((why, reply)) => {
            if let Some(upstream) = upstream.take() {
                Box::pin(upstream.close()).await;
            }
            let _ = wr.write_all(&reply).await;
            let _ = wr.shutdown().await;
            return refuse(Reason::BrokerUnavailable, why, Some(&client_id));
        }
    };
    let Some(mut upstream) = upstream.take() else {
        return;
    };
    let metrics = audit.metrics().clone();
    metrics.session_started(peer.cert.not_after);
    let presence = audit.presence().clone();
    let broker_id = identity::broker_client_id(&peer.principal, &client_id);
    let (token, previous) = presence.arrive(&broker_id, peer.addr);

    let started = Instant::now();
    let life = CertLife {
        serial: peer
            .cert
            .serial
            .parse::<twofold_trust::Serial>()
            .map(|s| s.as_bytes().to_vec())
            .unwrap_or_default(),
        not_after: peer.cert.not_after,
        due: twofold_trust::renewal::due_at(
            peer.cert.not_before,
            peer.cert.not_after,
            peer.principal.name(),
        ),
        unix: time::OffsetDateTime::now_utc().unix_timestamp(),
        at: started,
    };
    let mut session = Session::new(
        version,
        peer.principal,
        max,
        quirks,
        connect.keep_alive,
        started,
    )
    .with_certificate(life)
    .with_policy(policy);
    let mut connected = Event::new(EventKind::Connected, peer.addr)
        .with_identity(peer.identity.clone())
        .with_client_id(client_id.clone())
        .with_certificate(Some(peer.cert.clone()));
    if let Some(why) = session.renew_only() {
        connected = connected.with_detail(format!("renew-only session: {why}"));
    }
    audit.record(&connected);
    if let Some(previous) = previous {
        audit.record(&Event::taken_over(&peer, &client_id, previous));
    }
    // One writer owns the device side, so that a slow device holds up
    // only its own session; what it gets is in order already.
    let (to_device, outbox) = mpsc::channel::<Bytes>(16);
    let _ = to_device.send(connack).await;
    let writer = tokio::spawn(device_writer(wr, outbox));
    let mut device_reads = Reads::new();
    let mut watching = true;
    // The CA's answer to the session's renew request or commit, if one
    // is with it (the session allows one at a time).
    let mut with_ca: Option<CaCall> = None;
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
                    if !upstream.send(&frames).await {
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
                Action::Cert(request) => {
                    with_ca = Some(Box::pin(ask_ca(ca.clone(), peer.clone(), request)));
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
            read = upstream.more(&mut up_buf) => match read {
                Read::Data => session.handle_broker(&mut up_buf),
                Read::End | Read::Failed(_) => session.handle_broker_end(),
            },
            _ = shutdown.changed() => session.handle_shutdown(),
            changed = tls.changed(), if watching => {
                if changed.is_err() {
                    watching = false;
                    Vec::new()
                } else {
                    let revoked = tls
                        .borrow_and_update()
                        .revocations
                        .is_revoked(&peer.cert.issuer, &peer.cert.serial);
                    session.handle_revocation(revoked)
                }
            }
            _ = silence => session.handle_timeout(Instant::now()),
            reply = async { with_ca.as_mut().expect("guarded").await }, if with_ca.is_some() => {
                with_ca = None;
                session.handle_cert_reply(reply)
            }
        };
    }
    metrics.session_ended(peer.cert.not_after);
    // A will without a delay goes out at once; a delayed one once this
    // connection has left the session (below).
    // Boxed, as the other rare steps: the task's size is its largest state.
    let mut will = Box::pin(upstream.close()).await;
    if let (BrokerTarget::Embedded(embedded), Some(now)) =
        (&broker, will.take_if(|w| w.delay.is_zero()))
    {
        let embedded = embedded.clone();
        tokio::spawn(async move { embedded.publish_will(now).await });
    }
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
    if let (Some(will), BrokerTarget::Embedded(embedded)) = (will, &broker) {
        publish_will(embedded.clone(), will, presence.clone(), broker_id);
    }
    let mut event = Event::new(EventKind::Disconnected, peer.addr)
        .with_identity(peer.identity.clone())
        .with_client_id(client_id);
    if let Some(why) = ended {
        event = event.with_detail(why);
    }
    audit.record(&event);
}

/// The CA's answer on its way; boxed, so that an idle session carries
/// one pointer for it.
type CaCall = std::pin::Pin<Box<dyn std::future::Future<Output = CertReply> + Send>>;

/// Takes `request` of `peer` to the CA service.
async fn ask_ca(
    ca: Option<Arc<crate::renewal::CaClient>>,
    peer: Peer,
    request: CertRequest,
) -> CertReply {
    let Some(ca) = ca else {
        return CertReply::Refused {
            request_id: request.request_id().to_owned(),
            code: RenewRefusal::Unavailable,
            retry_after: 3600,
            reason: "this gateway renews no certificates (no [ca_service] configured); \
                     re-enroll the device before its certificate expires"
                .into(),
        };
    };
    let kind = match &request {
        CertRequest::Renew { csr: None, .. } => "renew",
        CertRequest::Renew { csr: Some(_), .. } => "rekey",
        CertRequest::Commit => "commit",
    };
    let reply = ca.call(&peer.identity, &peer.cert.serial, request).await;
    match &reply {
        CertReply::Issued { request_id, .. } => {
            tracing::info!(identity = %peer.identity, kind, request_id, "certificate issued");
        }
        CertReply::Committed { .. } => {
            tracing::info!(identity = %peer.identity, "renewed certificate committed");
        }
        CertReply::Refused { code, reason, .. } => {
            tracing::info!(identity = %peer.identity, kind, ?code, reason, "renewal refused");
        }
    }
    reply
}

/// Publishes a will on the embedded broker after its delay, unless the
/// session has been taken up again by then (MQTT 5, 3.1.3.2.2).
fn publish_will(embedded: Embedded, will: Box<Will>, presence: Arc<Presence>, broker_id: String) {
    tokio::spawn(async move {
        tokio::time::sleep(will.delay).await;
        if !presence.is_held(&broker_id) {
            embedded.publish_will(will).await;
        }
    });
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
