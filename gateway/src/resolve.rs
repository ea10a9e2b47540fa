//! Host names looked up again when their answers' TTLs run out (hickory, with the
//! system's resolver configuration; `getaddrinfo` every 30 s without one). Shared by the
//! registry's endpoint hostnames and the peers' gateway addresses. A failed lookup
//! keeps the last answer.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::time::Duration;

use std::time::Instant;
use tracing::{info, warn};

/// Bounds on when a hostname is looked up again: its answer's TTL, within these.
pub const MIN_REFRESH: Duration = Duration::from_secs(1);
pub const MAX_REFRESH: Duration = Duration::from_secs(300);
/// After a failed lookup (the last answer is kept meanwhile).
pub const RETRY: Duration = Duration::from_secs(5);

/// When to look a name up again, from its answer's expiry (the record TTL).
pub fn next_refresh(now: Instant, valid_until: Option<Instant>) -> Instant {
    let ttl = valid_until.map_or(RETRY, |v| v.saturating_duration_since(now));
    now + ttl.clamp(MIN_REFRESH, MAX_REFRESH)
}

/// Endpoint hostnames and their addresses, each looked up again when its TTL runs out.
pub struct Resolved {
    resolver: Option<hickory_resolver::TokioResolver>,
    pub answers: BTreeMap<String, Vec<IpAddr>>,
    due: BTreeMap<String, Instant>,
}

impl Resolved {
    pub fn new() -> Self {
        let resolver = match hickory_resolver::TokioResolver::builder_tokio()
            .and_then(|b| b.build())
        {
            Ok(r) => Some(r),
            Err(e) => {
                warn!(error = %e, "no system resolver configuration; endpoint hostnames use getaddrinfo every 30 s");
                None
            }
        };
        Self {
            resolver,
            answers: BTreeMap::new(),
            due: BTreeMap::new(),
        }
    }

    /// Looks up the names that are new or due; true when an answer changed.
    pub async fn refresh(&mut self, names: &BTreeSet<String>) -> bool {
        let now = Instant::now();
        self.answers.retain(|n, _| names.contains(n));
        self.due.retain(|n, _| names.contains(n));
        let mut changed = false;
        for name in names {
            if self.due.get(name).is_some_and(|d| *d > now) {
                continue;
            }
            let (ips, next) = match &self.resolver {
                Some(r) => match r.lookup_ip(name.as_str()).await {
                    Ok(l) => {
                        let v: Instant = l.valid_until();
                        (
                            Ok(l.iter().collect::<Vec<IpAddr>>()),
                            next_refresh(now, Some(v)),
                        )
                    }
                    Err(e) => (Err(e.to_string()), now + RETRY),
                },
                None => match tokio::net::lookup_host((name.as_str(), 0)).await {
                    Ok(a) => (
                        Ok(a.map(|a| a.ip()).collect()),
                        now + Duration::from_secs(30),
                    ),
                    Err(e) => (Err(e.to_string()), now + RETRY),
                },
            };
            self.due.insert(name.clone(), next);
            match ips {
                Ok(mut ips) => {
                    ips.sort();
                    ips.dedup();
                    if self.answers.get(name) != Some(&ips) {
                        info!(host = %name, addresses = ?ips, refresh_in = ?next.saturating_duration_since(now), "endpoint hostname resolved");
                        self.answers.insert(name.clone(), ips);
                        changed = true;
                    }
                }
                // Keep the last answer rather than drop a working endpoint.
                Err(e) => warn!(host = %name, error = %e, "endpoint hostname did not resolve"),
            }
        }
        changed
    }
}

impl Resolved {
    /// When the next name is due for a lookup.
    pub fn next_due(&self) -> Option<Instant> {
        self.due.values().min().copied()
    }
}

impl Default for Resolved {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refresh_follows_the_ttl_within_bounds() {
        let now = Instant::now();
        let at = |secs: u64| next_refresh(now, Some(now + Duration::from_secs(secs))) - now;
        assert_eq!(at(60), Duration::from_secs(60));
        assert_eq!(at(0), MIN_REFRESH);
        assert_eq!(at(86_400), MAX_REFRESH);
        assert_eq!(next_refresh(now, None) - now, RETRY);
    }
}
