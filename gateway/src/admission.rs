//! Who may start a QUIC handshake with the ingress, before any certificate is seen. Pure:
//! counters and a decision, no sockets.
//!
//! A handshake costs the gateway a connection's state (TLS, QUIC, buffers) until it
//! completes or times out, and an unauthenticated peer can start thousands for the price
//! of their ClientHellos. The gate bounds that state:
//! - past [`Limits::retry_above`] handshakes in flight (by default always), a peer whose
//!   address is not yet validated gets a stateless Retry (RFC 9000 §8.1.2) instead of
//!   state: spoofed sources never come back, and nothing but the Retry is ever sent to an
//!   unvalidated address. That also keeps the gateway within the 3× anti-amplification
//!   limit, which quinn itself overshoots by up to one datagram (it sends a full datagram
//!   whenever any budget is left: quinn PR #1148, as msquic and Google's quiche do);
//! - at most [`Limits::per_address`] handshakes per source IP;
//! - at most [`Limits::total`] handshakes in all; beyond, the connection is refused.
//!
//! Authenticated connections leave the gate as soon as the handshake completes, so
//! established peers never compete with a flood.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

/// The gate's bounds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Handshakes in flight beyond which unvalidated addresses get a Retry. Default 0:
    /// always (one round trip more per new peer connection, which gateways open rarely).
    pub retry_above: usize,
    /// Handshakes in flight from one IP address. Default 16.
    pub per_address: usize,
    /// Handshakes in flight in all. Default 256.
    pub total: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            retry_above: 0,
            per_address: 16,
            total: 256,
        }
    }
}

/// What to do with a new connection attempt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Admission {
    Accept,
    /// Send a Retry: the peer must prove it owns its address first.
    Retry,
    /// Refuse (CONNECTION_REFUSED), with the stable reason for logs and metrics.
    Refuse(&'static str),
}

/// Decides one attempt from the handshakes in flight. Pure.
pub fn decide(limits: &Limits, total: usize, from_address: usize, validated: bool) -> Admission {
    if !validated && total >= limits.retry_above {
        return Admission::Retry;
    }
    if from_address >= limits.per_address {
        return Admission::Refuse("handshake_limit_per_address");
    }
    if total >= limits.total {
        return Admission::Refuse("handshake_limit");
    }
    Admission::Accept
}

/// Handshakes in flight, in all and per source IP.
#[derive(Debug, Default)]
pub struct Gate {
    limits: Limits,
    inner: Mutex<Counts>,
}

#[derive(Debug, Default)]
struct Counts {
    total: usize,
    by_ip: HashMap<IpAddr, usize>,
}

/// A handshake in flight; leaves the gate when dropped.
#[derive(Debug)]
pub struct Slot {
    gate: Arc<Gate>,
    ip: IpAddr,
}

impl Gate {
    pub fn new(limits: Limits) -> Arc<Self> {
        Arc::new(Self {
            limits,
            inner: Mutex::default(),
        })
    }

    fn counts(&self) -> std::sync::MutexGuard<'_, Counts> {
        // Counters only: a panic elsewhere cannot leave them half-updated.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Admits an attempt from `ip` (taking a slot) or says what to do instead.
    pub fn admit(self: &Arc<Self>, ip: IpAddr, validated: bool) -> Result<Slot, Admission> {
        let mut c = self.counts();
        let from = c.by_ip.get(&ip).copied().unwrap_or(0);
        match decide(&self.limits, c.total, from, validated) {
            Admission::Accept => {
                c.total += 1;
                *c.by_ip.entry(ip).or_default() += 1;
                Ok(Slot {
                    gate: self.clone(),
                    ip,
                })
            }
            other => Err(other),
        }
    }

    /// Handshakes in flight now.
    pub fn in_flight(&self) -> usize {
        self.counts().total
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut c = self.gate.counts();
        c.total -= 1;
        if let Some(n) = c.by_ip.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                c.by_ip.remove(&self.ip);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decisions() {
        let l = Limits {
            retry_above: 2,
            per_address: 3,
            total: 5,
        };
        // (in flight, from this address, validated) → admission
        let rows: &[(usize, usize, bool, Admission)] = &[
            (0, 0, false, Admission::Accept),
            (1, 1, false, Admission::Accept),
            // Under load, unvalidated addresses must prove themselves first.
            (2, 0, false, Admission::Retry),
            (4, 2, false, Admission::Retry),
            (5, 0, false, Admission::Retry),
            // A validated address is counted against its own limit and the total.
            (2, 0, true, Admission::Accept),
            (2, 3, true, Admission::Refuse("handshake_limit_per_address")),
            (5, 0, true, Admission::Refuse("handshake_limit")),
            (9, 9, true, Admission::Refuse("handshake_limit_per_address")),
        ];
        for (i, (total, from, validated, want)) in rows.iter().enumerate() {
            assert_eq!(decide(&l, *total, *from, *validated), *want, "row {i}");
        }
    }

    #[test]
    fn slots_are_counted_and_released() {
        let g = Gate::new(Limits {
            retry_above: 100,
            per_address: 2,
            total: 3,
        });
        let a: IpAddr = [10, 0, 0, 1].into();
        let b: IpAddr = [10, 0, 0, 2].into();
        let s1 = g.admit(a, true).unwrap();
        let _s2 = g.admit(a, true).unwrap();
        assert_eq!(
            g.admit(a, true).unwrap_err(),
            Admission::Refuse("handshake_limit_per_address")
        );
        let _s3 = g.admit(b, true).unwrap();
        assert_eq!(
            g.admit(b, true).unwrap_err(),
            Admission::Refuse("handshake_limit")
        );
        assert_eq!(g.in_flight(), 3);
        drop(s1);
        assert_eq!(g.in_flight(), 2);
        g.admit(a, true).unwrap();
    }
}
