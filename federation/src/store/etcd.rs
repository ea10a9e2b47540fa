//! The etcd store: any number of federation replicas on one etcd.
//!
//! Each replica keeps a [`Mirror`] of every key under the prefix, fed by one etcd watch
//! that resumes by revision after any break. Reads (catalog, bundles, watch starts) come
//! from the mirror; writes are etcd transactions, and a write returns only once the
//! mirror has seen its revision, so a replica reads its own writes. Catalog revisions
//! are etcd revisions: they are the same on every replica, which is what lets a gateway
//! resume on another replica with no full resync. A starting replica primes its history
//! from etcd's own (up to `history` revisions back, if not compacted).
//!
//! With several etcd members, requests go only to members that answer a linearizable
//! read ([`pool_after_probe`], every 500 ms), and a watch that stays silent while writes
//! wait for it is resumed elsewhere: losing one member of three costs an election, not
//! half the requests.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, GetOptions, PutOptions, Txn, TxnOp, WatchOptions,
};
use tokio::sync::{broadcast, watch};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::mirror::{KvEvent, Layout, Mirror};
use super::{Committed, StoreError, StoreEvent, WatchStart};
use meshfed_catalog::catalog::{Catalog, CatalogError, Change, Resume, Revision};
use meshfed_catalog::names::SiteName;
use meshfed_catalog::token::{Claim, JoinToken, TokenRecord, redeem};

/// etcd's default `--max-txn-ops` is 128; stay under it.
const MAX_TXN_OPS: usize = 120;
/// How long a watch may stay silent while writes wait for it (progress is requested
/// every 50 ms), or take to open, before it is dropped and resumed on another member.
const WATCH_SILENCE: Duration = Duration::from_secs(1);
/// How often an idle watch is asked for progress, and how long it may then stay silent.
const IDLE_PROBE: Duration = Duration::from_secs(1);
const IDLE_SILENCE: Duration = Duration::from_secs(3);
/// How long a write waits for the mirror to show it.
const READ_YOUR_WRITES: Duration = Duration::from_secs(10);
/// A replica's registration outlives it by this much.
const REPLICA_TTL: Duration = Duration::from_secs(5);
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

#[derive(Clone, Debug)]
pub struct EtcdOptions {
    pub endpoints: Vec<String>,
    pub prefix: String,
    /// TLS and authentication toward etcd.
    pub security: EtcdSecurity,
    /// Revisions of history to keep for resuming watches.
    pub history: usize,
    /// This replica's API addresses, registered for tokens.
    pub addresses: Vec<String>,
}

/// How the federation proves itself to etcd and checks etcd's certificate. etcd holds
/// every site's trust bundle: whoever can write to it can make the federation trust any
/// CA. Use TLS with client certificates (`--client-cert-auth`), and etcd users with roles
/// limited to the federation's prefix.
#[derive(Clone, Debug, Default)]
pub struct EtcdSecurity {
    /// The CA that signed etcd's serving certificates (PEM); needed for `https://`
    /// endpoints (no system roots are used).
    pub ca: Option<PathBuf>,
    /// A client certificate and its key (PEM), for etcd's `--client-cert-auth`.
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    /// An etcd user and its password (etcd's `auth enable`).
    pub user: Option<(String, String)>,
}

impl EtcdSecurity {
    /// The client's connect options, after checking that they fit the endpoints.
    fn connect_options(&self, endpoints: &[String]) -> Result<ConnectOptions, StoreError> {
        let bad = |detail: String| StoreError::Etcd {
            op: "configure",
            detail,
        };
        let https = endpoints
            .iter()
            .filter(|e| e.starts_with("https://"))
            .count();
        if https != 0 && https != endpoints.len() {
            return Err(bad("mix of http:// and https:// etcd endpoints".into()));
        }
        let tls = self.ca.is_some() || self.cert.is_some() || self.key.is_some();
        if https == 0 && tls {
            return Err(bad(
                "TLS options (CA, client certificate) given for http:// etcd endpoints: use https://".into(),
            ));
        }
        let mut opts = ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(3))
            .with_timeout(Duration::from_secs(10))
            .with_keep_alive(Duration::from_secs(2), Duration::from_secs(5));
        if https > 0 {
            let read = |what: &str, p: &PathBuf| {
                std::fs::read(p).map_err(|e| bad(format!("{what} {}: {e}", p.display())))
            };
            let ca = self.ca.as_ref().ok_or_else(|| {
                bad("https:// etcd endpoints need the CA that signed etcd's certificate (--etcd-ca)".into())
            })?;
            let mut tls = etcd_client::TlsOptions::new()
                .ca_certificate(etcd_client::Certificate::from_pem(read("etcd CA", ca)?));
            match (&self.cert, &self.key) {
                (Some(c), Some(k)) => {
                    tls = tls.identity(etcd_client::Identity::from_pem(
                        read("etcd client certificate", c)?,
                        read("etcd client key", k)?,
                    ));
                }
                (None, None) => {}
                _ => {
                    return Err(bad(
                        "an etcd client certificate needs its key, and a key its certificate"
                            .into(),
                    ));
                }
            }
            opts = opts.with_tls(tls);
        }
        if let Some((user, password)) = &self.user {
            if https == 0 {
                warn!("etcd password sent over plaintext http://; use https:// endpoints");
            }
            opts = opts.with_user(user.clone(), password.clone());
        }
        Ok(opts)
    }
}

pub struct EtcdStore {
    client: Client,
    layout: Layout,
    /// This replica's id (random per process).
    pub replica: String,
    mirror: Mutex<Mirror>,
    events: broadcast::Sender<StoreEvent>,
    /// Newest etcd revision the mirror has applied.
    applied: watch::Sender<i64>,
    bundles_changed: watch::Sender<u64>,
    /// Callers waiting for the mirror: the follower asks etcd for progress meanwhile.
    waiters: AtomicUsize,
    /// Why the mirror is not following etcd, while its watch is broken.
    broken: Mutex<Option<String>>,
    pub(crate) commit_seconds: prometheus_client::metrics::histogram::Histogram,
    stop: CancellationToken,
}

fn etcd_err(op: &'static str) -> impl Fn(etcd_client::Error) -> StoreError {
    move |e| StoreError::Etcd {
        op,
        detail: e.to_string(),
    }
}

fn random_id() -> String {
    use ring::rand::SecureRandom;
    let mut b = [0u8; 6];
    let _ = ring::rand::SystemRandom::new().fill(&mut b);
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn to_json<T: serde::Serialize>(v: &T) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(v).map_err(|e| StoreError::Etcd {
        op: "encode",
        detail: e.to_string(),
    })
}

impl EtcdStore {
    /// Connects, loads the mirror (priming its history from etcd), starts following, and
    /// registers this replica. Fails loudly when etcd is not reachable.
    pub async fn open(opts: EtcdOptions) -> Result<Arc<Self>, StoreError> {
        let connect = opts.security.connect_options(&opts.endpoints)?;
        let mut client = Client::connect(&opts.endpoints, Some(connect.clone()))
            .await
            .map_err(etcd_err("connect"))?;

        let layout = Layout::new(&opts.prefix);
        let head = client
            .get(
                layout.prefix.as_str(),
                Some(
                    GetOptions::new()
                        .with_prefix()
                        .with_keys_only()
                        .with_limit(1),
                ),
            )
            .await
            .map_err(etcd_err("get"))?;
        let current = head.header().map_or(0, |h| h.revision());
        // Start far enough back to serve resumes from before this replica existed.
        let mut start = (current - opts.history as i64).max(1).min(current);
        let snapshot = loop {
            match client
                .kv_client()
                .max_decoding_message_size(ETCD_MESSAGE_MAX)
                .get(
                    layout.prefix.as_str(),
                    Some(GetOptions::new().with_prefix().with_revision(start)),
                )
                .await
            {
                Ok(r) => break r,
                Err(e) if start < current && e.to_string().contains("compacted") => {
                    start = current;
                }
                Err(e) => return Err(etcd_err("get")(e)),
            }
        };
        let kvs = snapshot
            .kvs()
            .iter()
            .map(|kv| (kv.key().to_vec(), kv.value().to_vec()))
            .collect();
        let (mirror, skipped) = Mirror::load(layout.clone(), kvs, start, opts.history);
        for s in skipped {
            warn!(reason = %s, "etcd key ignored");
        }
        let store = Arc::new(Self {
            client,
            layout,
            replica: random_id(),
            mirror: Mutex::new(mirror),
            events: broadcast::channel(4096).0,
            applied: watch::channel(start).0,
            bundles_changed: watch::channel(0).0,
            waiters: AtomicUsize::new(0),
            broken: Mutex::new(None),
            commit_seconds: super::commit_histogram(),
            stop: CancellationToken::new(),
        });
        tokio::spawn(store.clone().follow_forever());
        if opts.endpoints.len() > 1 {
            tokio::spawn(keep_live_endpoints(
                store.client.clone(),
                opts.endpoints.clone(),
                connect,
                store.stop.clone(),
            ));
        }
        store.wait_for(current).await?;
        let key = store.layout.replica(&store.replica);
        let value = to_json(&opts.addresses)?;
        tokio::spawn(
            store
                .clone()
                .hold_key(key, value, REPLICA_TTL, store.stop.clone(), None),
        );
        // Registered before serving, so tokens made right away list this replica.
        let deadline = tokio::time::Instant::now() + READ_YOUR_WRITES;
        while !store.lock().replicas.contains_key(&store.replica) {
            if tokio::time::Instant::now() > deadline {
                return Err(StoreError::Etcd {
                    op: "register replica",
                    detail: format!("not visible after {READ_YOUR_WRITES:?}"),
                });
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        info!(
            replica = %store.replica,
            revision = current,
            history_from = start,
            prefix = %store.layout.prefix,
            "etcd store ready"
        );
        Ok(store)
    }

    /// Why this replica cannot serve, if it cannot: its watch on etcd is broken, so
    /// its reads are stale and its writes would wait for a mirror that does not move.
    pub fn unhealthy(&self) -> Option<String> {
        self.broken
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Stops following etcd and renewing this replica's leases (they then expire).
    pub fn shutdown(&self) {
        self.stop.cancel();
    }

    fn lock(&self) -> MutexGuard<'_, Mirror> {
        self.mirror.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn revision(&self) -> Revision {
        self.lock().catalog.revision
    }

    pub fn with_catalog<R>(&self, f: impl FnOnce(&Catalog) -> R) -> R {
        f(&self.lock().catalog)
    }

    pub fn bundles(&self) -> BTreeMap<String, String> {
        self.lock().bundles.clone()
    }

    pub fn subscribe_bundles(&self) -> watch::Receiver<u64> {
        self.bundles_changed.subscribe()
    }

    /// The gateway addresses live gateway replicas of `site` hold, on any replica.
    pub fn named_addresses(&self, site: &SiteName) -> BTreeSet<String> {
        self.lock().named_addresses(site)
    }

    /// The API addresses of every live replica, for join tokens.
    pub fn replica_addresses(&self) -> Vec<String> {
        let set: BTreeSet<String> = self.lock().replicas.values().flatten().cloned().collect();
        set.into_iter().collect()
    }

    pub fn watch(&self, from: Option<Revision>) -> (WatchStart, broadcast::Receiver<StoreEvent>) {
        let m = self.lock();
        let rx = self.events.subscribe();
        let start = match from.map(|f| (f, m.history.since(f))) {
            Some((f, Resume::Deltas(d)))
                if f.0 as i64 <= m.revision.max(m.catalog.revision.0 as i64) =>
            {
                WatchStart::Deltas(d)
            }
            _ => WatchStart::Snapshot(m.catalog.clone()),
        };
        (start, rx)
    }

    /// Waits (bounded) until the mirror has applied etcd revision `rev`: a gateway that
    /// saw `rev` on another replica resumes here only once this one has it too.
    pub async fn caught_up(&self, rev: Revision) -> Result<(), StoreError> {
        self.wait_for(i64::try_from(rev.0).unwrap_or(i64::MAX))
            .await
    }

    /// Waits until the mirror has applied etcd revision `rev`.
    async fn wait_for(&self, rev: i64) -> Result<(), StoreError> {
        let mut rx = self.applied.subscribe();
        self.waiters.fetch_add(1, Ordering::SeqCst);
        let r = tokio::time::timeout(READ_YOUR_WRITES, rx.wait_for(|a| *a >= rev)).await;
        self.waiters.fetch_sub(1, Ordering::SeqCst);
        match r {
            Ok(Ok(_)) => Ok(()),
            _ => Err(StoreError::Etcd {
                op: "watch",
                detail: format!("the mirror did not reach revision {rev} in {READ_YOUR_WRITES:?}"),
            }),
        }
    }

    /// Turns catalog changes into etcd transactions (at most [`MAX_TXN_OPS`] operations
    /// each; a larger publish is applied in several revisions). An export of a site
    /// that does not exist is refused by a compare, like the embedded store refuses it.
    pub async fn commit(&self, changes: Vec<Change>) -> Result<Revision, StoreError> {
        if changes.is_empty() {
            return Ok(self.revision());
        }
        let l = &self.layout;
        let mut chunks: Vec<Vec<&Change>> = vec![vec![]];
        let mut ops_in_chunk = 0;
        for c in &changes {
            let n = match c {
                Change::DeleteSite { .. } => 3,
                _ => 1,
            };
            if ops_in_chunk + n > MAX_TXN_OPS {
                chunks.push(vec![]);
                ops_in_chunk = 0;
            }
            ops_in_chunk += n;
            chunks.last_mut().expect("one chunk at least").push(c);
        }
        let mut last = 0;
        let mut client = self.client.clone();
        for chunk in chunks {
            let mut ops = Vec::with_capacity(chunk.len());
            let mut put_sites = BTreeSet::new();
            let mut export_sites = BTreeMap::new();
            for c in chunk {
                match c {
                    Change::PutSite(rec) => {
                        put_sites.insert(rec.site.clone());
                        ops.push(TxnOp::put(l.site(&rec.site), to_json(rec)?, None));
                    }
                    Change::DeleteSite { site } => {
                        ops.push(TxnOp::delete(l.site(site), None));
                        ops.push(TxnOp::delete(
                            l.exports_of(site),
                            Some(etcd_client::DeleteOptions::new().with_prefix()),
                        ));
                        ops.push(TxnOp::delete(
                            l.alive_of(site),
                            Some(etcd_client::DeleteOptions::new().with_prefix()),
                        ));
                    }
                    Change::PutExport { site, export } => {
                        export_sites
                            .entry(site.clone())
                            .or_insert_with(|| export.service.clone());
                        ops.push(TxnOp::put(
                            l.export(site, &export.service),
                            to_json(export)?,
                            None,
                        ));
                    }
                    Change::DeleteExport { site, service } => {
                        ops.push(TxnOp::delete(l.export(site, service), None));
                    }
                }
            }
            let needed: Vec<(SiteName, _)> = export_sites
                .into_iter()
                .filter(|(s, _)| !put_sites.contains(s))
                .collect();
            let compares: Vec<Compare> = needed
                .iter()
                .map(|(s, _)| Compare::version(l.site(s), CompareOp::Greater, 0))
                .collect();
            let resp = client
                .txn(Txn::new().when(compares).and_then(ops))
                .await
                .map_err(etcd_err("txn"))?;
            if !resp.succeeded() {
                let (site, service) = needed.into_iter().next().expect("a compare failed");
                return Err(CatalogError::UnknownSite { site, service }.into());
            }
            last = resp.header().map_or(last, |h| h.revision());
        }
        self.wait_for(last).await?;
        Ok(Revision(last.max(0) as u64))
    }

    pub async fn add_token(&self, token: &JoinToken, rec: TokenRecord) -> Result<(), StoreError> {
        self.client
            .clone()
            .put(
                self.layout.token(&token.secret_hash()),
                to_json(&rec)?,
                None,
            )
            .await
            .map_err(etcd_err("put"))?;
        Ok(())
    }

    /// One use, across replicas: the used mark is a compare-and-swap on the record's
    /// mod revision, so two replicas redeeming at once cannot both succeed.
    pub async fn redeem_token(
        &self,
        token: &JoinToken,
        claim: &Claim,
        now: i64,
    ) -> Result<(), StoreError> {
        let hash = token.secret_hash();
        let key = self.layout.token(&hash);
        let mut client = self.client.clone();
        loop {
            let got = client
                .get(key.as_str(), None)
                .await
                .map_err(etcd_err("get"))?;
            let mut records = BTreeMap::new();
            let mut seen_rev = 0;
            if let Some(kv) = got.kvs().first() {
                let rec: TokenRecord =
                    serde_json::from_slice(kv.value()).map_err(|e| StoreError::Etcd {
                        op: "decode token",
                        detail: e.to_string(),
                    })?;
                records.insert(hash.clone(), rec);
                seen_rev = kv.mod_revision();
            }
            redeem(&mut records, token, claim, now)?;
            let rec = &records[&hash];
            let resp = client
                .txn(
                    Txn::new()
                        .when([Compare::mod_revision(
                            key.as_str(),
                            CompareOp::Equal,
                            seen_rev,
                        )])
                        .and_then([TxnOp::put(key.as_str(), to_json(rec)?, None)]),
                )
                .await
                .map_err(etcd_err("txn"))?;
            if resp.succeeded() {
                return Ok(());
            }
            debug!("token record changed under us; reading it again");
        }
    }

    pub async fn set_bundle(&self, trust_domain: &str, jwks: String) -> Result<(), StoreError> {
        if self.lock().bundles.get(trust_domain) == Some(&jwks) {
            return Ok(());
        }
        let resp = self
            .client
            .clone()
            .put(self.layout.bundle(trust_domain), jwks, None)
            .await
            .map_err(etcd_err("put"))?;
        self.wait_for(resp.header().map_or(0, |h| h.revision()))
            .await
    }

    pub async fn remove_bundle(&self, trust_domain: &str) -> Result<(), StoreError> {
        if !self.lock().bundles.contains_key(trust_domain) {
            return Ok(());
        }
        let resp = self
            .client
            .clone()
            .delete(self.layout.bundle(trust_domain), None)
            .await
            .map_err(etcd_err("delete"))?;
        self.wait_for(resp.header().map_or(0, |h| h.revision()))
            .await
    }

    /// Keeps `site` up while the returned token is not cancelled: an `alive` key on an
    /// etcd lease of `ttl`, renewed at a third of it. Once cancelled (the last Watch
    /// stream closed, or this replica died) the lease runs out and etcd deletes the key.
    pub fn hold_site(self: &Arc<Self>, site: &SiteName, ttl: Duration) -> CancellationToken {
        let stop = self.stop.child_token();
        let key = self.layout.alive(site, &self.replica);
        tokio::spawn(self.clone().hold_key(
            key,
            self.replica.clone().into_bytes(),
            ttl,
            stop.clone(),
            None,
        ));
        stop
    }

    /// Marks `site` up for one `ttl` with no renewal (a join, or a publish with no Watch).
    pub async fn arm_site(&self, site: &SiteName, ttl: Duration) -> Result<(), StoreError> {
        let mut client = self.client.clone();
        let lease = client
            .lease_grant(ttl_secs(ttl), None)
            .await
            .map_err(etcd_err("lease grant"))?;
        let resp = client
            .put(
                self.layout.alive(site, &format!("arm-{}", self.replica)),
                self.replica.as_bytes(),
                Some(PutOptions::new().with_lease(lease.id())),
            )
            .await
            .map_err(etcd_err("put"))?;
        self.wait_for(resp.header().map_or(0, |h| h.revision()))
            .await
    }

    /// Names `address` as a live gateway replica of `site` until `stop` (or this store's
    /// shutdown): an `alive/<site>/<replica>@<address>` key on an etcd lease of `ttl`,
    /// which also keeps the site up. Every federation replica keeps an address some
    /// such key names ([`crate::replicas`]). The key is in etcd before this returns, so
    /// a site record that lists the address afterwards is never read without it.
    pub async fn hold_address(
        self: &Arc<Self>,
        site: &SiteName,
        address: &str,
        ttl: Duration,
        stop: CancellationToken,
    ) {
        let key = self
            .layout
            .alive(site, &format!("{}@{address}", self.replica));
        let value = address.as_bytes().to_vec();
        let first = tokio::select! {
            r = self.put_leased(&key, &value, ttl) => r,
            _ = stop.cancelled() => return,
        };
        let first = match first {
            Ok(lease) => Some(lease),
            Err(e) => {
                warn!(%key, error = %e, "gateway address lease not written; retrying");
                None
            }
        };
        tokio::spawn(self.clone().hold_key(key, value, ttl, stop, first));
    }

    /// Puts `key` on a lease of `ttl` (or renews `first`, already holding it) and renews
    /// it until `stop` or this store's shutdown; recreates both if the lease is lost (etcd
    /// restarted, a long pause).
    async fn hold_key(
        self: Arc<Self>,
        key: String,
        value: Vec<u8>,
        ttl: Duration,
        stop: CancellationToken,
        mut first: Option<i64>,
    ) {
        let mut backoff = BACKOFF_MIN;
        loop {
            let once = async {
                match first.take() {
                    Some(lease) => self.keep(lease, ttl).await,
                    None => self.hold_once(&key, &value, ttl).await,
                }
            };
            let r = tokio::select! {
                r = once => r,
                _ = stop.cancelled() => return,
                _ = self.stop.cancelled() => return,
            };
            match r {
                Ok(()) => backoff = BACKOFF_MIN,
                Err(e) => warn!(%key, error = %e, retry_in = ?backoff, "lease lost"),
            }
            tokio::select! {
                _ = tokio::time::sleep(backoff) => {}
                _ = stop.cancelled() => return,
                _ = self.stop.cancelled() => return,
            }
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
    }

    async fn hold_once(&self, key: &str, value: &[u8], ttl: Duration) -> Result<(), HoldError> {
        let lease = self.put_leased(key, value, ttl).await?;
        self.keep(lease, ttl).await
    }

    /// Puts `key` on a new lease of `ttl`; returns the lease.
    async fn put_leased(&self, key: &str, value: &[u8], ttl: Duration) -> Result<i64, HoldError> {
        let mut client = self.client.clone();
        let lease = client.lease_grant(ttl_secs(ttl), None).await?;
        client
            .put(key, value, Some(PutOptions::new().with_lease(lease.id())))
            .await?;
        Ok(lease.id())
    }

    /// Renews `lease` at a third of `ttl` until it is lost.
    async fn keep(&self, lease: i64, ttl: Duration) -> Result<(), HoldError> {
        let mut client = self.client.clone();
        let (mut keeper, mut responses) = client.lease_keep_alive(lease).await?;
        let every = (ttl / 3).max(Duration::from_millis(200));
        loop {
            tokio::time::sleep(every).await;
            keeper.keep_alive().await?;
            match responses.message().await? {
                Some(r) if r.ttl() > 0 => {}
                _ => return Err(HoldError::Expired),
            }
        }
    }

    /// Follows etcd from the mirror's revision, forever: after a break it resumes at the
    /// next revision; if etcd compacted past it, it reloads and tells watchers to resync.
    async fn follow_forever(self: Arc<Self>) {
        let mut backoff = BACKOFF_MIN;
        loop {
            let from = self.lock().revision + 1;
            match self.follow(from).await {
                Ok(()) => return,
                Err(Follow::Compacted(at)) => {
                    warn!(
                        from,
                        compacted = at,
                        "etcd compacted past the mirror: reloading"
                    );
                    if let Err(e) = self.reload().await {
                        warn!(error = %e, "reload failed");
                    }
                }
                Err(Follow::Broken(e)) => {
                    let resume_at = self.lock().revision + 1;
                    warn!(resume_at, error = %e, retry_in = ?backoff, "etcd watch broke; resuming");
                    *self.broken.lock().unwrap_or_else(|p| p.into_inner()) =
                        Some(format!("etcd watch broken: {e}"));
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = self.stop.cancelled() => return,
                    }
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                    continue;
                }
            }
            backoff = BACKOFF_MIN;
        }
    }

    async fn reload(&self) -> Result<(), StoreError> {
        let r = self
            .client
            .kv_client()
            .max_decoding_message_size(ETCD_MESSAGE_MAX)
            .get(
                self.layout.prefix.as_str(),
                Some(GetOptions::new().with_prefix()),
            )
            .await
            .map_err(etcd_err("get"))?;
        let rev = r.header().map_or(0, |h| h.revision());
        let kvs = r
            .kvs()
            .iter()
            .map(|kv| (kv.key().to_vec(), kv.value().to_vec()))
            .collect();
        let cap = super::DEFAULT_HISTORY;
        let (fresh, skipped) = Mirror::load(self.layout.clone(), kvs, rev, cap);
        for s in skipped {
            warn!(reason = %s, "etcd key ignored");
        }
        *self.lock() = fresh;
        self.applied.send_modify(|a| *a = (*a).max(rev));
        self.bundles_changed.send_modify(|v| *v += 1);
        let _ = self.events.send(StoreEvent::Reset);
        Ok(())
    }

    async fn follow(&self, from: i64) -> Result<(), Follow> {
        let mut client = self
            .client
            .watch_client()
            .max_decoding_message_size(ETCD_MESSAGE_MAX);
        let opts = WatchOptions::new()
            .with_prefix()
            .with_start_revision(from)
            .with_progress_notify();
        let watch = tokio::time::timeout(
            WATCH_SILENCE,
            client.watch(self.layout.prefix.as_str(), Some(opts)),
        );
        let mut stream = tokio::select! {
            r = watch => r
                .map_err(|_| Follow::Broken(format!("no watch within {WATCH_SILENCE:?}")))?
                .map_err(|e| Follow::Broken(e.to_string()))?,
            _ = self.stop.cancelled() => return Ok(()),
        };
        let mut tick = tokio::time::interval(Duration::from_millis(50));
        // A writer waits for the mirror: the watch must answer its progress requests.
        // One that stays silent is on a member that died or lost the quorum (its TCP
        // connection may take minutes to fail): drop it and resume on a live one.
        // Idle, it is asked for progress every IDLE_PROBE and must answer within
        // IDLE_SILENCE: a watch left on a dead member after the last write would
        // otherwise hold this replica's watchers behind it until TCP gives up (a
        // fault-suite run: both watchers one revision behind for 20 s after a member
        // kill).
        let mut heard = tokio::time::Instant::now();
        let mut probed = heard;
        let mut was_waiting = false;
        loop {
            let msg = tokio::select! {
                m = stream.message() => m.map_err(|e| Follow::Broken(e.to_string()))?,
                _ = tick.tick() => {
                    let waiting = self.waiters.load(Ordering::SeqCst) > 0;
                    if waiting && !was_waiting {
                        // The tighter bound counts from when writes began to wait.
                        let now = tokio::time::Instant::now();
                        heard = heard.max(now.checked_sub(WATCH_SILENCE / 2).unwrap_or(now));
                    }
                    was_waiting = waiting;
                    let limit = if waiting { WATCH_SILENCE } else { IDLE_SILENCE };
                    if heard.elapsed() > limit {
                        return Err(Follow::Broken(format!(
                            "no progress for {limit:?}{}",
                            if waiting { " while writes wait" } else { "" }
                        )));
                    }
                    if waiting || probed.elapsed() >= IDLE_PROBE {
                        probed = tokio::time::Instant::now();
                        // Bounded: on a stuck connection the request channel fills, and
                        // an unbounded send would stall this loop and the check above.
                        let _ = tokio::time::timeout(
                            Duration::from_millis(100),
                            stream.request_progress(),
                        )
                        .await;
                    }
                    continue;
                }
                _ = self.stop.cancelled() => return Ok(()),
            };
            heard = tokio::time::Instant::now();
            let Some(resp) = msg else {
                return Err(Follow::Broken("watch stream ended".into()));
            };
            if resp.canceled() {
                if resp.compact_revision() > 0 {
                    return Err(Follow::Compacted(resp.compact_revision()));
                }
                return Err(Follow::Broken(format!(
                    "watch cancelled: {}",
                    resp.cancel_reason()
                )));
            }
            let header = resp.header().map_or(0, |h| h.revision());
            if resp.created() {
                *self.broken.lock().unwrap_or_else(|p| p.into_inner()) = None;
                continue; // its header is etcd's head, not what we have applied
            }
            if resp.events().is_empty() {
                // Progress: every event up to `header` has been delivered.
                {
                    let mut m = self.lock();
                    m.revision = m.revision.max(header);
                }
                self.applied.send_modify(|a| *a = (*a).max(header));
                continue;
            }
            self.apply_events(resp.events());
        }
    }

    /// Applies one watch response: events grouped by revision, each group one broadcast.
    fn apply_events(&self, events: &[etcd_client::Event]) {
        let mut groups: Vec<(i64, Vec<KvEvent>)> = Vec::new();
        for ev in events {
            let Some(kv) = ev.kv() else { continue };
            let rev = kv.mod_revision();
            let kev = match ev.event_type() {
                etcd_client::EventType::Put => KvEvent::Put {
                    key: kv.key().to_vec(),
                    value: kv.value().to_vec(),
                },
                etcd_client::EventType::Delete => KvEvent::Delete {
                    key: kv.key().to_vec(),
                },
            };
            match groups.last_mut() {
                Some((r, g)) if *r == rev => g.push(kev),
                _ => groups.push((rev, vec![kev])),
            }
        }
        let mut newest = 0;
        for (rev, group) in groups {
            let applied = self.lock().apply(rev, &group);
            for s in &applied.skipped {
                warn!(revision = rev, reason = %s, "etcd key ignored");
            }
            if applied.bundles_changed {
                self.bundles_changed.send_modify(|v| *v += 1);
            }
            if !applied.deltas.is_empty() {
                let _ = self
                    .events
                    .send(StoreEvent::Deltas(Committed::new(applied.deltas)));
            }
            newest = rev;
        }
        self.applied.send_modify(|a| *a = (*a).max(newest));
    }
}

enum Follow {
    Compacted(i64),
    Broken(String),
}

/// The largest message the store takes from etcd. A watch that catches up (a replica
/// starting with history to serve, or resuming after a break) gets up to 1000 revisions
/// in one response, and a reload reads the whole prefix; both were held to tonic's
/// default of 4 MiB, so a federation on etcd could not start again after a burst of
/// changes: its watch broke on a 10 MiB response at the same revision on every retry
/// (bench/catalog --scale, 100,000 services and ~50,000 endpoint changes). etcd is the
/// operator's own store, not a peer; a response is still at most this.
const ETCD_MESSAGE_MAX: usize = 256 << 20;

/// How often each configured etcd endpoint is probed, and how long a probe may take.
const PROBE_EVERY: Duration = Duration::from_millis(500);
const PROBE_TIMEOUT: Duration = Duration::from_millis(800);

/// The endpoints the client should balance over after a probe round: the healthy ones,
/// or all of them while none is (so the client keeps trying every one). Pure.
pub fn pool_after_probe(endpoints: &[String], healthy: &[bool]) -> Vec<String> {
    let live: Vec<String> = endpoints
        .iter()
        .zip(healthy)
        .filter(|(_, h)| **h)
        .map(|(e, _)| e.clone())
        .collect();
    if live.is_empty() {
        endpoints.to_vec()
    } else {
        live
    }
}

/// Keeps `client`'s balanced channel on the members that serve. etcd-client balances
/// over every endpoint it was given and keeps a dead member in the pool, so with one
/// member of three killed about half the requests went to it and failed (each after a
/// connect attempt) although the other two had a quorum: the fault suite measured no
/// publish acknowledged for 6.5 s. Each member is probed with a linearizable read (a
/// member cut from the quorum fails it too) every [`PROBE_EVERY`]; failing ones leave
/// the pool, recovered ones rejoin it. Ends with the store (`stop`).
async fn keep_live_endpoints(
    client: Client,
    endpoints: Vec<String>,
    connect: ConnectOptions,
    stop: CancellationToken,
) {
    let mut probes: Vec<Option<Client>> = vec![None; endpoints.len()];
    let mut pool: Vec<String> = endpoints.clone();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(PROBE_EVERY) => {}
            _ = stop.cancelled() => return,
        }
        let mut healthy = Vec::with_capacity(endpoints.len());
        for (e, probe) in endpoints.iter().zip(probes.iter_mut()) {
            if probe.is_none() {
                *probe = tokio::time::timeout(
                    PROBE_TIMEOUT,
                    Client::connect([e.as_str()], Some(connect.clone())),
                )
                .await
                .ok()
                .and_then(Result::ok);
            }
            let ok = match probe {
                Some(c) => matches!(
                    tokio::time::timeout(
                        PROBE_TIMEOUT,
                        c.get("\0meshfed-probe", Some(GetOptions::new().with_count_only())),
                    )
                    .await,
                    Ok(Ok(_))
                ),
                None => false,
            };
            healthy.push(ok);
        }
        let want = pool_after_probe(&endpoints, &healthy);
        for e in pool.iter().filter(|e| !want.contains(e)) {
            warn!(endpoint = %e, "etcd endpoint not serving; requests avoid it");
            if let Err(err) = client.remove_endpoint(e).await {
                debug!(endpoint = %e, error = %err, "remove etcd endpoint");
            }
        }
        for e in want.iter().filter(|e| !pool.contains(e)) {
            info!(endpoint = %e, "etcd endpoint serving again");
            if let Err(err) = client.add_endpoint(e).await {
                debug!(endpoint = %e, error = %err, "add etcd endpoint");
            }
        }
        pool = want;
    }
}

fn ttl_secs(ttl: Duration) -> i64 {
    i64::try_from(ttl.as_secs().max(1) + u64::from(ttl.subsec_nanos() > 0)).unwrap_or(i64::MAX)
}
/// Why a leased key stopped being held.
#[derive(Debug, thiserror::Error)]
enum HoldError {
    #[error(transparent)]
    Etcd(#[from] etcd_client::Error),
    #[error("lease expired")]
    Expired,
}

#[cfg(test)]
mod tests {
    use super::pool_after_probe;

    #[test]
    fn the_pool_keeps_serving_members_and_never_empties() {
        let e: Vec<String> = ["a", "b", "c"].iter().map(|s| (*s).to_owned()).collect();
        for (healthy, want) in [
            ([true, true, true], vec!["a", "b", "c"]),
            ([false, true, true], vec!["b", "c"]),
            ([false, true, false], vec!["b"]),
            // None serves (no quorum): keep trying every one.
            ([false, false, false], vec!["a", "b", "c"]),
        ] {
            assert_eq!(pool_after_probe(&e, &healthy), want, "{healthy:?}");
        }
    }
}
