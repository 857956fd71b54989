//! The embedded broker: rumqttd's router in this process, reached through
//! its local links (`rumqttd::local`), the same path rumqttd's own network
//! links take once they have read a packet. There is no listener, no socket
//! and no credential: nothing else on the host can reach it.
//!
//! A session hands its checked frames to a [`LocalLink`], which decodes
//! them with rumqttd's own codec and queues the packets for the router;
//! what the router sends back is encoded again, so the session sees the
//! same bytes a socket would have carried.
//!
//! Two calls of rumqttd 0.20 block, and neither may stop a tokio worker:
//! - `LinkBuilder::build` sends on the router's bounded queue and then
//!   waits for the router's answer: it runs on the blocking pool, at most
//!   [`BUILD_SLOTS`] at a time.
//! - `LinkTx::send` is an `async fn` whose send on that queue blocks when
//!   the queue is full. Every other send goes through one gate that sends
//!   only while the queue has room for it and for every build that may be
//!   under way, so it never waits; when the router is that far behind, the
//!   session waits (asynchronously) until it catches up.

use std::future::Future;
use std::pin::pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use rumqttd::Notification;
use rumqttd::local::{LinkBuilder, LinkError, LinkRx, LinkTx};
use rumqttd::protocol::{
    DisconnectReasonCode, LastWill, LastWillProperties, Packet, Protocol, Publish,
    PublishProperties, v4::V4, v5::V5,
};
use tokio::sync::{Semaphore, mpsc};

use crate::broker::{BrokerError, EmbeddedLimits, router_config};

/// Links being built at once, each holding one place in the router's queue.
pub const BUILD_SLOTS: usize = 32;
/// Notifications encoded for a session in one read.
const BATCH: usize = 64;
/// Wills waiting to be published: beyond this, the oldest waits its turn.
const WILLS_QUEUED: usize = 1024;

/// What a link needs from the router.
struct LinkSpec {
    client_id: String,
    clean_session: bool,
    topic_alias_max: u16,
}

/// rumqttd's `LinkError` carries the router's event (800 bytes): only its
/// text is kept.
type BuildFn = dyn Fn(&LinkSpec) -> Result<(LinkTx, LinkRx, Notification), String> + Send + Sync;

/// The router's queue, seen from outside: rumqttd does not name its type.
struct Queue {
    build: Box<BuildFn>,
    /// Events waiting in the queue, and its capacity.
    backlog: Box<dyn Fn() -> (usize, usize) + Send + Sync>,
    /// The router thread is gone.
    gone: Box<dyn Fn() -> bool + Send + Sync>,
    gate: Mutex<()>,
    builds: Semaphore,
}

/// Why a packet could not reach the embedded broker.
#[derive(Debug, thiserror::Error)]
pub enum LocalError {
    #[error("the embedded broker refused the link: {0}")]
    Link(String),
    #[error("the embedded broker has stopped")]
    Stopped,
    #[error("cannot decode a packet for the embedded broker: {0:?}")]
    Codec(rumqttd::protocol::Error),
    #[error("the embedded broker did not answer the CONNECT with a CONNACK")]
    NoConnAck,
}

/// Polls a future that never waits (rumqttd's `send` and `wake` once the
/// gate has checked the queue's room) to its end.
fn at_once<F: Future>(future: F) -> Option<F::Output> {
    match pin!(future).poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(out) => Some(out),
        Poll::Pending => None,
    }
}

impl Queue {
    /// Runs `send` under the gate if the queue has room for one event
    /// beyond every build that may be under way; None if it has not.
    fn try_gated<T>(&self, send: &mut impl FnMut() -> Option<T>) -> Option<Result<T, LocalError>> {
        let _gate = self.gate.lock().unwrap_or_else(PoisonError::into_inner);
        if (self.gone)() {
            return Some(Err(LocalError::Stopped));
        }
        let (queued, capacity) = (self.backlog)();
        (queued + BUILD_SLOTS < capacity).then(|| send().ok_or(LocalError::Stopped))
    }

    /// [`Queue::try_gated`], waiting (asynchronously) until the router has
    /// caught up. The wait is boxed: it is rare, and a session's task
    /// should not carry its state all the time.
    async fn gated<T>(&self, mut send: impl FnMut() -> Option<T>) -> Result<T, LocalError> {
        if let Some(done) = self.try_gated(&mut send) {
            return done;
        }
        Box::pin(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(1)).await;
                if let Some(done) = self.try_gated(&mut send) {
                    return done;
                }
            }
        })
        .await
    }

    /// Queues `packets` for the router and tells it once.
    async fn push(&self, tx: &mut LinkTx, packets: Vec<Packet>) -> Result<(), LocalError> {
        let mut packets = packets.into_iter();
        let Some(last) = packets.next_back() else {
            return Ok(());
        };
        tx.buffer().extend(packets);
        // Boxed so that a waiting session does not hold a whole packet in
        // its task.
        let mut last = Some(Box::new(last));
        let sent = self
            .gated(move || last.take().and_then(|p| at_once(tx.send(*p))))
            .await?;
        sent.map(|_| ()).map_err(link_error)
    }

    /// Tells the router that a link it paused has room again.
    async fn wake(&self, rx: &LinkRx) -> Result<(), LocalError> {
        self.gated(|| at_once(rx.wake())).await?.map_err(link_error)
    }

    async fn link(
        self: &Arc<Self>,
        spec: LinkSpec,
    ) -> Result<(LinkTx, LinkRx, Notification), LocalError> {
        let _slot = self
            .builds
            .acquire()
            .await
            .map_err(|_| LocalError::Stopped)?;
        let queue = self.clone();
        tokio::task::spawn_blocking(move || (queue.build)(&spec))
            .await
            .map_err(|_| LocalError::Stopped)?
            .map_err(LocalError::Link)
    }
}

fn link_error(e: LinkError) -> LocalError {
    LocalError::Link(e.to_string())
}

/// The embedded broker. Cloning shares it.
#[derive(Clone)]
pub struct Embedded {
    queue: Arc<Queue>,
    wills: mpsc::Sender<Box<Will>>,
}

impl std::fmt::Debug for Embedded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Embedded(rumqttd router, in process)")
    }
}

/// A will to publish for a session that ended without a DISCONNECT.
#[derive(Debug)]
pub struct Will {
    publish: Publish,
    properties: Option<PublishProperties>,
    /// MQTT 5's Will Delay Interval, capped by the session's expiry.
    pub delay: Duration,
}

impl Embedded {
    /// Starts rumqttd's router on a thread of its own, and the link that
    /// publishes the wills of sessions the router has already dropped.
    /// Must run inside a tokio runtime (it spawns the will task).
    pub fn start(limits: &EmbeddedLimits) -> Result<Embedded, BrokerError> {
        let router = rumqttd::Router::new(0, router_config(limits));
        let tx = router.spawn();
        let build = {
            let tx = tx.clone();
            move |spec: &LinkSpec| {
                LinkBuilder::new(&spec.client_id, tx.clone())
                    .clean_session(spec.clean_session)
                    // Devices publish to their own topics, which nobody
                    // may have subscribed to yet.
                    .dynamic_filters(true)
                    .topic_alias_max(spec.topic_alias_max)
                    .build()
                    .map_err(|e| e.to_string())
            }
        };
        let backlog = {
            let tx = tx.clone();
            move || (tx.len(), tx.capacity().unwrap_or(usize::MAX))
        };
        let queue = Arc::new(Queue {
            build: Box::new(build),
            backlog: Box::new(backlog),
            gone: Box::new(move || tx.is_disconnected()),
            gate: Mutex::new(()),
            builds: Semaphore::new(BUILD_SLOTS),
        });
        let (link_tx, link_rx, _) = (queue.build)(&LinkSpec {
            // Device and service client ids all have a prefix with a
            // colon (`device:`, `service:`), so this one is nobody's.
            client_id: "twofold:wills".into(),
            clean_session: true,
            topic_alias_max: 0,
        })
        .map_err(BrokerError::Embedded)?;
        let (wills, pending) = mpsc::channel(WILLS_QUEUED);
        tokio::spawn(publish_wills(queue.clone(), link_tx, link_rx, pending));
        tracing::info!("embedded broker running in process, with no listener");
        Ok(Embedded { queue, wills })
    }

    /// The router thread still runs.
    pub fn is_running(&self) -> bool {
        !(self.queue.gone)()
    }

    /// Publishes `will` now (a delay is the caller's to wait out).
    pub async fn publish_will(&self, will: Box<Will>) {
        let _ = self.wills.send(will).await;
    }

    /// Connects a session: `connect` is the CONNECT the session wrote for
    /// the broker. Returns the link and the router's CONNACK, encoded.
    pub async fn connect(
        &self,
        mqtt5: bool,
        connect: &[u8],
    ) -> Result<(LocalLink, Bytes), LocalError> {
        let codec = if mqtt5 { Codec::V5 } else { Codec::V4 };
        let packet = codec.read(&mut BytesMut::from(connect))?;
        let Packet::Connect(connect, properties, will, will_properties, _) = packet else {
            return Err(LocalError::NoConnAck);
        };
        let session_expiry = properties
            .as_ref()
            .and_then(|p| p.session_expiry_interval)
            .unwrap_or(0);
        let spec = LinkSpec {
            client_id: connect.client_id,
            clean_session: connect.clean_session,
            topic_alias_max: properties
                .as_ref()
                .and_then(|p| p.topic_alias_max)
                .unwrap_or(0),
        };
        let (tx, rx, ack) = self.queue.link(spec).await?;
        let Some(connack @ Packet::ConnAck(..)) = Option::<Packet>::from(ack) else {
            return Err(LocalError::NoConnAck);
        };
        let mut out = BytesMut::new();
        codec.write(connack, &mut out)?;
        let will = will.map(|w| Box::new(make_will(w, will_properties, session_expiry)));
        let link = LocalLink {
            queue: self.queue.clone(),
            tx,
            rx,
            codec,
            will,
            ended: false,
            dropped: false,
            wake: false,
        };
        Ok((link, out.freeze()))
    }
}

/// The will as the PUBLISH the router gets. rumqttd 0.20 delivers every
/// message at the QoS its subscription was granted, whatever it was
/// published with, and lets a link publish only at QoS 0
/// (`Publish::new`), which also needs no acknowledgement.
fn make_will(will: LastWill, properties: Option<LastWillProperties>, expiry: u32) -> Will {
    let delay = properties
        .as_ref()
        .and_then(|p| p.delay_interval)
        .unwrap_or(0)
        .min(expiry);
    let publish = Publish::new(will.topic, will.message, will.retain);
    let properties = properties.map(|p| PublishProperties {
        payload_format_indicator: p.payload_format_indicator,
        message_expiry_interval: p.message_expiry_interval,
        response_topic: p.response_topic,
        correlation_data: p.correlation_data,
        user_properties: p.user_properties,
        content_type: p.content_type,
        ..Default::default()
    });
    Will {
        publish,
        properties,
        delay: Duration::from_secs(delay.into()),
    }
}

/// Publishes wills on the gateway's own link, and drains what the router
/// sends that link (acknowledgements).
async fn publish_wills(
    queue: Arc<Queue>,
    mut tx: LinkTx,
    mut rx: LinkRx,
    mut pending: mpsc::Receiver<Box<Will>>,
) {
    loop {
        tokio::select! {
            will = pending.recv() => {
                let Some(will) = will else { return };
                let Will { publish, properties, .. } = *will;
                let packet = Packet::Publish(publish, properties);
                if let Err(e) = queue.push(&mut tx, vec![packet]).await {
                    tracing::error!(error = %e, "cannot publish a will");
                    return;
                }
            }
            notification = rx.next() => match notification {
                Ok(Some(Notification::Unschedule)) => {
                    if queue.wake(&rx).await.is_err() {
                        return;
                    }
                }
                Ok(_) => {}
                Err(_) => return,
            }
        }
    }
}

#[derive(Clone, Copy)]
enum Codec {
    V4,
    V5,
}

impl Codec {
    fn read(self, buf: &mut BytesMut) -> Result<Packet, LocalError> {
        // The session has checked each frame's size against its limit.
        match self {
            Codec::V4 => V4.read_mut(buf, usize::MAX),
            Codec::V5 => V5.read_mut(buf, usize::MAX),
        }
        .map_err(LocalError::Codec)
    }

    fn write(self, packet: Packet, out: &mut BytesMut) -> Result<(), LocalError> {
        match self {
            Codec::V4 => V4.write(packet, out),
            Codec::V5 => V5.write(packet, out),
        }
        .map(|_| ())
        .map_err(LocalError::Codec)
    }
}

/// One session's link to the embedded broker.
pub struct LocalLink {
    queue: Arc<Queue>,
    tx: LinkTx,
    rx: LinkRx,
    codec: Codec,
    will: Option<Box<Will>>,
    /// The session sent DISCONNECT: the router has forgotten it.
    ended: bool,
    /// The router dropped this link (a takeover, or the router stopped).
    dropped: bool,
    /// The router paused this link until it is told there is room.
    wake: bool,
}

impl LocalLink {
    /// Passes whole frames from the session to the router.
    pub async fn send(&mut self, frames: &[u8]) -> Result<(), LocalError> {
        if self.ended || self.dropped {
            return Ok(());
        }
        let packets = self.decode(frames)?;
        self.queue.push(&mut self.tx, packets).await
    }

    /// The packets in `frames`, up to a DISCONNECT (preceded by the will
    /// when it asks for it).
    fn decode(&mut self, frames: &[u8]) -> Result<Vec<Packet>, LocalError> {
        let mut buf = BytesMut::from(frames);
        let mut packets = Vec::new();
        while !buf.is_empty() {
            let packet = self.codec.read(&mut buf)?;
            if let Packet::Disconnect(disconnect, _) = &packet {
                self.ended = true;
                let with_will =
                    disconnect.reason_code == DisconnectReasonCode::DisconnectWithWillMessage;
                if let Some(will) = self.will.take().filter(|_| with_will) {
                    let Will {
                        publish,
                        properties,
                        ..
                    } = *will;
                    packets.push(Packet::Publish(publish, properties));
                }
                packets.push(packet);
                break;
            }
            packets.push(packet);
        }
        Ok(packets)
    }

    /// Waits for what the router sends this link and appends it to `buf`,
    /// encoded; false once the router has dropped the link.
    pub async fn recv(&mut self, buf: &mut BytesMut) -> Result<bool, LocalError> {
        if self.wake {
            // Cleared only once sent: this future may be dropped while
            // it waits for the gate.
            self.queue.wake(&self.rx).await?;
            self.wake = false;
        }
        let first = match self.rx.next().await {
            Ok(n) => n,
            Err(_) => {
                self.dropped = true;
                return Ok(false);
            }
        };
        let mut next = first;
        let mut taken = 0;
        while let Some(notification) = next.take() {
            match Option::<Packet>::from(notification) {
                Some(packet) => self.codec.write(packet, buf)?,
                // Unschedule: the router waits to hear there is room,
                // which there is once the session has passed this on.
                None => self.wake = true,
            }
            taken += 1;
            if taken == BATCH {
                break;
            }
            next = match at_once(self.rx.next()) {
                Some(Ok(n)) => n,
                Some(Err(_)) => {
                    self.dropped = true;
                    None
                }
                None => None,
            };
        }
        Ok(true)
    }

    /// Ends the link. Without a DISCONNECT from the session, the will is
    /// returned for the caller to publish (now, or after its delay), and
    /// the router is told the session ended.
    pub async fn close(mut self) -> Option<Box<Will>> {
        if self.ended {
            return None;
        }
        let will = self.will.take();
        if !self.dropped {
            self.ended = true;
            let disconnect = Packet::Disconnect(
                rumqttd::protocol::Disconnect {
                    reason_code: DisconnectReasonCode::NormalDisconnection,
                },
                None,
            );
            let _ = self.queue.push(&mut self.tx, vec![disconnect]).await;
        }
        will
    }
}
