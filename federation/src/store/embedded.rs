//! The embedded store (the default): one federation node, the catalog in memory, a snapshot on disk.
//!
//! Revisions never go back, even after a crash that loses unflushed commits: the
//! snapshot records a *reservation* — a revision the store promises not to reach before
//! the next snapshot. A commit that would reach it flushes first (extending it), and a
//! reopened store starts at the reservation. Watchers that had seen a lost commit then
//! resume from a revision below the new history's floor and get a snapshot. A clean
//! shutdown ([`EmbeddedStore::close`]) writes the revision itself as the reservation: no
//! commit can follow, so the reopened store continues at that revision, and watchers at
//! it resume with no snapshot (a federation restart costs its watchers nothing).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::{Notify, broadcast, watch};
use tracing::warn;

use super::{Committed, StoreError, StoreEvent, WatchStart};
use meshfed_catalog::catalog::{Catalog, Change, Delta, History, Resume, Revision};
use meshfed_catalog::token::{Claim, JoinToken, TokenRecord, redeem};

/// Commits between forced snapshot writes, at the most.
pub const RESERVATION: u64 = 100_000;
/// Deltas kept for resuming watches.
pub const DEFAULT_HISTORY: usize = 100_000;
/// Debounce for background snapshot writes (at least; see [`flush_delay`]).
const FLUSH_DELAY: Duration = Duration::from_millis(50);
/// How often a failed snapshot write is retried with no new commit.
const FLUSH_RETRY: Duration = Duration::from_secs(1);
const SNAPSHOT_VERSION: u32 = 1;

/// Everything the federation persists.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct State {
    pub catalog: Catalog,
    /// Issued join tokens by secret hash.
    pub tokens: BTreeMap<String, TokenRecord>,
    /// SPIFFE JWKS bundle per trust domain.
    pub bundles: BTreeMap<String, String>,
}

#[derive(Deserialize)]
struct Snapshot {
    version: u32,
    reserved: u64,
    state: State,
}

/// What [`write_snapshot`] writes: a [`Snapshot`] by reference, so that writing one
/// copies nothing.
#[derive(Serialize)]
struct SnapshotRef<'a> {
    version: u32,
    reserved: u64,
    state: StateRef<'a>,
}

/// [`State`] by reference; serializes as `State` does.
#[derive(Serialize)]
struct StateRef<'a> {
    catalog: &'a Catalog,
    tokens: &'a BTreeMap<String, TokenRecord>,
    bundles: &'a BTreeMap<String, String>,
}

pub struct EmbeddedStore {
    /// Serializes snapshot writes (they share one temp file, and a later write must not
    /// be overtaken by an older one), and holds the catalog as the last snapshot wrote
    /// it: the next write brings it up to date from the history, under `inner` only for
    /// as long as copying the new deltas takes, instead of copying the whole catalog
    /// there. Commits do not take it unless they reach the reservation. Lock order:
    /// `writer`, then `inner`.
    writer: Mutex<Option<Catalog>>,
    inner: Mutex<Inner>,
    path: Option<PathBuf>,
    events: broadcast::Sender<StoreEvent>,
    /// Bumped whenever a trust bundle changes.
    bundles_changed: watch::Sender<u64>,
    dirty: Notify,
    /// The last background snapshot write's error, until one succeeds.
    snapshot_error: Mutex<Option<String>>,
    pub(crate) commit_seconds: prometheus_client::metrics::histogram::Histogram,
}

struct Inner {
    state: State,
    history: History,
    reserved: u64,
    /// Closed by a clean shutdown: commits are refused and nothing more is written.
    closed: bool,
}

impl EmbeddedStore {
    /// Opens (or creates) the store; `path: None` keeps it in memory only.
    pub fn open(path: Option<&Path>, history: usize) -> Result<Arc<Self>, StoreError> {
        let (state, start) = match path {
            Some(p) if p.exists() => {
                let io = |source| StoreError::Io {
                    path: p.to_owned(),
                    source,
                };
                let bytes = std::fs::read(p).map_err(io)?;
                let snap: Snapshot =
                    serde_json::from_slice(&bytes).map_err(|e| StoreError::Corrupt {
                        path: p.to_owned(),
                        detail: e.to_string(),
                    })?;
                if snap.version != SNAPSHOT_VERSION {
                    return Err(StoreError::Corrupt {
                        path: p.to_owned(),
                        detail: format!(
                            "version {} (this build reads {SNAPSHOT_VERSION})",
                            snap.version
                        ),
                    });
                }
                let start = snap.reserved.max(snap.state.catalog.revision.0);
                (snap.state, start)
            }
            _ => (State::default(), 0),
        };
        let mut state = state;
        state.catalog.revision = Revision(start);
        let store = Arc::new(Self {
            writer: Mutex::new(None),
            inner: Mutex::new(Inner {
                state,
                history: History::starting_at(history, Revision(start)),
                reserved: start,
                closed: false,
            }),
            path: path.map(Path::to_owned),
            events: broadcast::channel(4096).0,
            bundles_changed: watch::channel(0).0,
            dirty: Notify::new(),
            snapshot_error: Mutex::new(None),
            commit_seconds: super::commit_histogram(),
        });
        // Reserve before serving anything.
        store.flush()?;
        Ok(store)
    }

    /// Writes an empty store at `path` (revision 0, nothing reserved): what `federation
    /// init` leaves, so that `serve` can tell a new federation from a lost snapshot.
    pub fn create_empty(path: &Path) -> Result<(), StoreError> {
        let empty = State::default();
        write_snapshot(
            path,
            &SnapshotRef::new(0, &empty.catalog, &empty.tokens, &empty.bundles),
        )
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // Every mutation below leaves Inner consistent before it can panic.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn revision(&self) -> Revision {
        self.lock().state.catalog.revision
    }

    /// A copy of everything (snapshots, tests). Request paths use the narrower accessors
    /// below, which do not copy the catalog.
    pub fn state(&self) -> State {
        self.lock().state.clone()
    }

    /// Runs `f` on the current catalog under the store's lock (keep `f` short).
    pub fn with_catalog<R>(&self, f: impl FnOnce(&Catalog) -> R) -> R {
        f(&self.lock().state.catalog)
    }

    pub fn bundles(&self) -> BTreeMap<String, String> {
        self.lock().state.bundles.clone()
    }

    /// Commits changes in order, each at the next revision. All or nothing.
    pub fn commit(&self, changes: Vec<Change>) -> Result<Revision, StoreError> {
        if changes.is_empty() {
            return Ok(self.revision());
        }
        let mut inner = self.open_lock()?;
        inner.state.catalog.check(&changes)?;
        let first = inner.state.catalog.revision.0 + 1;
        if first + changes.len() as u64 - 1 < inner.reserved {
            // The common case: checked, so it applies in place, with no catalog copy.
            let mut deltas = Vec::with_capacity(changes.len());
            for (i, change) in changes.into_iter().enumerate() {
                let d = Delta {
                    revision: Revision(first + i as u64),
                    change,
                };
                inner.state.catalog.apply(&d)?;
                inner.history.push(d.clone());
                deltas.push(d);
            }
            let rev = inner.state.catalog.revision;
            // Sent under the lock: `watch` reads history and subscribes under it too, so a
            // new watcher gets these deltas exactly once.
            let _ = self.events.send(StoreEvent::Deltas(Committed::new(deltas)));
            drop(inner);
            self.dirty.notify_one();
            return Ok(rev);
        }
        // Reaching the reservation (the background writes extend it, so only when they
        // fall behind or fail): the new state goes to disk before anyone sees it, under
        // the writer lock, which comes first.
        drop(inner);
        let _writer = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        let mut inner = self.open_lock()?;
        inner.state.catalog.check(&changes)?;
        let mut next = inner.state.catalog.clone();
        let mut deltas = Vec::with_capacity(changes.len());
        for change in changes {
            let d = Delta {
                revision: Revision(next.revision.0 + 1),
                change,
            };
            next.apply(&d)?;
            deltas.push(d);
        }
        let rev = next.revision;
        if rev.0 >= inner.reserved {
            let reserved = rev.0 + RESERVATION;
            self.write_snapshot(&SnapshotRef::new(
                reserved,
                &next,
                &inner.state.tokens,
                &inner.state.bundles,
            ))?;
            inner.reserved = reserved;
        }
        inner.state.catalog = next;
        for d in &deltas {
            inner.history.push(d.clone());
        }
        let _ = self.events.send(StoreEvent::Deltas(Committed::new(deltas)));
        drop(inner);
        self.dirty.notify_one();
        Ok(rev)
    }

    /// Atomically: what a watcher at `from` is missing, and a subscription to what follows.
    pub fn watch(&self, from: Option<Revision>) -> (WatchStart, broadcast::Receiver<StoreEvent>) {
        let inner = self.lock();
        let rx = self.events.subscribe();
        let start = match from.map(|f| inner.history.since(f)) {
            Some(Resume::Deltas(d)) if from.is_some_and(|f| f <= inner.state.catalog.revision) => {
                WatchStart::Deltas(d)
            }
            _ => WatchStart::Snapshot(inner.state.catalog.clone()),
        };
        (start, rx)
    }

    /// Records a newly issued token; flushed before returning so a printed token works
    /// even after a crash.
    pub fn add_token(&self, token: &JoinToken, rec: TokenRecord) -> Result<(), StoreError> {
        self.open_lock()?
            .state
            .tokens
            .insert(token.secret_hash(), rec);
        self.flush()
    }

    /// Redeems a token (one use), flushed before returning.
    pub fn redeem_token(
        &self,
        token: &JoinToken,
        claim: &Claim,
        now: i64,
    ) -> Result<(), StoreError> {
        redeem(&mut self.open_lock()?.state.tokens, token, claim, now)?;
        self.flush()?;
        Ok(())
    }

    pub fn set_bundle(&self, trust_domain: &str, jwks: String) {
        let changed = self
            .lock()
            .state
            .bundles
            .insert(trust_domain.to_owned(), jwks.clone())
            .as_ref()
            != Some(&jwks);
        if changed {
            self.bundles_changed.send_modify(|v| *v += 1);
        }
        self.dirty.notify_one();
    }

    pub fn remove_bundle(&self, trust_domain: &str) {
        if self.lock().state.bundles.remove(trust_domain).is_some() {
            self.bundles_changed.send_modify(|v| *v += 1);
        }
        self.dirty.notify_one();
    }

    pub fn subscribe_bundles(&self) -> watch::Receiver<u64> {
        self.bundles_changed.subscribe()
    }

    /// The state's lock, for a change that must reach disk: refused once closed. A
    /// change made under it before the close is in the closing snapshot; after it, a
    /// flush writes nothing, so the change would be acknowledged and lost.
    fn open_lock(&self) -> Result<MutexGuard<'_, Inner>, StoreError> {
        let inner = self.lock();
        if inner.closed {
            return Err(StoreError::Closed);
        }
        Ok(inner)
    }

    /// Writes the snapshot now.
    pub fn flush(&self) -> Result<(), StoreError> {
        let mut flushed = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        let inner = self.lock();
        if inner.closed {
            return Ok(()); // the closing snapshot is the last
        }
        let reserved = inner
            .reserved
            .max(inner.state.catalog.revision.0 + RESERVATION);
        self.write_locked(&mut flushed, inner, reserved)?;
        let mut inner = self.lock();
        inner.reserved = inner.reserved.max(reserved);
        Ok(())
    }

    /// A clean shutdown's last snapshot, once nothing can commit any more (the server
    /// has stopped): everything committed, with the revision itself as the reservation,
    /// so the reopened store continues at it and watchers resume instead of taking
    /// snapshots. Commits are refused from now on (`Closed`), and later flushes write
    /// nothing. A crash never gets here, and the reservation then guards the revisions.
    pub fn close(&self) -> Result<(), StoreError> {
        let mut flushed = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        let mut inner = self.lock();
        inner.closed = true;
        let reserved = inner.state.catalog.revision.0;
        self.write_locked(&mut flushed, inner, reserved)
    }

    /// Writes the state `inner` holds, with `reserved`, releasing `inner` before the
    /// write. `flushed` (the writer lock's catalog) catches up by the deltas since the
    /// last write, or is copied whole when the history no longer has them.
    fn write_locked(
        &self,
        flushed: &mut Option<Catalog>,
        inner: MutexGuard<'_, Inner>,
        reserved: u64,
    ) -> Result<(), StoreError> {
        let Some(path) = &self.path else {
            return Ok(());
        };
        let now = inner.state.catalog.revision;
        // Taken out, and put back only once caught up: a failure leaves it empty, and
        // the next write copies afresh.
        let (mut catalog, deltas) = match flushed.take() {
            Some(c) if c.revision <= now => match inner.history.since(c.revision) {
                Resume::Deltas(ds) => (c, ds),
                Resume::Snapshot => (inner.state.catalog.clone(), Vec::new()),
            },
            _ => (inner.state.catalog.clone(), Vec::new()),
        };
        let tokens = inner.state.tokens.clone();
        let bundles = inner.state.bundles.clone();
        drop(inner);
        for d in &deltas {
            // Not expected: the deltas were checked before they were committed.
            catalog.apply(d).map_err(|e| StoreError::Corrupt {
                path: path.clone(),
                detail: format!("the snapshot's catalog could not catch up: {e}"),
            })?;
        }
        debug_assert_eq!(catalog.revision, now);
        let written = write_snapshot(
            path,
            &SnapshotRef::new(reserved, &catalog, &tokens, &bundles),
        );
        *flushed = Some(catalog);
        written
    }

    fn write_snapshot(&self, snap: &SnapshotRef<'_>) -> Result<(), StoreError> {
        match &self.path {
            Some(path) => write_snapshot(path, snap),
            None => Ok(()),
        }
    }

    /// Why the store cannot keep what it is given, if it cannot: the last background
    /// snapshot write failed (a full disk, say) and none has succeeded since.
    pub fn unhealthy(&self) -> Option<String> {
        self.snapshot_error
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .map(|e| format!("snapshot writes failing: {e}"))
    }

    /// Writes snapshots in the background, debounced, until `stop`; then a last one.
    /// A failed write is retried every [`FLUSH_RETRY`] without waiting for the next
    /// commit, so a freed disk is noticed on its own.
    pub async fn run_flusher(self: Arc<Self>, stop: tokio_util::sync::CancellationToken) {
        // The wait before a write grows with what the last one cost: a snapshot is as
        // large as the catalog (100,000 services: tens of MB), and written every 50 ms
        // under a steady stream of publishes it took a core away from the watchers.
        let mut delay = FLUSH_DELAY;
        loop {
            let failing = self
                .snapshot_error
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .is_some();
            tokio::select! {
                _ = self.dirty.notified() => {}
                _ = tokio::time::sleep(FLUSH_RETRY), if failing => {}
                _ = stop.cancelled() => break,
            }
            tokio::time::sleep(delay).await;
            // Serializing a large catalog takes milliseconds: not on a runtime worker,
            // where it would stall every stream scheduled there.
            let this = self.clone();
            let began = std::time::Instant::now();
            let r = tokio::task::spawn_blocking(move || this.flush()).await;
            delay = flush_delay(began.elapsed());
            let failed = match r {
                Ok(Ok(())) => None,
                Ok(Err(e)) => {
                    warn!(error = %e, "snapshot write failed; will retry");
                    Some(e.to_string())
                }
                Err(e) => {
                    warn!(error = %e, "snapshot task failed; will retry");
                    Some(e.to_string())
                }
            };
            *self
                .snapshot_error
                .lock()
                .unwrap_or_else(|e| e.into_inner()) = failed;
        }
        if let Err(e) = self.flush() {
            warn!(error = %e, "final snapshot write failed");
        }
    }
}

/// The wait before the next background snapshot write after one that took `took`:
/// [`FLUSH_DELAY`], or 4× the write's cost when that is more (so snapshots take at most
/// a fifth of a core), at most [`FLUSH_DELAY_MAX`]. Pure.
pub fn flush_delay(took: Duration) -> Duration {
    (took * 4).clamp(FLUSH_DELAY, FLUSH_DELAY_MAX)
}

/// The longest wait before a background snapshot write.
const FLUSH_DELAY_MAX: Duration = Duration::from_secs(2);

impl<'a> SnapshotRef<'a> {
    fn new(
        reserved: u64,
        catalog: &'a Catalog,
        tokens: &'a BTreeMap<String, TokenRecord>,
        bundles: &'a BTreeMap<String, String>,
    ) -> Self {
        Self {
            version: SNAPSHOT_VERSION,
            reserved,
            state: StateRef {
                catalog,
                tokens,
                bundles,
            },
        }
    }
}

/// Writes a snapshot atomically and durably (0600).
fn write_snapshot(path: &Path, snap: &SnapshotRef<'_>) -> Result<(), StoreError> {
    let bytes = serde_json::to_vec(snap).map_err(|e| StoreError::Corrupt {
        path: path.to_owned(),
        detail: e.to_string(),
    })?;
    meshfed_identity::fs::write_file(path, &bytes, 0o600).map_err(|e| match e {
        meshfed_identity::fs::FsError::Io { path, source } => StoreError::Io { path, source },
        other => StoreError::Io {
            path: path.to_owned(),
            source: std::io::Error::other(other.to_string()),
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use meshfed_catalog::catalog::{Export, ExportedPort, Protocol, SiteRecord};
    use meshfed_catalog::token::{JoinToken, TokenError};
    use meshfed_catalog::{ServiceName, SiteName};
    use meshfed_identity::TrustDomain;

    fn tmp(name: &str) -> PathBuf {
        let p = std::env::temp_dir().join(format!("meshfed-store-{name}-{}", std::process::id()));
        let _ = std::fs::remove_file(&p);
        p
    }

    fn put_site(name: &str) -> Change {
        Change::PutSite(SiteRecord {
            site: SiteName::new(name).unwrap(),
            trust_domain: TrustDomain::new(&format!("{name}.example.org")).unwrap(),
            gateway_addresses: vec![],
            up: true,
        })
    }

    fn west_token(west: &SiteName) -> JoinToken {
        JoinToken::generate(
            west.clone(),
            vec!["127.0.0.1:1".into()],
            TrustDomain::new("fed.example.org").unwrap(),
            "00".repeat(32),
        )
    }

    fn put_export(site: &str, svc: &str) -> Change {
        Change::PutExport {
            site: SiteName::new(site).unwrap(),
            export: Export {
                endpoint_labels: Vec::new(),
                http_policy: None,
                service: ServiceName::parse(svc).unwrap(),
                ports: vec![ExportedPort {
                    app_protocol: Default::default(),
                    port: 80,
                    protocol: Protocol::Tcp,
                    name: None,
                }],
                ready_endpoints: 1,
                identities: vec![],
                locality: None,
                labels: Default::default(),
                hosts: vec![],
            },
        }
    }

    #[test]
    fn revisions_stay_monotonic_across_restarts_even_when_commits_are_lost() {
        let p = tmp("mono");
        let s = EmbeddedStore::open(Some(&p), 100).unwrap();
        let r1 = s
            .commit(vec![put_site("west"), put_export("west", "a.b")])
            .unwrap();
        s.flush().unwrap();
        // Committed but never flushed: lost in the "crash" below.
        let lost = s.commit(vec![put_export("west", "c.d")]).unwrap();
        assert!(lost > r1);
        drop(s);
        let s = EmbeddedStore::open(Some(&p), 100).unwrap();
        assert!(
            s.revision() > lost,
            "reopened at {} after handing out {lost}",
            s.revision()
        );
        assert_eq!(
            s.state().catalog.exports.len(),
            1,
            "only flushed state survives"
        );
        let r2 = s.commit(vec![put_export("west", "e.f")]).unwrap();
        assert!(r2 > lost);
        // A watcher that saw the lost commit must resync from a snapshot.
        assert!(matches!(s.watch(Some(lost)).0, WatchStart::Snapshot(_)));
        let _ = std::fs::remove_file(&p);
    }

    #[test]
    fn a_clean_close_continues_at_its_revision_and_watchers_resume() {
        let p = tmp("close");
        let s = EmbeddedStore::open(Some(&p), 100).unwrap();
        let r1 = s
            .commit(vec![put_site("west"), put_export("west", "a.b")])
            .unwrap();
        // Not flushed by the flusher: the close writes it.
        let r2 = s.commit(vec![put_export("west", "c.d")]).unwrap();
        s.close().unwrap();
        assert!(matches!(
            s.commit(vec![put_export("west", "e.f")]),
            Err(StoreError::Closed)
        ));
        s.flush().unwrap(); // writes nothing after the close
        // A token issued after the close would be printed and never stored: refused.
        let west = SiteName::new("west").unwrap();
        let t = west_token(&west);
        let rec = TokenRecord {
            site: west,
            expires_unix: 2000,
            used_unix: None,
            trust_domain: None,
            share_trust_domain: false,
        };
        assert!(matches!(s.add_token(&t, rec), Err(StoreError::Closed)));
        drop(s);
        let s = EmbeddedStore::open(Some(&p), 100).unwrap();
        assert_eq!(s.revision(), r2, "continues where it closed");
        assert_eq!(
            s.state().catalog.exports.len(),
            2,
            "nothing acknowledged lost"
        );
        // A watcher at the closing revision resumes with nothing to catch up on; one
        // from before it needs a snapshot (the history is not kept on disk).
        assert!(matches!(s.watch(Some(r2)).0, WatchStart::Deltas(d) if d.is_empty()));
        assert!(matches!(s.watch(Some(r1)).0, WatchStart::Snapshot(_)));
        let r3 = s.commit(vec![put_export("west", "e.f")]).unwrap();
        assert_eq!(r3.0, r2.0 + 1);
        let _ = std::fs::remove_file(&p);
    }

    #[test]
    fn a_commit_does_not_wait_for_a_snapshot_write() {
        let p = tmp("nowait");
        let s = EmbeddedStore::open(Some(&p), 100).unwrap();
        // A snapshot write in progress holds the writer lock for as long as it takes
        // (tens of MB at 100,000 services). Commits below the reservation go on.
        let writing = s.writer.lock().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let s2 = s.clone();
        std::thread::spawn(move || {
            let _ = tx.send(s2.commit(vec![put_site("west"), put_export("west", "a.b")]));
        });
        let r = rx
            .recv_timeout(Duration::from_secs(10))
            .expect("the commit waited for the snapshot write");
        assert_eq!(r.unwrap(), Revision(2));
        drop(writing);
        let _ = std::fs::remove_file(&p);
    }

    #[test]
    fn each_snapshot_holds_every_commit_whether_it_catches_up_or_copies() {
        // History 3: the second write catches up by 2 deltas, the third must copy (5
        // commits since, more than the history holds).
        let p = tmp("catchup");
        let s = EmbeddedStore::open(Some(&p), 3).unwrap();
        s.commit(vec![put_site("west")]).unwrap();
        s.flush().unwrap();
        s.commit(vec![put_export("west", "a.b")]).unwrap();
        s.commit(vec![put_export("west", "c.d")]).unwrap();
        s.flush().unwrap();
        let on_disk = |p: &Path| {
            let snap: Snapshot = serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap();
            snap.state.catalog
        };
        assert_eq!(on_disk(&p), s.state().catalog);
        for svc in ["e.f", "g.h", "i.j", "k.l"] {
            s.commit(vec![put_export("west", svc)]).unwrap();
        }
        s.commit(vec![Change::DeleteExport {
            site: SiteName::new("west").unwrap(),
            service: ServiceName::parse("a.b").unwrap(),
        }])
        .unwrap();
        s.flush().unwrap();
        assert_eq!(on_disk(&p), s.state().catalog);
        assert_eq!(on_disk(&p).exports.len(), 5);
        s.close().unwrap();
        assert_eq!(on_disk(&p), s.state().catalog);
        let _ = std::fs::remove_file(&p);
    }

    #[test]
    fn snapshot_writes_wait_in_proportion_to_their_cost() {
        let ms = Duration::from_millis;
        for (took, want) in [
            (ms(1), FLUSH_DELAY),
            (ms(12), FLUSH_DELAY),
            (ms(100), ms(400)),
            (ms(2000), FLUSH_DELAY_MAX),
        ] {
            assert_eq!(flush_delay(took), want, "{took:?}");
        }
    }

    #[test]
    fn reaching_the_reservation_flushes_first() {
        let p = tmp("reserve");
        let s = EmbeddedStore::open(Some(&p), 10).unwrap();
        let reserved = s.lock().reserved;
        {
            let mut inner = s.lock();
            inner.state.catalog.revision = Revision(reserved - 1);
            inner.history = History::starting_at(10, Revision(reserved - 1));
        }
        s.commit(vec![put_site("west")]).unwrap();
        let snap: Snapshot = serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap();
        assert!(
            snap.reserved > reserved,
            "the reservation was extended on disk before the commit was visible"
        );
        assert_eq!(snap.state.catalog.revision.0, reserved);
        let _ = std::fs::remove_file(&p);
    }

    #[test]
    fn watch_resumes_with_deltas_then_live() {
        let s = EmbeddedStore::open(None, 100).unwrap();
        let r = s.commit(vec![put_site("west")]).unwrap();
        s.commit(vec![put_export("west", "a.b")]).unwrap();
        let (start, mut rx) = s.watch(Some(r));
        match start {
            WatchStart::Deltas(d) => assert_eq!(d.len(), 1),
            WatchStart::Snapshot(_) => panic!("expected deltas"),
        }
        s.commit(vec![put_export("west", "c.d")]).unwrap();
        match rx.try_recv().unwrap() {
            StoreEvent::Deltas(d) => assert_eq!(d.deltas[0].revision, Revision(r.0 + 2)),
            StoreEvent::Reset => panic!("expected deltas"),
        }
        assert!(matches!(s.watch(None).0, WatchStart::Snapshot(_)));
        // A revision from the future (another store) also gets a snapshot.
        assert!(matches!(
            s.watch(Some(Revision(r.0 + 1000))).0,
            WatchStart::Snapshot(_)
        ));
    }

    #[test]
    fn a_bad_commit_changes_nothing() {
        let s = EmbeddedStore::open(None, 100).unwrap();
        let before = s.revision();
        assert!(
            s.commit(vec![put_site("west"), put_export("ghost", "a.b")])
                .is_err()
        );
        assert_eq!(s.revision(), before);
        assert!(s.state().catalog.sites.is_empty());
    }

    #[test]
    fn tokens_persist_and_are_single_use() {
        let p = tmp("tokens");
        let west = SiteName::new("west").unwrap();
        let t = west_token(&west);
        {
            let s = EmbeddedStore::open(Some(&p), 10).unwrap();
            let rec = TokenRecord {
                site: west.clone(),
                expires_unix: 2000,
                used_unix: None,
                trust_domain: Some(TrustDomain::new("west.example.org").unwrap()),
                share_trust_domain: false,
            };
            s.add_token(&t, rec).unwrap();
        }
        let claim = Claim {
            site: west.clone(),
            trust_domain: TrustDomain::new("west.example.org").unwrap(),
            owners: vec![],
        };
        let s = EmbeddedStore::open(Some(&p), 10).unwrap();
        // The binding persisted with the token.
        let wrong = Claim {
            trust_domain: TrustDomain::new("east.example.org").unwrap(),
            ..claim.clone()
        };
        assert!(matches!(
            s.redeem_token(&t, &wrong, 1000),
            Err(StoreError::Token(TokenError::TrustDomainMismatch { .. }))
        ));
        s.redeem_token(&t, &claim, 1000).unwrap();
        drop(s);
        let s = EmbeddedStore::open(Some(&p), 10).unwrap();
        let e = s.redeem_token(&t, &claim, 1001).unwrap_err();
        assert!(
            matches!(
                e,
                StoreError::Token(TokenError::AlreadyUsed { used_at: 1000 })
            ),
            "{e}"
        );
        let _ = std::fs::remove_file(&p);
    }

    #[test]
    fn corrupt_snapshot_is_named() {
        let p = tmp("corrupt");
        std::fs::write(&p, b"{nope").unwrap();
        let e = EmbeddedStore::open(Some(&p), 10).err().unwrap();
        assert!(
            e.to_string().contains(p.to_str().unwrap())
                && e.to_string().contains("not a meshfed snapshot"),
            "{e}"
        );
        let _ = std::fs::remove_file(&p);
    }
}
