//! What a TLS peer said when it ended a handshake.

/// The TLS alert the peer sent, found anywhere in `e`'s chain of sources.
/// rustls puts it inside an I/O error, whose `source()` skips the error it
/// wraps, so each I/O error is opened as well.
pub fn alert_received(e: &(dyn std::error::Error + 'static)) -> Option<rustls::AlertDescription> {
    let mut next = Some(e);
    while let Some(err) = next {
        let tls = err.downcast_ref::<rustls::Error>().or_else(|| {
            err.downcast_ref::<std::io::Error>()
                .and_then(|io| io.get_ref())
                .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        });
        if let Some(rustls::Error::AlertReceived(alert)) = tls {
            return Some(*alert);
        }
        next = err.source();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("connection: {0}")]
    struct Outer(#[source] std::io::Error);

    #[test]
    fn an_alert_inside_an_io_error_inside_another_error_is_found() {
        let alert = rustls::Error::AlertReceived(rustls::AlertDescription::BadCertificate);
        let e = Outer(std::io::Error::new(std::io::ErrorKind::InvalidData, alert));
        assert_eq!(
            alert_received(&e),
            Some(rustls::AlertDescription::BadCertificate)
        );
    }

    #[test]
    fn another_failure_is_no_alert() {
        let other = rustls::Error::General("no".into());
        let e = Outer(std::io::Error::new(std::io::ErrorKind::InvalidData, other));
        assert_eq!(alert_received(&e), None);
        let reset = Outer(std::io::Error::from(std::io::ErrorKind::ConnectionReset));
        assert_eq!(alert_received(&reset), None);
    }
}
