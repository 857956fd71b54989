//! Reading a gateway's `/metrics` for the audit: which CRL it has in force.

use std::time::Duration;

/// The gateway metric with the CRL number in force (0 if none).
const CRL_NUMBER: &str = "twofold_gateway_crl_number";
/// A gateway's metrics page is a few kilobytes; this bounds a wrong URL.
const MAX_BYTES: u64 = 1 << 20;

/// What one gateway's `/metrics` said.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GatewayReading {
    /// The URL read.
    pub url: String,
    /// The CRL number in force, or why it could not be read.
    pub crl_number: Result<u64, String>,
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
    let crl_number = fetch(&url, timeout).and_then(|text| crl_number(&text));
    GatewayReading { url, crl_number }
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

/// The CRL number in a metrics page.
pub fn crl_number(text: &str) -> Result<u64, String> {
    let lines = text.lines().map(|l| Ok(l.to_owned()));
    let scrape = prometheus_parse::Scrape::parse(lines)
        .map_err(|e| format!("not Prometheus metrics: {e}"))?;
    let sample = scrape
        .samples
        .iter()
        .find(|s| s.metric == CRL_NUMBER)
        .ok_or_else(|| format!("no {CRL_NUMBER}: is this a Twofold gateway's metrics address?"))?;
    let value = match sample.value {
        prometheus_parse::Value::Gauge(v) | prometheus_parse::Value::Untyped(v) => v,
        _ => return Err(format!("{CRL_NUMBER} is not a gauge")),
    };
    if value.is_finite() && value >= 0.0 && value.fract() == 0.0 && value < 2f64.powi(53) {
        Ok(value as u64)
    } else {
        Err(format!("{CRL_NUMBER} is {value}, not a CRL number"))
    }
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
        let other = "# TYPE node_load1 gauge\nnode_load1 0.5\n";
        assert!(
            crl_number(other)
                .unwrap_err()
                .contains("no twofold_gateway_crl_number")
        );
        let odd = "# TYPE twofold_gateway_crl_number gauge\ntwofold_gateway_crl_number -1\n";
        assert!(crl_number(odd).unwrap_err().contains("not a CRL number"));
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
