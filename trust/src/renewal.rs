//! When a certificate is due for renewal.
//!
//! step-ca's rule: at two thirds of the certificate's lifetime, less a
//! jitter of up to a twentieth of it, so that a fleet enrolled in one
//! batch does not renew in one burst. The jitter comes from the identity,
//! not a random draw: a device that reconnects, or restarts, is due at the
//! same moment as before, and the gateway and the device compute the same
//! moment without telling each other.

use sha2::{Digest, Sha256};

/// The Unix second at which a certificate valid from `not_before` to
/// `not_after` (Unix seconds) held by `identity` (a device id or service
/// name) is due for renewal. Never before `not_before`; for a lifetime of
/// zero or less, `not_before`.
pub fn due_at(not_before: i64, not_after: i64, identity: &str) -> i64 {
    let lifetime = not_after.saturating_sub(not_before).max(0);
    let digest = Sha256::digest(identity.as_bytes());
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    // A fraction in [0, 1) of the largest jitter, in 1/65,536ths.
    let fraction = i128::from(u64::from_be_bytes(first) >> 48);
    let jitter = (i128::from(lifetime) * fraction / 65_536 / 20) as i64;
    let two_thirds = (i128::from(lifetime) * 2 / 3) as i64;
    not_before.saturating_add(two_thirds - jitter)
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: i64 = 86_400;

    #[test]
    fn due_at_two_thirds_less_a_stable_jitter_of_at_most_a_twentieth() {
        let (start, end) = (1_000_000, 1_000_000 + 90 * DAY);
        let two_thirds = start + 60 * DAY;
        let earliest = two_thirds - 90 * DAY / 20;
        let mut seen = std::collections::BTreeSet::new();
        for i in 0..1000 {
            let id = format!("sensor-{i}");
            let due = due_at(start, end, &id);
            assert!((earliest..=two_thirds).contains(&due), "{id}: {due}");
            // The same every time it is asked.
            assert_eq!(due, due_at(start, end, &id));
            seen.insert(due);
        }
        // Spread over the window, not one moment.
        assert!(seen.len() > 900, "{} distinct moments", seen.len());
        let spread = seen.last().unwrap() - seen.first().unwrap();
        assert!(spread > 90 * DAY / 20 * 9 / 10, "spread {spread}");
    }

    #[test]
    fn odd_lifetimes_stay_inside_the_validity() {
        assert_eq!(due_at(100, 100, "a"), 100);
        assert_eq!(due_at(100, 50, "a"), 100);
        let due = due_at(0, 60, "a");
        assert!((37..=40).contains(&due), "{due}");
        assert!(due_at(i64::MAX - 10, i64::MAX, "a") >= i64::MAX - 10);
    }
}
