//! Which log lines the gateway writes.
//!
//! The embedded rumqttd logs every ordinary disconnect as an ERROR, and
//! opens an ERROR-level tracing span for every PUBLISH it routes, so its
//! logs stay off unless `RUST_LOG` names it: `RUST_LOG=warn` means the
//! gateway's warnings, not a line and a formatted span per message from
//! the broker.

/// The default directives when `RUST_LOG` is unset.
pub const DEFAULT: &str = "info,rumqttd=off";

/// The filter directives for `rust_log` (the `RUST_LOG` value, if set).
pub fn directives(rust_log: Option<&str>) -> String {
    match rust_log.map(str::trim) {
        None | Some("") => DEFAULT.to_owned(),
        Some(given) if given.contains("rumqttd") => given.to_owned(),
        Some(given) => format!("{given},rumqttd=off"),
    }
}

/// Installs the stderr logger. A `RUST_LOG` that does not parse is named
/// on stderr and the default used instead.
pub fn init() {
    let given = std::env::var("RUST_LOG").ok();
    let filter = match tracing_subscriber::EnvFilter::try_new(directives(given.as_deref())) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("warning: RUST_LOG={given:?} is not a valid filter ({e}); using {DEFAULT:?}");
            tracing_subscriber::EnvFilter::new(DEFAULT)
        }
    };
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_broker_stays_quiet_unless_named() {
        assert_eq!(directives(None), "info,rumqttd=off");
        assert_eq!(directives(Some(" ")), "info,rumqttd=off");
        assert_eq!(directives(Some("warn")), "warn,rumqttd=off");
        assert_eq!(
            directives(Some("debug,twofold_gateway=trace")),
            "debug,twofold_gateway=trace,rumqttd=off"
        );
        assert_eq!(directives(Some("info,rumqttd=debug")), "info,rumqttd=debug");
        for d in ["warn", "info,rumqttd=debug", "debug,twofold_gateway=trace"] {
            assert!(tracing_subscriber::EnvFilter::try_new(directives(Some(d))).is_ok());
        }
    }
}
