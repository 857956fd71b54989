//! What the benchmarks share: an MQTT 3.1.1 client over mutual TLS,
//! packet by packet.

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::BytesMut;
use rumqttc::mqttbytes;
use rumqttc::mqttbytes::v4::{self, Packet};
use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

pub type Stream = TlsStream<TcpStream>;

pub async fn read_packet(s: &mut Stream, buf: &mut BytesMut) -> std::io::Result<Packet> {
    loop {
        match Packet::read(buf, 1 << 20) {
            Ok(p) => return Ok(p),
            Err(mqttbytes::Error::InsufficientBytes(_)) => {}
            Err(e) => return Err(std::io::Error::other(e.to_string())),
        }
        if s.read_buf(buf).await? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
    }
}

pub async fn write_packet(s: &mut Stream, p: Packet) -> std::io::Result<()> {
    let mut out = BytesMut::new();
    p.write(&mut out, usize::MAX)
        .map_err(|e| std::io::Error::other(e.to_string()))?;
    s.write_all(&out).await
}

pub async fn connect(
    addr: SocketAddr,
    config: Arc<rustls::ClientConfig>,
    client_id: &str,
) -> std::io::Result<(Stream, BytesMut)> {
    let tcp = TcpStream::connect(addr).await?;
    tcp.set_nodelay(true)?;
    let mut tls = TlsConnector::from(config)
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await?;
    let mut connect = v4::Connect::new(client_id);
    connect.keep_alive = 600;
    write_packet(&mut tls, Packet::Connect(connect)).await?;
    let mut buf = BytesMut::with_capacity(4096);
    match read_packet(&mut tls, &mut buf).await? {
        Packet::ConnAck(ack) if ack.code == v4::ConnectReturnCode::Success => Ok((tls, buf)),
        other => Err(std::io::Error::other(format!("CONNECT refused: {other:?}"))),
    }
}
