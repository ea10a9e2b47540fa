//! An in-process Kubernetes API server for the controller tests: no kube-apiserver can be
//! installed here (not in Debian, not on PyPI; envtest downloads from hosts this machine
//! cannot reach). It speaks the real wire format for what the controllers use, so they
//! run through the real kube client, unchanged:
//! - JSON objects with `apiVersion`, `kind` and `metadata.resourceVersion`, one
//!   resourceVersion counter for everything, as etcd's revision;
//! - list (`{kind}List` with `metadata.resourceVersion`), cluster-wide and namespaced;
//! - watch (`?watch=true&resourceVersion=N`): newline-delimited `ADDED`/`MODIFIED`/
//!   `DELETED` events after N, then live ones; `BOOKMARK`s every 500 ms when
//!   `allowWatchBookmarks=true`; the stream ends at `timeoutSeconds`;
//! - `410 Gone` (an `ERROR` event with a `Status`, as the real server sends) when N is
//!   older than the compacted history, after which clients relist;
//! - merge-patch of `/status` (`application/merge-patch+json`);
//! - create (POST; 409 AlreadyExists), get, replace (PUT; 409 Conflict on a stale
//!   resourceVersion) and delete, with the status subresource's rule that create and
//!   replace leave `status` alone, a cluster IP allocated to every new Service, and
//!   `labelSelector` (`k=v`, `k!=v`, `k`, `!k`) on list and watch;
//! - the garbage collector: deleting an object deletes, in the background, every object
//!   whose `ownerReferences` name its uid.
//!
//! Tests change objects directly (`put`, `delete`) and can `compact` the history and
//! `break_watches` to force the relist path.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use serde_json::{Value, json};
use tokio::sync::broadcast;

/// A resource type the server knows: its URL path segment and its object kind.
#[derive(Clone, Copy, Debug)]
struct Kind {
    /// `api/v1` or `apis/<group>/<version>`.
    prefix: &'static str,
    plural: &'static str,
    api_version: &'static str,
    kind: &'static str,
}

const KINDS: &[Kind] = &[
    Kind {
        prefix: "api/v1",
        plural: "services",
        api_version: "v1",
        kind: "Service",
    },
    Kind {
        prefix: "api/v1",
        plural: "pods",
        api_version: "v1",
        kind: "Pod",
    },
    Kind {
        prefix: "apis/discovery.k8s.io/v1",
        plural: "endpointslices",
        api_version: "discovery.k8s.io/v1",
        kind: "EndpointSlice",
    },
    Kind {
        prefix: "apis/coordination.k8s.io/v1",
        plural: "leases",
        api_version: "coordination.k8s.io/v1",
        kind: "Lease",
    },
    Kind {
        prefix: "apis/multicluster.x-k8s.io/v1alpha1",
        plural: "serviceexports",
        api_version: "multicluster.x-k8s.io/v1alpha1",
        kind: "ServiceExport",
    },
    Kind {
        prefix: "apis/multicluster.x-k8s.io/v1alpha1",
        plural: "serviceimports",
        api_version: "multicluster.x-k8s.io/v1alpha1",
        kind: "ServiceImport",
    },
];

/// Kinds whose `status` is a subresource: create and replace ignore it.
const STATUS_SUBRESOURCE: &[&str] = &["services", "pods", "serviceexports", "serviceimports"];

#[derive(Clone, Debug)]
struct Event {
    rv: u64,
    plural: &'static str,
    type_: &'static str,
    object: Value,
}

#[derive(Default)]
struct State {
    rv: u64,
    /// (plural, namespace, name) → object
    objects: BTreeMap<(&'static str, String, String), Value>,
    history: Vec<Event>,
    /// Watches from before this resourceVersion get 410 Gone.
    compacted: u64,
    /// Requests by (method, path without query), for tests that count writes.
    requests: Vec<(String, String)>,
    /// Cluster IPs handed out (10.96.0.0/16).
    next_ip: u32,
}

#[derive(Clone)]
pub struct KubeApi {
    state: Arc<Mutex<State>>,
    events: broadcast::Sender<Event>,
    /// Bumped to end every open watch stream.
    breaks: Arc<tokio::sync::watch::Sender<u64>>,
    pub addr: SocketAddr,
}

fn kind_of(plural: &str) -> Option<Kind> {
    KINDS.iter().copied().find(|k| k.plural == plural)
}

impl KubeApi {
    pub async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (events, _) = broadcast::channel(4096);
        let api = Self {
            state: Arc::default(),
            events,
            breaks: Arc::new(tokio::sync::watch::channel(0).0),
            addr,
        };
        let server = api.clone();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let server = server.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req| {
                        let server = server.clone();
                        async move { Ok::<_, Infallible>(server.handle(req).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(tcp), svc)
                        .await;
                });
            }
        });
        api
    }

    /// A kube client for this server (plain HTTP, no credentials).
    pub fn client(&self) -> kube::Client {
        let cfg = kube::Config::new(format!("http://{}", self.addr).parse().unwrap());
        kube::Client::try_from(cfg).unwrap()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap()
    }

    fn record(&self, st: &mut State, plural: &'static str, type_: &'static str, object: Value) {
        let ev = Event {
            rv: st.rv,
            plural,
            type_,
            object,
        };
        st.history.push(ev.clone());
        let _ = self.events.send(ev);
    }

    /// Creates or replaces an object (given as the typed value); returns its new
    /// resourceVersion.
    pub fn put<K: k8s_openapi::serde::Serialize + kube::Resource<DynamicType = ()>>(
        &self,
        obj: &K,
    ) -> u64 {
        self.store(obj, true)
    }

    /// Changes an object with no watch event, as if the event had been compacted away:
    /// only a relist shows it. Compacts the history up to it.
    pub fn put_unseen<K: k8s_openapi::serde::Serialize + kube::Resource<DynamicType = ()>>(
        &self,
        obj: &K,
    ) {
        self.store(obj, false);
        self.compact();
    }

    fn store<K: k8s_openapi::serde::Serialize + kube::Resource<DynamicType = ()>>(
        &self,
        obj: &K,
        event: bool,
    ) -> u64 {
        let plural: &'static str = kind_of(&K::plural(&()))
            .map(|k| k.plural)
            .expect("a kind this server knows");
        let k = kind_of(plural).unwrap();
        let mut v = serde_json::to_value(obj).unwrap();
        v["apiVersion"] = json!(k.api_version);
        v["kind"] = json!(k.kind);
        let ns = v["metadata"]["namespace"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        let name = v["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        let mut st = self.lock();
        st.rv += 1;
        let rv = st.rv;
        v["metadata"]["resourceVersion"] = json!(rv.to_string());
        if v["metadata"]["uid"].is_null() {
            v["metadata"]["uid"] = json!(format!("uid-{plural}-{ns}-{name}"));
        }
        let existed = st.objects.insert((plural, ns, name), v.clone()).is_some();
        if event {
            self.record(
                &mut st,
                plural,
                if existed { "MODIFIED" } else { "ADDED" },
                v,
            );
        }
        rv
    }

    pub fn delete(&self, plural: &'static str, ns: &str, name: &str) {
        let mut st = self.lock();
        let Some(mut v) = st.objects.remove(&(plural, ns.to_owned(), name.to_owned())) else {
            return;
        };
        st.rv += 1;
        v["metadata"]["resourceVersion"] = json!(st.rv.to_string());
        self.record(&mut st, plural, "DELETED", v);
    }

    /// The stored object, as JSON.
    pub fn get(&self, plural: &'static str, ns: &str, name: &str) -> Option<Value> {
        self.lock()
            .objects
            .get(&(plural, ns.to_owned(), name.to_owned()))
            .cloned()
    }

    /// Forgets the history: watches that resume from before now get 410 Gone.
    pub fn compact(&self) {
        let mut st = self.lock();
        st.compacted = st.rv + 1;
        st.history.clear();
    }

    /// Ends every open watch stream (clients re-watch from their last resourceVersion).
    pub fn break_watches(&self) {
        self.breaks.send_modify(|n| *n += 1);
    }

    /// How many requests had this method and a path starting with `prefix`.
    pub fn count(&self, method: &str, prefix: &str) -> usize {
        self.lock()
            .requests
            .iter()
            .filter(|(m, p)| m == method && p.starts_with(prefix))
            .count()
    }

    async fn handle(&self, req: Request<Incoming>) -> Response<BoxBody> {
        let path = req.uri().path().trim_start_matches('/').to_owned();
        let query: BTreeMap<String, String> = req
            .uri()
            .query()
            .unwrap_or_default()
            .split('&')
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect();
        self.lock()
            .requests
            .push((req.method().to_string(), format!("/{path}")));
        // <prefix>/[namespaces/<ns>/]<plural>[/<name>[/status]]
        let route = KINDS.iter().find_map(|k| {
            let rest = path.strip_prefix(k.prefix)?.strip_prefix('/')?;
            let parts: Vec<&str> = rest.split('/').collect();
            let (ns, parts) = match parts.as_slice() {
                ["namespaces", ns, tail @ ..] => (Some(ns.to_string()), tail.to_vec()),
                tail => (None, tail.to_vec()),
            };
            (parts.first() == Some(&k.plural)).then_some((*k, ns, parts))
        });
        let Some((k, ns, parts)) = route else {
            return status(
                StatusCode::NOT_FOUND,
                "NotFound",
                &format!("no route for /{path}"),
            );
        };
        let selector = match query
            .get("labelSelector")
            .map(|s| Selector::parse(&decode(s)))
        {
            None => Selector::default(),
            Some(Ok(s)) => s,
            Some(Err(e)) => return status(StatusCode::BAD_REQUEST, "BadRequest", &e),
        };
        let method = req.method().clone();
        match (&method, parts.as_slice()) {
            (&Method::GET, [plural]) if *plural == k.plural => {
                if matches!(query.get("watch").map(String::as_str), Some("true" | "1")) {
                    self.watch(k, ns, &query, selector)
                } else {
                    self.list(k, ns.as_deref(), &selector)
                }
            }
            (&Method::GET, [plural, name]) if *plural == k.plural => {
                match self.get(k.plural, ns.as_deref().unwrap_or_default(), name) {
                    Some(v) => json_response(StatusCode::OK, &v),
                    None => not_found(k, ns.as_deref().unwrap_or_default(), name),
                }
            }
            (&Method::POST, [plural]) | (&Method::PUT, [plural, _]) if *plural == k.plural => {
                let Some(ns) = ns else {
                    return status(StatusCode::NOT_FOUND, "NotFound", "namespace required");
                };
                let body = req.into_body().collect().await.map(|b| b.to_bytes());
                let Ok(Ok(obj)) = body.map(|b| serde_json::from_slice::<Value>(&b)) else {
                    return status(StatusCode::BAD_REQUEST, "BadRequest", "body is not JSON");
                };
                match parts.get(1) {
                    None => self.create(k, &ns, obj),
                    Some(name) => self.replace(k, &ns, name, obj),
                }
            }
            (&Method::DELETE, [plural, name]) if *plural == k.plural => {
                let ns = ns.unwrap_or_default();
                if self.delete_cascading(k.plural, &ns, name) {
                    json_response(
                        StatusCode::OK,
                        &json!({"kind": "Status", "apiVersion": "v1", "metadata": {},
                                "status": "Success", "details": {"name": name, "kind": k.plural}}),
                    )
                } else {
                    not_found(k, &ns, name)
                }
            }
            (&Method::PATCH, [plural, name, "status"]) if *plural == k.plural => {
                let Some(ns) = ns else {
                    return status(StatusCode::NOT_FOUND, "NotFound", "namespace required");
                };
                let body = req.into_body().collect().await.map(|b| b.to_bytes());
                let Ok(Ok(patch)) = body.map(|b| serde_json::from_slice::<Value>(&b)) else {
                    return status(StatusCode::BAD_REQUEST, "BadRequest", "patch is not JSON");
                };
                self.patch_status(k, &ns, name, &patch)
            }
            _ => status(
                StatusCode::METHOD_NOT_ALLOWED,
                "MethodNotAllowed",
                &format!("{} /{path}", req.method()),
            ),
        }
    }

    fn list(&self, k: Kind, ns: Option<&str>, sel: &Selector) -> Response<BoxBody> {
        let st = self.lock();
        let items: Vec<Value> = st
            .objects
            .iter()
            .filter(|((p, n, _), v)| {
                *p == k.plural && ns.is_none_or(|ns| ns == n) && sel.matches(v)
            })
            .map(|(_, v)| v.clone())
            .collect();
        json_response(
            StatusCode::OK,
            &json!({
                "apiVersion": k.api_version,
                "kind": format!("{}List", k.kind),
                "metadata": {"resourceVersion": st.rv.to_string()},
                "items": items,
            }),
        )
    }

    fn watch(
        &self,
        k: Kind,
        ns: Option<String>,
        q: &BTreeMap<String, String>,
        sel: Selector,
    ) -> Response<BoxBody> {
        let from: u64 = q
            .get("resourceVersion")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let bookmarks = q.get("allowWatchBookmarks").map(String::as_str) == Some("true");
        let timeout = Duration::from_secs(
            q.get("timeoutSeconds")
                .and_then(|v| v.parse().ok())
                .unwrap_or(290),
        );
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, Infallible>>(1024);
        let line = |v: Value| Ok(Frame::data(Bytes::from(format!("{v}\n"))));
        let mine = {
            let ns = ns.clone();
            move |e: &Event| {
                e.plural == k.plural
                    && ns
                        .as_deref()
                        .is_none_or(|ns| e.object["metadata"]["namespace"] == ns)
                    && sel.matches(&e.object)
            }
        };
        let (backlog, mut live, gone, mut rv) = {
            let st = self.lock();
            let gone = from != 0 && from < st.compacted;
            let backlog: Vec<Event> = st
                .history
                .iter()
                .filter(|e| e.rv > from && mine(e))
                .cloned()
                .collect();
            (backlog, self.events.subscribe(), gone, st.rv.max(from))
        };
        let mut breaks = self.breaks.subscribe();
        tokio::spawn(async move {
            if gone {
                let _ = tx
                    .send(line(json!({
                        "type": "ERROR",
                        "object": {
                            "kind": "Status", "apiVersion": "v1", "metadata": {},
                            "status": "Failure",
                            "message": format!("too old resource version: {from}"),
                            "reason": "Expired", "code": 410,
                        }
                    })))
                    .await;
                return;
            }
            for e in backlog {
                if tx
                    .send(line(json!({"type": e.type_, "object": e.object})))
                    .await
                    .is_err()
                {
                    return;
                }
            }
            let deadline = tokio::time::sleep(timeout);
            tokio::pin!(deadline);
            let mut tick = tokio::time::interval(Duration::from_millis(500));
            loop {
                tokio::select! {
                    e = live.recv() => match e {
                        Ok(e) if e.rv > rv => {
                            rv = e.rv;
                            if mine(&e) && tx.send(line(json!({"type": e.type_, "object": e.object}))).await.is_err() {
                                return;
                            }
                        }
                        Ok(_) => {}
                        Err(_) => return,
                    },
                    _ = tick.tick(), if bookmarks => {
                        let b = json!({"type": "BOOKMARK", "object": {
                            "kind": k.kind, "apiVersion": k.api_version,
                            "metadata": {"resourceVersion": rv.to_string()},
                        }});
                        if tx.send(line(b)).await.is_err() {
                            return;
                        }
                    }
                    _ = breaks.changed() => return,
                    _ = &mut deadline => return,
                }
            }
        });
        let body = StreamBody::new(tokio_stream::wrappers::ReceiverStream::new(rx));
        Response::builder()
            .status(StatusCode::OK)
            .header("content-type", "application/json")
            .body(BodyExt::boxed(body))
            .unwrap()
    }

    fn create(&self, k: Kind, ns: &str, mut v: Value) -> Response<BoxBody> {
        let Some(name) = v["metadata"]["name"].as_str().map(str::to_owned) else {
            return status(
                StatusCode::UNPROCESSABLE_ENTITY,
                "Invalid",
                "metadata.name: Required value",
            );
        };
        let mut st = self.lock();
        let key = (k.plural, ns.to_owned(), name.clone());
        if st.objects.contains_key(&key) {
            return status(
                StatusCode::CONFLICT,
                "AlreadyExists",
                &format!("{} {name:?} already exists", k.plural),
            );
        }
        if STATUS_SUBRESOURCE.contains(&k.plural) {
            v.as_object_mut().unwrap().remove("status");
        }
        if k.plural == "services" && v["spec"]["clusterIP"].as_str().is_none_or(str::is_empty) {
            st.next_ip += 1;
            let ip = std::net::Ipv4Addr::from(u32::from_be_bytes([10, 96, 0, 0]) + st.next_ip);
            v["spec"]["clusterIP"] = json!(ip.to_string());
            v["spec"]["clusterIPs"] = json!([ip.to_string()]);
        }
        st.rv += 1;
        v["apiVersion"] = json!(k.api_version);
        v["kind"] = json!(k.kind);
        v["metadata"]["namespace"] = json!(ns);
        v["metadata"]["uid"] = json!(format!("uid-{}-{}", k.plural, st.rv));
        v["metadata"]["generation"] = json!(1);
        v["metadata"]["resourceVersion"] = json!(st.rv.to_string());
        st.objects.insert(key, v.clone());
        self.record(&mut st, k.plural, "ADDED", v.clone());
        json_response(StatusCode::CREATED, &v)
    }

    fn replace(&self, k: Kind, ns: &str, name: &str, mut v: Value) -> Response<BoxBody> {
        let mut st = self.lock();
        let key = (k.plural, ns.to_owned(), name.to_owned());
        let Some(old) = st.objects.get(&key).cloned() else {
            return not_found(k, ns, name);
        };
        let sent = v["metadata"]["resourceVersion"]
            .as_str()
            .unwrap_or_default();
        if !sent.is_empty() && sent != old["metadata"]["resourceVersion"] {
            return status(
                StatusCode::CONFLICT,
                "Conflict",
                &format!(
                    "Operation cannot be fulfilled on {} {name:?}: the object has been modified",
                    k.plural
                ),
            );
        }
        if STATUS_SUBRESOURCE.contains(&k.plural) {
            v["status"] = old["status"].clone();
            if v["status"].is_null() {
                v.as_object_mut().unwrap().remove("status");
            }
        }
        if k.plural == "services" {
            v["spec"]["clusterIP"] = old["spec"]["clusterIP"].clone(); // immutable
            v["spec"]["clusterIPs"] = old["spec"]["clusterIPs"].clone();
        }
        let generation = old["metadata"]["generation"].as_i64().unwrap_or(1);
        let changed = v.get("spec") != old.get("spec");
        v["apiVersion"] = json!(k.api_version);
        v["kind"] = json!(k.kind);
        v["metadata"]["namespace"] = json!(ns);
        v["metadata"]["uid"] = old["metadata"]["uid"].clone();
        v["metadata"]["generation"] = json!(generation + i64::from(changed));
        st.rv += 1;
        v["metadata"]["resourceVersion"] = json!(st.rv.to_string());
        st.objects.insert(key, v.clone());
        self.record(&mut st, k.plural, "MODIFIED", v.clone());
        json_response(StatusCode::OK, &v)
    }

    /// Deletes an object, then (as the garbage collector does, in the background) every
    /// object it owns, recursively. False: no such object.
    fn delete_cascading(&self, plural: &'static str, ns: &str, name: &str) -> bool {
        let Some(uid) = self
            .get(plural, ns, name)
            .and_then(|v| v["metadata"]["uid"].as_str().map(str::to_owned))
        else {
            return false;
        };
        self.delete(plural, ns, name);
        let owned: Vec<(&'static str, String, String)> = self
            .lock()
            .objects
            .iter()
            .filter(|(_, v)| {
                v["metadata"]["ownerReferences"]
                    .as_array()
                    .is_some_and(|refs| refs.iter().any(|r| r["uid"] == uid.as_str()))
            })
            .map(|(k, _)| k.clone())
            .collect();
        for (p, n, o) in owned {
            self.delete_cascading(p, &n, &o);
        }
        true
    }

    /// Stored objects of a kind, as JSON.
    pub fn all(&self, plural: &'static str) -> Vec<Value> {
        self.lock()
            .objects
            .iter()
            .filter(|((p, _, _), _)| *p == plural)
            .map(|(_, v)| v.clone())
            .collect()
    }

    fn patch_status(&self, k: Kind, ns: &str, name: &str, patch: &Value) -> Response<BoxBody> {
        let mut st = self.lock();
        let key = (k.plural, ns.to_owned(), name.to_owned());
        let Some(mut v) = st.objects.get(&key).cloned() else {
            return status(
                StatusCode::NOT_FOUND,
                "NotFound",
                &format!("{} {ns}/{name} not found", k.kind),
            );
        };
        if let Some(s) = patch.get("status") {
            merge(&mut v["status"], s);
        }
        st.rv += 1;
        v["metadata"]["resourceVersion"] = json!(st.rv.to_string());
        st.objects.insert(key, v.clone());
        self.record(&mut st, k.plural, "MODIFIED", v.clone());
        json_response(StatusCode::OK, &v)
    }
}

/// JSON merge patch (RFC 7386).
fn merge(target: &mut Value, patch: &Value) {
    match patch {
        Value::Object(p) => {
            if !target.is_object() {
                *target = json!({});
            }
            let t = target.as_object_mut().unwrap();
            for (k, v) in p {
                if v.is_null() {
                    t.remove(k);
                } else {
                    merge(t.entry(k.clone()).or_insert(Value::Null), v);
                }
            }
        }
        v => *target = v.clone(),
    }
}

/// A label selector of equality and existence terms.
#[derive(Clone, Debug, Default)]
struct Selector(Vec<(String, Option<String>, bool)>);

impl Selector {
    fn parse(s: &str) -> Result<Self, String> {
        let mut terms = Vec::new();
        for t in s.split(',').map(str::trim).filter(|t| !t.is_empty()) {
            let term = if let Some((k, v)) = t.split_once("!=") {
                (k.to_owned(), Some(v.to_owned()), false)
            } else if let Some((k, v)) = t.split_once("==").or_else(|| t.split_once('=')) {
                (k.to_owned(), Some(v.to_owned()), true)
            } else if let Some(k) = t.strip_prefix('!') {
                (k.to_owned(), None, false)
            } else if t.contains([' ', '(']) {
                return Err(format!("unsupported label selector term {t:?}"));
            } else {
                (t.to_owned(), None, true)
            };
            terms.push(term);
        }
        Ok(Self(terms))
    }

    fn matches(&self, v: &Value) -> bool {
        let labels = &v["metadata"]["labels"];
        self.0.iter().all(|(k, want, positive)| {
            let have = labels[k.as_str()].as_str();
            match want {
                Some(w) => (have == Some(w.as_str())) == *positive,
                None => have.is_some() == *positive,
            }
        })
    }
}

/// Percent-decoding of a query value.
fn decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%'
            && i + 2 < b.len()
            && let Ok(x) = u8::from_str_radix(&s[i + 1..i + 3], 16)
        {
            out.push(x);
            i += 3;
        } else {
            out.push(if b[i] == b'+' { b' ' } else { b[i] });
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn not_found(k: Kind, ns: &str, name: &str) -> Response<BoxBody> {
    status(
        StatusCode::NOT_FOUND,
        "NotFound",
        &format!("{} {ns}/{name} not found", k.plural),
    )
}

type BoxBody = http_body_util::combinators::BoxBody<Bytes, Infallible>;

fn json_response(code: StatusCode, v: &Value) -> Response<BoxBody> {
    Response::builder()
        .status(code)
        .header("content-type", "application/json")
        .body(BodyExt::boxed(Full::new(Bytes::from(v.to_string()))))
        .unwrap()
}

fn status(code: StatusCode, reason: &str, message: &str) -> Response<BoxBody> {
    json_response(
        code,
        &json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                "message": message, "reason": reason, "code": code.as_u16()}),
    )
}
