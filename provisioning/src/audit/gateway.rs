//! Reading a gateway's `/metrics` for the audit: which CRL it has in
//! force, and whether its audit events are kept.

use std::time::Duration;

/// The gateway metric with the CRL number in force (0 if none).
const CRL_NUMBER: &str = "twofold_gateway_crl_number";
/// 1 if the gateway writes audit events to a file, 0 to standard output.
const AUDIT_FILE: &str = "twofold_gateway_audit_log_file";
/// Audit events the gateway could not write.
const AUDIT_ERRORS: &str = "twofold_gateway_audit_write_errors_total";
/// A gateway's metrics page is a few kilobytes; this bounds a wrong URL.
const MAX_BYTES: u64 = 1 << 20;

/// What one gateway's `/metrics` said.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GatewayReading {
    /// The URL read.
    pub url: String,
    /// The CRL number in force, or why it could not be read.
    pub crl_number: Result<u64, String>,
    /// Whether audit events go to a file; `None` if the page does not
    /// say (a gateway older than this metric, or an unreadable page).
    pub audit_to_file: Option<bool>,
    /// Audit events it could not write, if the page says.
    pub audit_write_errors: Option<u64>,
}

/// `http://host:port` with `/metrics` added when no path is given.
pub fn metrics_url(given: &str) -> String {
    let Some(rest) = given.strip_prefix("http://") else {
        return given.to_owned();
    };
    if rest.contains('/') {
        given.to_owned()
    } else {
        format!("{given}/metrics")
    }
}

/// GETs the gateway's `/metrics`. Blocking, at most `timeout`.
pub fn read(given: &str, timeout: Duration) -> GatewayReading {
    let url = metrics_url(given);
    match fetch(&url, timeout).and_then(|text| page(&text)) {
        Ok(p) => GatewayReading { url, ..p },
        Err(e) => GatewayReading {
            url,
            crl_number: Err(e),
            audit_to_file: None,
            audit_write_errors: None,
        },
    }
}

fn fetch(url: &str, timeout: Duration) -> Result<String, String> {
    if !url.starts_with("http://") {
        return Err(format!(
            "{url}: give the gateway's metrics address as http://host:port (its `metrics` setting)"
        ));
    }
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(timeout))
        .build()
        .into();
    let mut response = agent.get(url).call().map_err(|e| e.to_string())?;
    response
        .body_mut()
        .with_config()
        .limit(MAX_BYTES)
        .read_to_string()
        .map_err(|e| e.to_string())
}

/// What the audit reads from a metrics page (its `url` left empty).
pub fn page(text: &str) -> Result<GatewayReading, String> {
    let lines = text.lines().map(|l| Ok(l.to_owned()));
    let scrape = prometheus_parse::Scrape::parse(lines)
        .map_err(|e| format!("not Prometheus metrics: {e}"))?;
    let count = |name: &str| -> Result<Option<u64>, String> {
        let Some(sample) = scrape.samples.iter().find(|s| s.metric == name) else {
            return Ok(None);
        };
        let value = match sample.value {
            prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Untyped(v) => v,
            _ => return Err(format!("{name} is not a gauge or counter")),
        };
        if value.is_finite() && value >= 0.0 && value.fract() == 0.0 && value < 2f64.powi(53) {
            Ok(Some(value as u64))
        } else {
            Err(format!("{name} is {value}, not a count"))
        }
    };
    let crl_number = count(CRL_NUMBER)?
        .ok_or_else(|| format!("no {CRL_NUMBER}: is this a Twofold gateway's metrics address?"));
    Ok(GatewayReading {
        url: String::new(),
        crl_number,
        audit_to_file: count(AUDIT_FILE)?.map(|v| v == 1),
        audit_write_errors: count(AUDIT_ERRORS)?,
    })
}

/// The CRL number in a metrics page.
pub fn crl_number(text: &str) -> Result<u64, String> {
    page(text)?.crl_number
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_crl_number_and_refuses_what_is_not_a_gateway() {
        let page = "# HELP twofold_gateway_crl_number CRL number in force (0 if none)\n\
                    # TYPE twofold_gateway_crl_number gauge\n\
                    twofold_gateway_crl_number 7\n\
                    # TYPE twofold_gateway_sessions gauge\n\
                    twofold_gateway_sessions 3\n";
        assert_eq!(crl_number(page), Ok(7));
        let read = super::page(page).unwrap();
        assert_eq!((read.audit_to_file, read.audit_write_errors), (None, None));
        let full = format!(
            "{page}# TYPE twofold_gateway_audit_log_file gauge\ntwofold_gateway_audit_log_file 0\n\
             # TYPE twofold_gateway_audit_write_errors_total counter\n\
             twofold_gateway_audit_write_errors_total 3\n"
        );
        let read = super::page(&full).unwrap();
        assert_eq!(
            (read.audit_to_file, read.audit_write_errors),
            (Some(false), Some(3))
        );
        let other = "# TYPE node_load1 gauge\nnode_load1 0.5\n";
        assert!(
            crl_number(other)
                .unwrap_err()
                .contains("no twofold_gateway_crl_number")
        );
        let odd = "# TYPE twofold_gateway_crl_number gauge\ntwofold_gateway_crl_number -1\n";
        assert!(crl_number(odd).unwrap_err().contains("not a count"));
        assert!(crl_number("<html>").is_err());
    }

    #[test]
    fn a_bare_address_gets_the_metrics_path() {
        assert_eq!(
            metrics_url("http://127.0.0.1:9100"),
            "http://127.0.0.1:9100/metrics"
        );
        assert_eq!(metrics_url("http://gw:9100/m"), "http://gw:9100/m");
        let r = read("https://gw:9100", Duration::from_secs(1));
        assert!(r.crl_number.unwrap_err().contains("http://host:port"));
    }
}
