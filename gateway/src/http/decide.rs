//! The per-request decisions of the HTTP path, pure and table-tested: the site a
//! request's first attempt goes to (the DestinationRule's load balancer), whether a
//! failed attempt is tried again (and where), and the retry budget that caps retries
//! under a full outage.

use std::time::Duration;

use http::Method;

/// When a connection with `busy` requests in flight, last used at `last_used` (ms),
/// closes under `idle`: `None` now, else the time (ms) to look again. Pure.
pub fn idle_until(busy: u32, last_used: u64, now: u64, idle: Duration) -> Option<u64> {
    let idle = u64::try_from(idle.as_millis()).unwrap_or(u64::MAX);
    if busy > 0 {
        return Some(now.saturating_add(idle));
    }
    let due = last_used.saturating_add(idle);
    (due > now).then_some(due)
}

/// A request the client gives up (an h2 RST_STREAM, or a closed connection) within this
/// long of its start, before its answer was sent whole, is reset prematurely (Envoy's
/// `premature_reset_min_stream_lifetime_seconds`).
pub const PREMATURE_RESET_WITHIN: Duration = Duration::from_secs(1);

/// The streams a connection's premature resets are weighed against at least (Envoy's
/// `premature_reset_total_stream_count`).
pub const PREMATURE_RESET_MIN_STREAMS: u64 = 500;

/// Whether a client connection that has closed `closed` requests, `premature` of them
/// reset prematurely ([`PREMATURE_RESET_WITHIN`]), is cut: once the premature resets are
/// half of its requests, counted over at least [`PREMATURE_RESET_MIN_STREAMS`]. So a
/// connection is cut after 250 premature resets at the earliest, and one whose requests
/// mostly finish never is. This is Envoy's answer to "rapid reset" (CVE-2023-44487):
/// each reset stream has cost the gateway a routed request, a stream on a link and, at
/// the far side, usually its pooled connection to the endpoint, while it cost the client
/// two small frames. h2 bounds only the resets of streams not yet accepted. Pure.
pub fn too_many_premature_resets(closed: u64, premature: u64) -> bool {
    premature.saturating_mul(2) >= closed.max(PREMATURE_RESET_MIN_STREAMS)
}

/// A uniform 32-bit roll from a counter (splitmix64): the weighted pick's input, so
/// consecutive requests spread exactly by weight over many requests. Pure.
pub fn roll(n: u64) -> u32 {
    let mut z = n.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    (z ^ (z >> 31)) as u32
}

/// Which of the candidate sites (in the plan's order, best first) the first attempt
/// goes to. `turn` counts the import's requests, `roll` is uniform, `in_flight` holds
/// this gateway's requests in flight to each candidate. No balancer: the best site
/// (failover order). Pure.
pub fn first_site(
    lb: Option<meshfed_catalog::http_route::LoadBalancer>,
    turn: u64,
    roll: u32,
    in_flight: &[u32],
) -> usize {
    use meshfed_catalog::http_route::LoadBalancer;
    let n = in_flight.len() as u64;
    if n <= 1 {
        return 0;
    }
    let scaled = |r: u32, k: u64| ((u64::from(r) * k) >> 32) as usize;
    match lb {
        None => 0,
        Some(LoadBalancer::RoundRobin) => (turn % n) as usize,
        Some(LoadBalancer::Random) => scaled(roll, n),
        Some(LoadBalancer::LeastRequest) => {
            // Two distinct candidates at random; the less loaded (the first on a tie).
            let a = scaled(roll, n);
            let mut b = scaled(roll.rotate_left(16), n - 1);
            if b >= a {
                b += 1;
            }
            if in_flight[b] < in_flight[a] { b } else { a }
        }
    }
}

/// How one attempt ended, as far as retrying cares.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// No request byte reached the far side: no link, or a typed refusal of the tunnel
    /// open (unknown service, no ready endpoint, ...). Always safe to send elsewhere.
    NotSent,
    /// The request was sent and the tunnel or the far side failed before an answer.
    Lost,
    /// The far side answered with this status.
    Status(u16),
}

/// Methods RFC 9110 §9.2.2 calls idempotent: a retry after the request was sent cannot
/// do twice what the client asked once.
pub fn idempotent(m: &Method) -> bool {
    matches!(
        *m,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    )
}

/// Statuses worth another site (Envoy's `5xx`-family retry-on, narrowed to what a gateway
/// hop produces: the far gateway or endpoint unavailable, or a gateway timeout).
pub fn retryable_status(status: u16) -> bool {
    matches!(status, 502..=504)
}

/// Whether attempt `attempt` (0 the first) of at most `retries` retries, that ended in
/// `outcome` (with `grpc`, the gRPC status its answer's headers carry), is tried again,
/// given the route's `retryOn` (`None`: the default, connect failures, resets and
/// [`retryable_status`]), whether the body can be replayed, and whether the budget
/// allows one now. Whatever `on` says, a request that was sent is retried only when it
/// is idempotent. Pure.
pub fn retry(
    method: &Method,
    (outcome, grpc): (Outcome, Option<u32>),
    on: Option<&meshfed_catalog::http_route::RetryOn>,
    (attempt, retries): (u32, u32),
    replayable: bool,
    budget_allows: bool,
) -> bool {
    if attempt >= retries || !replayable || !budget_allows {
        return false;
    }
    match outcome {
        Outcome::NotSent => on.is_none_or(|o| o.not_sent()),
        Outcome::Lost => idempotent(method) && on.is_none_or(|o| o.lost()),
        Outcome::Status(s) => {
            idempotent(method) && on.map_or(retryable_status(s), |o| o.status(s, grpc))
        }
    }
}

/// How long (ms) to wait before retry `retry` (1 the first) of a route whose back-off
/// base is `base_ms`, with `roll` uniform: Envoy's fully jittered exponential back-off,
/// a uniform time in [0, (2^retry − 1) × base), at most 10 × base (Envoy's default
/// maximum). A base of 0 retries at once. Pure.
pub fn retry_backoff_ms(base_ms: u64, retry: u32, roll: u32) -> u64 {
    let ceiling = base_ms
        .saturating_mul((1u64 << retry.clamp(1, 16)) - 1)
        .min(base_ms.saturating_mul(10));
    if ceiling == 0 {
        return 0;
    }
    ((u128::from(roll) * u128::from(ceiling)) >> 32) as u64
}

/// Whether a retry may start under an Envoy retry budget (a DestinationRule's
/// `retryBudget`) with `requests` requests and `retries` retries in flight: while the
/// retries are fewer than `per_million` of the requests, or than
/// `min_retry_concurrency`, whichever is more. Pure.
pub fn budget_allows(
    b: meshfed_catalog::http_route::RetryBudget,
    requests: u32,
    retries: u32,
) -> bool {
    let share = u64::from(requests) * u64::from(b.per_million) / 1_000_000;
    u64::from(retries) < share.max(u64::from(b.min_retry_concurrency))
}

/// Outlier detection per host, as Envoy keeps it: the egress keeps it per site (`K` =
/// [`meshfed_catalog::SiteName`]), the ingress per endpoint (`K` = its address).
/// Consecutive errors eject a host for `base × its ejections so far` (at most 300 s;
/// each whole `interval` back in service takes one off its ejections so far); at
/// most `max_ejection_percent` of the hosts (at least one) are ejected at once, and
/// never all of them, so one bad host can never blackhole the service. Only the hosts
/// serving now count toward that cap, and the state of hosts that left is dropped (as
/// Envoy drops a removed host's), so endpoint churn neither grows it nor holds the cap
/// with ejections of endpoints that are gone. Time is passed in (ms).
#[derive(Debug)]
pub struct Outliers<K = meshfed_catalog::SiteName> {
    sites: std::collections::HashMap<K, SiteErrors>,
}

impl<K> Default for Outliers<K> {
    fn default() -> Self {
        Self {
            sites: std::collections::HashMap::new(),
        }
    }
}

#[derive(Debug, Default)]
struct SiteErrors {
    fivexx: u32,
    gateway: u32,
    ejections: u32,
    ejected_until: u64,
    /// Back in service intervals are counted from here (the last ejection's end, or the
    /// last interval that took one off `ejections`).
    healthy_from: u64,
}

impl SiteErrors {
    /// Takes one off the ejections so far for each whole `interval` the host has been
    /// back in service (Envoy decrements the multiplier at each sweep that finds the
    /// host not ejected).
    fn decay(&mut self, interval: u64, now_ms: u64) {
        if self.ejections == 0 || self.ejected_until > now_ms || interval == 0 {
            return;
        }
        let from = self.healthy_from.max(self.ejected_until);
        let n = (now_ms - from) / interval;
        if n > 0 {
            self.ejections = self
                .ejections
                .saturating_sub(u32::try_from(n).unwrap_or(u32::MAX));
            self.healthy_from = from + n.saturating_mul(interval);
        }
    }
}

/// The longest ejection (Envoy's `max_ejection_time` default).
pub const MAX_EJECTION_MS: u64 = 300_000;

impl<K: Eq + std::hash::Hash + Clone> Outliers<K> {
    pub fn is_ejected(&self, site: &K, now_ms: u64) -> bool {
        self.sites
            .get(site)
            .is_some_and(|s| s.ejected_until > now_ms)
    }

    /// Hosts with state kept (errors counted or ejections remembered).
    pub fn len(&self) -> usize {
        self.sites.len()
    }

    pub fn is_empty(&self) -> bool {
        self.sites.is_empty()
    }

    /// Counts an attempt's outcome at `site`, one of `sites` (the hosts serving the
    /// service now); returns whether it ejected the site now. State of hosts not in
    /// `sites` is dropped first when there is more of it than `sites` holds.
    pub fn observe(
        &mut self,
        cfg: &meshfed_catalog::http_route::Outlier,
        site: &K,
        outcome: Outcome,
        sites: &[K],
        now_ms: u64,
    ) -> bool {
        if self.sites.len() > sites.len() {
            let serving: std::collections::HashSet<&K> = sites.iter().collect();
            self.sites.retain(|k, _| serving.contains(k));
        }
        let (error, gateway) = match outcome {
            Outcome::Status(s) => (s >= 500, (502..=504).contains(&s)),
            Outcome::Lost | Outcome::NotSent => (true, true),
        };
        if !error {
            if let Some(s) = self.sites.get_mut(site) {
                s.fivexx = 0;
                s.gateway = 0;
                s.decay(cfg.interval(), now_ms);
            }
            return false;
        }
        let ejected_now = sites.iter().filter(|k| self.is_ejected(k, now_ms)).count();
        let s = self.sites.entry(site.clone()).or_default();
        s.decay(cfg.interval(), now_ms);
        s.fivexx += 1;
        s.gateway = if gateway { s.gateway + 1 } else { 0 };
        let tripped = (cfg.consecutive_5xx > 0 && s.fivexx >= cfg.consecutive_5xx)
            || (cfg.consecutive_gateway > 0 && s.gateway >= cfg.consecutive_gateway);
        let n = sites.len();
        let cap = (n * cfg.max_ejection_percent as usize / 100)
            .max(1)
            .min(n.saturating_sub(1));
        if !tripped || s.ejected_until > now_ms || ejected_now >= cap {
            return false;
        }
        s.ejections += 1;
        s.fivexx = 0;
        s.gateway = 0;
        s.ejected_until = now_ms
            + cfg
                .base_ejection_ms
                .saturating_mul(u64::from(s.ejections))
                .min(MAX_EJECTION_MS);
        true
    }
}

/// Linkerd's retry budget: within the last `ttl`, retries may be at most `ratio` of the
/// requests plus `min_per_sec` × `ttl`. So a full outage adds at most that much load,
/// however many attempts a route allows. Time is passed in, in milliseconds since any
/// fixed start; buckets are one second wide.
#[derive(Clone, Debug)]
pub struct RetryBudget {
    ratio: f64,
    min_per_sec: u32,
    /// One bucket per second of the ttl: (second, requests, retries).
    buckets: Vec<(u64, u32, u32)>,
}

impl RetryBudget {
    pub fn new(ratio: f64, min_per_sec: u32, ttl: Duration) -> Self {
        let n = ttl.as_secs().max(1) as usize;
        Self {
            ratio,
            min_per_sec,
            buckets: vec![(u64::MAX, 0, 0); n],
        }
    }

    /// 20 % extra load, 10 retries per second, over 10 s: Linkerd's defaults.
    pub fn linkerd_default() -> Self {
        Self::new(0.2, 10, Duration::from_secs(10))
    }

    fn bucket(&mut self, now_ms: u64) -> &mut (u64, u32, u32) {
        let sec = now_ms / 1000;
        let n = self.buckets.len();
        let b = &mut self.buckets[(sec % n as u64) as usize];
        if b.0 != sec {
            *b = (sec, 0, 0);
        }
        b
    }

    fn totals(&self, now_ms: u64) -> (u64, u64) {
        let sec = now_ms / 1000;
        let n = self.buckets.len() as u64;
        self.buckets
            .iter()
            .filter(|b| b.0 != u64::MAX && b.0 <= sec && sec - b.0 < n)
            .fold((0, 0), |(r, t), b| (r + u64::from(b.1), t + u64::from(b.2)))
    }

    /// A first attempt was made.
    pub fn deposit(&mut self, now_ms: u64) {
        self.bucket(now_ms).1 += 1;
    }

    /// Takes one retry if the budget has one.
    pub fn withdraw(&mut self, now_ms: u64) -> bool {
        let (requests, retries) = self.totals(now_ms);
        let ttl = self.buckets.len() as f64;
        let allowed = self.ratio * requests as f64 + f64::from(self.min_per_sec) * ttl;
        if (retries as f64) < allowed {
            self.bucket(now_ms).2 += 1;
            true
        } else {
            false
        }
    }
}

/// A route's local rate limit: `burst` tokens, refilled at `requests` per `per_ms`; each
/// request takes one. Time is passed in (milliseconds since any fixed start). Starts full.
#[derive(Clone, Debug)]
pub struct TokenBucket {
    capacity: f64,
    /// Tokens per millisecond.
    rate: f64,
    tokens: f64,
    last_ms: Option<u64>,
}

impl TokenBucket {
    pub fn new(limit: &meshfed_catalog::http_route::RateLimit) -> Self {
        let capacity = f64::from(limit.burst.max(1));
        Self {
            capacity,
            rate: f64::from(limit.requests) / limit.per_ms.max(1) as f64,
            tokens: capacity,
            last_ms: None,
        }
    }

    /// Takes a token, or says in how many milliseconds the next one is there.
    pub fn take(&mut self, now_ms: u64) -> Result<(), u64> {
        let elapsed = now_ms.saturating_sub(self.last_ms.unwrap_or(now_ms));
        self.last_ms = Some(now_ms.max(self.last_ms.unwrap_or(0)));
        self.tokens = (self.tokens + elapsed as f64 * self.rate).min(self.capacity);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(())
        } else {
            Err(((1.0 - self.tokens) / self.rate).ceil().max(1.0) as u64)
        }
    }
}

/// `retry-after` in whole seconds (at least 1) for a wait of `ms`.
pub fn retry_after_secs(ms: u64) -> u64 {
    ms.div_ceil(1000).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn premature_resets_cut_a_connection_once_they_are_half_of_enough_streams() {
        for (closed, premature, cut) in [
            (0, 0, false),
            (10, 10, false),
            (249, 249, false),
            (250, 250, true),
            (499, 249, false),
            (499, 250, true),
            (500, 250, true),
            (500, 249, false),
            (1000, 499, false),
            (1000, 500, true),
            (100_000, 49_999, false),
            (u64::MAX, u64::MAX, true),
        ] {
            assert_eq!(
                too_many_premature_resets(closed, premature),
                cut,
                "{closed} closed, {premature} premature"
            );
        }
    }

    #[test]
    fn a_connection_closes_once_idle_for_its_timeout() {
        let idle = Duration::from_millis(1000);
        // (busy, last used, now) → closed now, or when to look again.
        for (busy, last, now, want) in [
            (0, 0, 999, Some(1000)),
            (0, 0, 1000, None),
            (0, 500, 1200, Some(1500)),
            (0, 500, 5000, None),
            // In flight: never closed, looked at again one timeout later.
            (1, 0, 5000, Some(6000)),
            (3, 4900, 5000, Some(6000)),
        ] {
            assert_eq!(
                idle_until(busy, last, now, idle),
                want,
                "{busy} busy, last {last}, now {now}"
            );
        }
    }

    #[test]
    fn the_first_site_follows_the_load_balancer() {
        use meshfed_catalog::http_route::LoadBalancer as Lb;
        // No balancer: always the best site.
        assert!((0..50).all(|t| first_site(None, t, roll(t), &[0, 0, 0]) == 0));
        // Round robin: each in turn.
        let rr: Vec<usize> = (0..6)
            .map(|t| first_site(Some(Lb::RoundRobin), t, 0, &[0, 0, 0]))
            .collect();
        assert_eq!(rr, [0, 1, 2, 0, 1, 2]);
        // Random: every site, about evenly, over many rolls.
        let mut seen = [0u32; 3];
        for t in 0..30_000 {
            seen[first_site(Some(Lb::Random), t, roll(t), &[0, 0, 0])] += 1;
        }
        assert!(seen.iter().all(|c| (9_000..11_000).contains(c)), "{seen:?}");
        // Least request: a loaded site loses every two-way draw it is in, so it gets only
        // the draws it is in neither, which never happen: never picked.
        let mut seen = [0u32; 3];
        for t in 0..30_000 {
            seen[first_site(Some(Lb::LeastRequest), t, roll(t), &[0, 9, 0])] += 1;
        }
        assert_eq!(seen[1], 0, "{seen:?}");
        assert!(seen[0] > 10_000 && seen[2] > 10_000, "{seen:?}");
        // Equal loads: spread like random.
        let mut seen = [0u32; 2];
        for t in 0..20_000 {
            seen[first_site(Some(Lb::LeastRequest), t, roll(t), &[3, 3])] += 1;
        }
        assert!(seen.iter().all(|c| (9_000..11_000).contains(c)), "{seen:?}");
        // One site: it, whatever the balancer.
        for lb in [
            None,
            Some(Lb::RoundRobin),
            Some(Lb::Random),
            Some(Lb::LeastRequest),
        ] {
            assert_eq!(first_site(lb, 7, 99, &[5]), 0);
        }
    }

    #[test]
    fn a_token_bucket_allows_its_burst_then_its_rate() {
        use meshfed_catalog::http_route::RateLimit;
        // 10 per second, bursts of 5.
        let mut b = TokenBucket::new(&RateLimit {
            requests: 10,
            per_ms: 1000,
            burst: 5,
        });
        for _ in 0..5 {
            assert_eq!(b.take(0), Ok(()));
        }
        assert_eq!(b.take(0), Err(100), "the next token in 100 ms");
        assert_eq!(b.take(50), Err(50));
        assert_eq!(b.take(100), Ok(()));
        assert_eq!(b.take(100), Err(100));
        // Over 10 s it lets through the rate, and never more than the burst at once.
        let mut passed = 0;
        for t in (200..10_200).step_by(10) {
            if b.take(t).is_ok() {
                passed += 1;
            }
        }
        assert_eq!(passed, 100);
        assert!((0..20).filter(|_| b.take(60_000).is_ok()).count() == 5);
        // A clock that steps back refills nothing and does not panic.
        assert!(b.take(1_000).is_err());
        assert_eq!(retry_after_secs(1), 1);
        assert_eq!(retry_after_secs(1000), 1);
        assert_eq!(retry_after_secs(1001), 2);
        // 5 per minute: the wait is 12 s.
        let mut slow = TokenBucket::new(&RateLimit {
            requests: 5,
            per_ms: 60_000,
            burst: 1,
        });
        assert_eq!(slow.take(0), Ok(()));
        assert_eq!(slow.take(0), Err(12_000));
    }

    #[test]
    fn what_is_retried() {
        use Outcome::*;
        let (get, post) = (Method::GET, Method::POST);
        // (method, outcome, attempt, retries, replayable, budget) → retried
        let rows: &[(&Method, Outcome, u32, u32, bool, bool, bool)] = &[
            // Never sent: anything may go elsewhere, even a POST.
            (&post, NotSent, 0, 2, true, true, true),
            (&get, NotSent, 1, 2, true, true, true),
            // Out of attempts, budget, or a body that cannot be replayed.
            (&get, NotSent, 2, 2, true, true, false),
            (&get, NotSent, 0, 2, true, false, false),
            (&get, NotSent, 0, 2, false, true, false),
            (&get, NotSent, 0, 0, true, true, false),
            // Sent: only idempotent requests.
            (&get, Lost, 0, 2, true, true, true),
            (&post, Lost, 0, 2, true, true, false),
            (&get, Status(503), 0, 2, true, true, true),
            (&get, Status(502), 0, 2, true, true, true),
            (&get, Status(504), 0, 2, true, true, true),
            (&Method::PUT, Status(503), 0, 2, true, true, true),
            (&post, Status(503), 0, 2, true, true, false),
            // Other statuses are the answer.
            (&get, Status(500), 0, 2, true, true, false),
            (&get, Status(404), 0, 2, true, true, false),
            (&get, Status(200), 0, 2, true, true, false),
        ];
        for (i, (m, o, a, r, rep, b, want)) in rows.iter().enumerate() {
            assert_eq!(
                retry(m, (*o, None), None, (*a, *r), *rep, *b),
                *want,
                "row {i}: {m} {o:?}"
            );
        }
    }

    /// Envoy's retry budget: retries in flight below the share of requests in flight,
    /// or below the minimum concurrency, whichever is more.
    #[test]
    fn a_retry_budget_bounds_the_retries_in_flight() {
        use meshfed_catalog::http_route::RetryBudget;
        let b = |percent: u32, min: u32| RetryBudget {
            per_million: percent * 10_000,
            min_retry_concurrency: min,
        };
        for (budget, requests, retries, want) in [
            // Istio's defaults, 20 % and 3: 100 requests allow 20 retries at once.
            (b(20, 3), 100, 19, true),
            (b(20, 3), 100, 20, false),
            // Few requests: the minimum.
            (b(20, 3), 5, 2, true),
            (b(20, 3), 5, 3, false),
            // 0 % and 0: no retry at all.
            (b(0, 0), 1000, 0, false),
            // 100 %: as many retries as requests.
            (b(100, 0), 7, 6, true),
            (b(100, 0), 7, 7, false),
            (b(100, 3), u32::MAX, u32::MAX - 1, true),
        ] {
            assert_eq!(
                super::budget_allows(budget, requests, retries),
                want,
                "{budget:?} {requests} {retries}"
            );
        }
    }

    /// Retries wait a jittered, growing time: below base, 3 × base, then at most
    /// 10 × base; rolls spread it uniformly.
    #[test]
    fn retries_back_off_with_jitter() {
        let top = u32::MAX;
        for (base, retry, roll, want) in [
            (25, 1, 0, 0),
            (25, 1, top, 24),
            (25, 1, top / 2, 12),
            (25, 2, top, 74),
            (25, 3, top, 174),
            // 10 × base is the most, however many retries.
            (25, 4, top, 249),
            (25, 10, top, 249),
            (25, u32::MAX, top, 249),
            (0, 3, top, 0),
            (60_000, 2, top, 179_999),
            (u64::MAX, 5, top, u64::MAX - (1 << 32)),
        ] {
            assert_eq!(
                super::retry_backoff_ms(base, retry, roll),
                want,
                "base {base}, retry {retry}, roll {roll}"
            );
        }
        // Uniform over [0, ceiling): the rolls of 10,000 requests average about half.
        let mean = (0..10_000u64)
            .map(|n| super::retry_backoff_ms(100, 1, super::roll(n)))
            .sum::<u64>() as f64
            / 10_000.0;
        assert!((45.0..55.0).contains(&mean), "{mean}");
    }

    /// A route's `retryOn` decides which outcomes are retried, as Envoy's conditions do;
    /// a sent request still only when idempotent.
    #[test]
    fn retry_on_chooses_what_is_retried() {
        use Outcome::*;
        use meshfed_catalog::http_route::RetryOn;
        let (get, post) = (Method::GET, Method::POST);
        let on = |f: fn(&mut RetryOn)| {
            let mut r = RetryOn::default();
            f(&mut r);
            r
        };
        let five_xx = on(|r| r.five_xx = true);
        let gateway = on(|r| r.gateway_error = true);
        let connect = on(|r| r.connect_failure = true);
        let reset = on(|r| r.reset = true);
        let conflict = on(|r| r.retriable_4xx = true);
        let codes = on(|r| r.status_codes = vec![500, 429]);
        let grpc = on(|r| r.grpc_codes = vec![14]);
        // (retryOn, method, outcome, gRPC status) → retried
        let rows: &[(&RetryOn, &Method, Outcome, Option<u32>, bool)] = &[
            (&five_xx, &get, Status(500), None, true),
            (&five_xx, &get, Status(501), None, true),
            (&five_xx, &get, Status(404), None, false),
            (&five_xx, &get, Lost, None, true),
            (&five_xx, &post, NotSent, None, true),
            (&five_xx, &post, Status(500), None, false),
            (&gateway, &get, Status(503), None, true),
            (&gateway, &get, Status(500), None, false),
            (&gateway, &get, Lost, None, true),
            (&connect, &post, NotSent, None, true),
            (&connect, &get, Lost, None, false),
            (&connect, &get, Status(503), None, false),
            (&reset, &get, Lost, None, true),
            (&reset, &post, Lost, None, false),
            (&reset, &get, Status(503), None, false),
            (&conflict, &get, Status(409), None, true),
            (&conflict, &get, NotSent, None, false),
            (&codes, &get, Status(429), None, true),
            (&codes, &Method::DELETE, Status(500), None, true),
            (&codes, &get, Status(503), None, false),
            (&grpc, &get, Status(200), Some(14), true),
            (&grpc, &get, Status(200), Some(2), false),
            (&grpc, &get, Status(200), None, false),
            // gRPC calls are POSTs: sent, so not retried.
            (&grpc, &post, Status(200), Some(14), false),
        ];
        for (i, (r, m, o, g, want)) in rows.iter().enumerate() {
            assert_eq!(
                retry(m, (*o, *g), Some(r), (0, 2), true, true),
                *want,
                "row {i}: {r:?} {m} {o:?} {g:?}"
            );
        }
        // Attempts, replay and budget still bound it.
        for (attempts, replayable, budget) in [
            ((2, 2), true, true),
            ((0, 2), false, true),
            ((0, 2), true, false),
        ] {
            let s500 = (Status(500), None);
            assert!(!retry(
                &get,
                s500,
                Some(&five_xx),
                attempts,
                replayable,
                budget
            ));
        }
    }

    #[test]
    fn the_budget_caps_retries_at_the_ratio_plus_the_floor() {
        let mut b = RetryBudget::new(0.2, 1, Duration::from_secs(10));
        // 1000 requests in one second, all failing: 0.2 × 1000 + 1 × 10 retries.
        let mut granted = 0;
        for i in 0..1000 {
            b.deposit(5_000 + i);
            if b.withdraw(5_000 + i) {
                granted += 1;
            }
        }
        assert_eq!(granted, 210);
        // Nothing more in the same window.
        assert!(!b.withdraw(5_999));
        // Ten seconds on, the window has moved past it: the floor again.
        let later = 16_000;
        let got = (0..20).filter(|_| b.withdraw(later)).count();
        assert_eq!(got, 10);
    }

    #[test]
    fn rolls_split_by_weight_within_a_point() {
        use meshfed_catalog::http_route::{Destination, pick};
        let d = [
            Destination {
                service: None,
                port: None,
                subset: Some("a".into()),
                weight: 80,
                headers: None,
            },
            Destination {
                service: None,
                port: None,
                subset: Some("b".into()),
                weight: 20,
                headers: None,
            },
        ];
        for start in [0u64, 7, 1 << 40] {
            let b = (start..start + 10_000)
                .filter(|n| pick(&d, roll(*n)) == 1)
                .count();
            assert!((1900..=2100).contains(&b), "{b} of 10000 from {start}");
        }
    }

    #[test]
    fn consecutive_errors_eject_a_site_for_a_while_but_never_every_site() {
        use meshfed_catalog::SiteName;
        use meshfed_catalog::http_route::Outlier;
        let cfg = Outlier {
            consecutive_5xx: 3,
            consecutive_gateway: 0,
            base_ejection_ms: 1000,
            max_ejection_percent: 100,
            interval_ms: None,
        };
        let (a, b) = (SiteName::new("a").unwrap(), SiteName::new("b").unwrap());
        let ab = [a.clone(), b.clone()];
        let mut o = Outliers::default();
        let e = Outcome::Status(503);
        // Two errors, a success, two errors: not consecutive enough.
        assert!(!o.observe(&cfg, &a, e, &ab, 0));
        assert!(!o.observe(&cfg, &a, e, &ab, 0));
        assert!(!o.observe(&cfg, &a, Outcome::Status(200), &ab, 0));
        assert!(!o.observe(&cfg, &a, Outcome::Status(404), &ab, 0));
        assert!(!o.observe(&cfg, &a, e, &ab, 0));
        assert!(!o.observe(&cfg, &a, Outcome::Lost, &ab, 0));
        // The third in a row ejects it for the base time.
        assert!(o.observe(&cfg, &a, e, &ab, 10));
        assert!(o.is_ejected(&a, 1009) && !o.is_ejected(&a, 1010));
        // Never every site: b's errors do not eject it while a is out.
        for _ in 0..5 {
            assert!(!o.observe(&cfg, &b, e, &ab, 500));
        }
        assert!(!o.is_ejected(&b, 500));
        // Back, failing again: twice as long the second time.
        for t in [1100, 1100] {
            assert!(!o.observe(&cfg, &a, e, &ab, t));
        }
        assert!(o.observe(&cfg, &a, e, &ab, 1100));
        assert!(o.is_ejected(&a, 3099) && !o.is_ejected(&a, 3100));
        // The default 10 % of 2 sites still allows one; 0 thresholds never eject.
        let off = Outlier {
            consecutive_5xx: 0,
            ..cfg.clone()
        };
        let mut o = Outliers::default();
        for _ in 0..10 {
            assert!(!o.observe(&off, &a, e, &ab, 0));
        }
        let gw = Outlier {
            consecutive_5xx: 0,
            consecutive_gateway: 2,
            max_ejection_percent: 10,
            ..cfg
        };
        assert!(!o.observe(&gw, &a, Outcome::Status(500), &ab, 0));
        assert!(!o.observe(&gw, &a, e, &ab, 0));
        assert!(o.observe(&gw, &a, Outcome::NotSent, &ab, 0));
    }

    /// Each whole interval back in service takes one off a host's ejections so far,
    /// so an old outage does not lengthen the next ejection for ever (Envoy's
    /// multiplier decrement); time spent ejected does not count.
    #[test]
    fn time_back_in_service_shortens_the_next_ejection() {
        use meshfed_catalog::http_route::Outlier;
        let cfg = Outlier {
            consecutive_5xx: 1,
            consecutive_gateway: 0,
            base_ejection_ms: 1_000,
            max_ejection_percent: 50,
            interval_ms: Some(10_000),
        };
        let hosts = [1u32, 2];
        let e = Outcome::Status(503);
        let mut o: Outliers<u32> = Outliers::default();
        // Ejected at 0 (until 1 s), again at 1 s (until 3 s: twice the base).
        assert!(o.observe(&cfg, &1, e, &hosts, 0));
        assert!(o.observe(&cfg, &1, e, &hosts, 1_000));
        assert!(o.is_ejected(&1, 2_999) && !o.is_ejected(&1, 3_000));
        // Back at 3 s; one interval later (13 s) one ejection is forgiven: the next
        // lasts twice the base again, not three times.
        assert!(!o.observe(&cfg, &1, Outcome::Status(200), &hosts, 13_000));
        assert!(o.observe(&cfg, &1, e, &hosts, 13_000));
        assert!(o.is_ejected(&1, 14_999) && !o.is_ejected(&1, 15_000));
        // Two intervals back in service (15 s to 35 s) forgive both: the base again.
        assert!(o.observe(&cfg, &1, e, &hosts, 35_000));
        assert!(o.is_ejected(&1, 35_999) && !o.is_ejected(&1, 36_000));
        // Under Istio's default interval (10 s) the same holds; less than an interval
        // back forgives nothing: 36 s + 9 s, and the next ejection is twice the base.
        let default = Outlier {
            interval_ms: None,
            ..cfg
        };
        assert!(o.observe(&default, &1, e, &hosts, 45_000));
        assert!(o.is_ejected(&1, 46_999) && !o.is_ejected(&1, 47_000));
    }

    /// Endpoint churn: the state of endpoints that left is dropped, so it stays as large
    /// as the endpoints serving now, and an ejection of one that left no longer holds
    /// the `maxEjectionPercent` cap against those serving now.
    #[test]
    fn hosts_that_left_neither_grow_the_state_nor_hold_the_cap() {
        use meshfed_catalog::http_route::Outlier;
        let cfg = Outlier {
            consecutive_5xx: 1,
            consecutive_gateway: 0,
            base_ejection_ms: 60_000,
            max_ejection_percent: 10,
            interval_ms: None,
        };
        let e = Outcome::Status(503);
        let mut o: Outliers<u32> = Outliers::default();
        // Three endpoints; 10 % of three still allows one ejection.
        let first = [1, 2, 3];
        assert!(o.observe(&cfg, &1, e, &first, 0));
        assert!(!o.observe(&cfg, &2, e, &first, 0), "the cap holds");
        // 1 is replaced by 4 (its ejection still running): 2 or 4 may be ejected now.
        let second = [2, 3, 4];
        assert!(o.observe(&cfg, &4, e, &second, 10));
        // A thousand endpoints come and go, three at a time: the state stays small.
        for k in 0..1000u32 {
            let now = [k + 10, k + 11, k + 12];
            o.observe(&cfg, &(k + 10), Outcome::Status(500), &now, 20);
            o.observe(&cfg, &(k + 11), Outcome::Status(200), &now, 20);
            assert!(o.len() <= 4, "{} hosts kept for 3 serving", o.len());
        }
    }

    #[test]
    fn an_idle_budget_still_allows_the_floor() {
        let mut b = RetryBudget::linkerd_default();
        let got = (0..200).filter(|_| b.withdraw(1_000)).count();
        assert_eq!(got, 100, "10 per second over 10 s");
    }
}
