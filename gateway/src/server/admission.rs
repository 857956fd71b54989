//! Handshake admission: which unauthenticated handshakes may keep their
//! room at the gateway, and which give way when a newcomer needs it.
//!
//! A handshake takes room when its ClientHello arrives (the gateway then
//! holds a rustls state and has signed for it) and gives it back when it
//! ends. A peer that stops after its ClientHello, or after reading the
//! gateway's flight without sending its certificate and Finished, would
//! hold that room until `handshake_timeout`; if newcomers waited for it,
//! a few hundred such sockets would keep real devices out. So here:
//!
//! - a newcomer never waits: every ClientHello gets its handshake at once;
//! - once `capacity` handshakes are pending, each newcomer cuts those that
//!   have been pending for at least `grace` (a real device answers the
//!   gateway's flight within a round trip and a signature) until the pool
//!   is back under `capacity`;
//! - the victim is the oldest handshake of the source address holding the
//!   most pending handshakes: one address cannot push out other addresses'
//!   devices, and a device sharing an address with stalled peers (a NAT,
//!   or an attacker on the same host) is newer than they are, so they give
//!   way first.
//!
//! Handshakes younger than `grace` are never cut; that is what lets a herd
//! of slow devices finish. So pending handshakes number at most `capacity`
//! plus those begun within the last `grace`, which the gateway's signing
//! speed bounds (each one cost it a signature).

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::time::{Duration, Instant};

/// A pending handshake, as known to the pool.
pub type Ticket = u64;

/// A handshake the pool has cut, with what its audit line says.
#[derive(Debug)]
pub struct Cut<T> {
    /// What the pool was holding for it (the means to stop it).
    pub handle: T,
    /// How long it had been pending.
    pub waited: Duration,
    /// Handshakes pending when it was cut, itself included.
    pub pending: usize,
    /// Of those, how many came from its address.
    pub from_source: usize,
}

/// The pending handshakes. Time is passed in; nothing here does I/O.
#[derive(Debug)]
pub struct Pool<T> {
    capacity: usize,
    grace: Duration,
    next: Ticket,
    /// Per source address, its pending handshakes oldest first (tickets
    /// grow with time).
    sources: HashMap<IpAddr, BTreeMap<Ticket, (Instant, T)>>,
    pending: usize,
}

impl<T> Pool<T> {
    pub fn new(capacity: usize, grace: Duration) -> Pool<T> {
        Pool {
            capacity: capacity.max(1),
            grace,
            next: 0,
            sources: HashMap::new(),
            pending: 0,
        }
    }

    /// Handshakes pending now.
    #[cfg(test)]
    pub fn pending(&self) -> usize {
        self.pending
    }

    /// A ClientHello from `source` at `now`: always admitted. Returns its
    /// ticket and the handshakes cut to make room (their handles, so the
    /// caller can stop them).
    pub fn admit(&mut self, source: IpAddr, now: Instant, handle: T) -> (Ticket, Vec<Cut<T>>) {
        let mut cuts = Vec::new();
        while self.pending >= self.capacity {
            match self.cut_one(now) {
                Some(cut) => cuts.push(cut),
                None => break,
            }
        }
        let ticket = self.next;
        self.next += 1;
        self.sources
            .entry(source)
            .or_default()
            .insert(ticket, (now, handle));
        self.pending += 1;
        (ticket, cuts)
    }

    /// The handshake ended (done, failed, timed out or cut): its room is
    /// free. Unknown tickets (already cut) are ignored.
    pub fn release(&mut self, source: IpAddr, ticket: Ticket) {
        let Some(pending) = self.sources.get_mut(&source) else {
            return;
        };
        if pending.remove(&ticket).is_some() {
            self.pending -= 1;
        }
        if pending.is_empty() {
            self.sources.remove(&source);
        }
    }

    /// Removes the oldest handshake of the busiest source among those
    /// whose oldest has been pending for at least `grace`.
    fn cut_one(&mut self, now: Instant) -> Option<Cut<T>> {
        let stalled = |since: Instant| now.saturating_duration_since(since) >= self.grace;
        let (&source, _) = self
            .sources
            .iter()
            .filter_map(|(source, pending)| {
                let (_, (since, _)) = pending.first_key_value()?;
                stalled(*since).then_some((source, (pending.len(), std::cmp::Reverse(*since))))
            })
            .max_by_key(|(_, key)| *key)?;
        let pending = self.sources.get_mut(&source)?;
        let from_source = pending.len();
        let (_, (since, handle)) = pending.pop_first()?;
        if pending.is_empty() {
            self.sources.remove(&source);
        }
        let cut = Cut {
            handle,
            waited: now.saturating_duration_since(since),
            pending: self.pending,
            from_source,
        };
        self.pending -= 1;
        Some(cut)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GRACE: Duration = Duration::from_secs(3);

    fn ip(last: u8) -> IpAddr {
        IpAddr::from([127, 0, 0, last])
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// The handles of what was cut: here, each handshake's name.
    fn names(cuts: &[Cut<&'static str>]) -> Vec<&'static str> {
        cuts.iter().map(|c| c.handle).collect()
    }

    #[test]
    fn nothing_is_cut_below_capacity_and_release_frees_room() {
        let t0 = Instant::now();
        let mut pool = Pool::new(2, GRACE);
        let (a, cuts) = pool.admit(ip(1), t0, "a");
        assert!(cuts.is_empty());
        let (_, cuts) = pool.admit(ip(1), t0, "b");
        assert!(cuts.is_empty());
        pool.release(ip(1), a);
        pool.release(ip(1), a);
        assert_eq!(pool.pending(), 1);
        // Room again, even long after: nothing is cut.
        let (_, cuts) = pool.admit(ip(2), t0 + GRACE * 10, "c");
        assert!(cuts.is_empty());
        assert_eq!(pool.pending(), 2);
    }

    #[test]
    fn a_full_pool_of_young_handshakes_admits_the_newcomer_without_cutting() {
        let t0 = Instant::now();
        let mut pool = Pool::new(2, GRACE);
        pool.admit(ip(1), t0, "a");
        pool.admit(ip(1), t0, "b");
        let (_, cuts) = pool.admit(ip(1), t0 + GRACE / 2, "c");
        assert!(names(&cuts).is_empty(), "a herd of slow devices is not cut");
        assert_eq!(pool.pending(), 3);
    }

    #[test]
    fn stalled_handshakes_give_way_oldest_first_down_to_capacity() {
        let t0 = Instant::now();
        let mut pool = Pool::new(2, GRACE);
        let (a, _) = pool.admit(ip(1), t0, "a");
        pool.admit(ip(1), t0 + ms(1000), "b");
        let (c, _) = pool.admit(ip(1), t0 + ms(2000), "c");
        // At t0+4 s, a and b have waited past the grace, c has not; both
        // go, so that the newcomer finds the pool under capacity.
        let (_, cuts) = pool.admit(ip(1), t0 + ms(4000), "d");
        assert_eq!(names(&cuts), ["a", "b"]);
        assert_eq!(cuts[0].waited, ms(4000));
        assert_eq!((cuts[0].pending, cuts[0].from_source), (3, 3));
        assert_eq!(pool.pending(), 2);
        // A cut handshake's task ending later changes nothing.
        pool.release(ip(1), a);
        assert_eq!(pool.pending(), 2);
        pool.release(ip(1), c);
        assert_eq!(pool.pending(), 1);
    }

    #[test]
    fn the_busiest_address_gives_way_first() {
        let t0 = Instant::now();
        let mut pool = Pool::new(4, GRACE);
        // A slow device on .2 began first; three stalled peers on .1 after.
        pool.admit(ip(2), t0, "device");
        for (n, name) in ["x", "y", "z"].into_iter().enumerate() {
            pool.admit(ip(1), t0 + ms(n as u64 + 1), name);
        }
        let (_, cuts) = pool.admit(ip(3), t0 + GRACE * 2, "newcomer");
        assert_eq!(names(&cuts), ["x"], "the lone older device stays");
        assert_eq!(cuts[0].from_source, 3);
    }

    #[test]
    fn a_device_sharing_an_address_with_stalled_peers_outlives_them() {
        let t0 = Instant::now();
        let mut pool = Pool::new(3, GRACE);
        for n in 0..3 {
            pool.admit(ip(1), t0 + ms(n), "stalled");
        }
        let later = t0 + GRACE * 2;
        let (_, cuts) = pool.admit(ip(1), later, "device");
        assert_eq!(names(&cuts), ["stalled"]);
        // More stalled peers come from the same address while the device
        // is mid-handshake: the older stalled ones go, never the device.
        for n in 1..=10 {
            let (_, cuts) = pool.admit(ip(1), later + ms(n), "stalled");
            assert!(names(&cuts).iter().all(|&c| c == "stalled"));
        }
        let (_, cuts) = pool.admit(ip(1), later + GRACE * 2, "late");
        assert!(names(&cuts).contains(&"device"), "once it too has stalled");
    }
}
