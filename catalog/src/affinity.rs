//! Session affinity: Istio's `loadBalancer.consistentHash`. A request's key (a header, a
//! cookie, the client's address or a query parameter) is hashed; the importing gateway
//! orders the destination's sites and the exporting gateway picks the endpoint by
//! rendezvous (highest random weight) hashing, so requests with one key keep going to
//! one site and one endpoint while those stay, and a site or endpoint that leaves moves
//! only its own keys. Pure; FNV-1a and MurmurHash3's finalizer, whose output every
//! build agrees on.

use std::hash::Hasher;
use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use crate::http_route::RequestView;

/// The header an egress sends with a request whose policy hashes: the key's hash
/// (16 hex digits), by which the exporting gateway picks the endpoint. Only a gateway
/// speaks it: an egress drops a client's, like every `meshfed-` header.
pub const HASH_HEADER: &str = "meshfed-hash";

/// The [`HASH_HEADER`] value of `hash`, and back. Pure.
pub fn hash_header(hash: u64) -> String {
    format!("{hash:016x}")
}

pub fn parse_hash_header(v: &str) -> Option<u64> {
    (v.len() == 16).then(|| u64::from_str_radix(v, 16).ok())?
}

/// The `Set-Cookie` value of a cookie the gateway made up for `key` (`Max-Age` from its
/// ttl; 0: a session cookie), or `None` when the key makes none. Pure.
pub fn made_cookie(key: &HashKey, value: &str) -> Option<String> {
    let HashKey::Cookie {
        name,
        path,
        ttl_ms: Some(ttl),
    } = key
    else {
        return None;
    };
    let mut c = format!("{name}={value}");
    if let Some(p) = path {
        c.push_str("; Path=");
        c.push_str(p);
    }
    if *ttl > 0 {
        c.push_str(&format!("; Max-Age={}", ttl.div_ceil(1000)));
    }
    c.push_str("; HttpOnly");
    Some(c)
}

/// What a request is hashed by.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum HashKey {
    /// A header's value (lower-case name); no header: no affinity for that request.
    Header(String),
    /// A cookie's value. When the request has none and `ttl_ms` is set, the importing
    /// gateway makes one up, hashes by it and sets it on the answer (`Max-Age`; 0: a
    /// session cookie), as Envoy does.
    Cookie {
        name: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        path: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        ttl_ms: Option<u64>,
    },
    /// The client's address at the importing gateway.
    SourceIp,
    /// A query parameter's first value.
    QueryParameter(String),
}

impl HashKey {
    /// Whether the key's names are well-formed: a header or query parameter name, and
    /// a cookie name (RFC 6265 token) with a path of visible characters.
    pub fn check(&self) -> Result<(), String> {
        let token = |s: &str| {
            !s.is_empty()
                && s.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
        };
        match self {
            Self::Header(h) if !token(h) || h.bytes().any(|b| b.is_ascii_uppercase()) => {
                Err(format!("{h:?} is not a lower-case header name"))
            }
            Self::Cookie { name, .. } if !token(name) => {
                Err(format!("{name:?} is not a cookie name"))
            }
            Self::Cookie { path: Some(p), .. }
                if !p.starts_with('/')
                    || p.bytes().any(|b| !(0x21..0x7f).contains(&b) || b == b';') =>
            {
                Err(format!("{p:?} is not a cookie path"))
            }
            Self::QueryParameter(q) if q.is_empty() => Err("empty query parameter name".into()),
            _ => Ok(()),
        }
    }
}

fn fnv(parts: &[&[u8]]) -> u64 {
    let mut h = fnv::FnvHasher::default();
    for p in parts {
        h.write(p);
        // A separator, so ("ab", "c") and ("a", "bc") differ.
        h.write_u8(0xff);
    }
    h.finish()
}

/// The value of cookie `name` in a `Cookie` header's value, if any.
pub fn cookie<'a>(header: &'a str, name: &str) -> Option<&'a str> {
    header.split(';').find_map(|pair| {
        let (k, v) = pair.trim().split_once('=')?;
        (k == name).then(|| v.trim_matches('"'))
    })
}

/// The first value of query parameter `name` in `query` (without `?`), undecoded.
pub fn query_parameter<'a>(query: &'a str, name: &str) -> Option<&'a str> {
    query.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (k == name).then_some(v)
    })
}

/// The hash of `req`'s key, `None` when the request has no such key (it is then
/// balanced as without affinity).
pub fn request_hash(key: &HashKey, req: &dyn RequestView, client: IpAddr) -> Option<u64> {
    match key {
        HashKey::Header(h) => req.header(h).map(|v| fnv(&[v.as_bytes()])),
        HashKey::Cookie { name, .. } => req
            .header("cookie")
            .and_then(|c| cookie(c, name))
            .map(value_hash),
        HashKey::SourceIp => Some(match client.to_canonical() {
            IpAddr::V4(a) => fnv(&[&a.octets()]),
            IpAddr::V6(a) => fnv(&[&a.octets()]),
        }),
        HashKey::QueryParameter(q) => req
            .query()
            .and_then(|s| query_parameter(s, q))
            .map(|v| fnv(&[v.as_bytes()])),
    }
}

/// The hash of a cookie's value (the one a request sends, or the one the gateway made
/// up for it).
pub fn value_hash(v: &str) -> u64 {
    fnv(&[v.as_bytes()])
}

/// MurmurHash3's 64-bit finalizer: every input bit moves every output bit, which FNV
/// alone does not do for inputs that differ in a few bytes.
fn mix(mut x: u64) -> u64 {
    x ^= x >> 33;
    x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
    x ^= x >> 33;
    x = x.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    x ^ (x >> 33)
}

/// The hash of an item's stable name (a site's), for [`order`] and [`pick`].
pub fn name_hash(name: &[u8]) -> u64 {
    fnv(&[name])
}

/// The hash of an endpoint's address, for [`pick`]; nothing allocated (it runs per
/// request and endpoint).
pub fn addr_hash(a: &std::net::SocketAddr) -> u64 {
    let port = a.port().to_be_bytes();
    match a.ip().to_canonical() {
        IpAddr::V4(ip) => fnv(&[&ip.octets(), &port]),
        IpAddr::V6(ip) => fnv(&[&ip.octets(), &port]),
    }
}

/// Rendezvous scores of `items` for `hash`: the item with the highest score is the
/// key's; without it, the next. `name` gives each item's name hash ([`name_hash`]).
fn score<T>(item: &T, hash: u64, name: &impl Fn(&T) -> u64) -> u64 {
    mix(hash ^ mix(name(item)))
}

/// `items` ordered for `hash`, the key's first. Pure.
pub fn order<T>(mut items: Vec<T>, hash: u64, name: impl Fn(&T) -> u64) -> Vec<T> {
    items.sort_by_cached_key(|i| std::cmp::Reverse(score(i, hash, &name)));
    items
}

/// The index of the key's item among those `usable` says may be picked (all of them
/// when none may). Pure.
pub fn pick<T>(
    items: &[T],
    hash: u64,
    name: impl Fn(&T) -> u64,
    usable: impl Fn(&T) -> bool,
) -> usize {
    let best = |only_usable: bool| {
        items
            .iter()
            .enumerate()
            .filter(|(_, i)| !only_usable || usable(i))
            .max_by_key(|(_, i)| score(*i, hash, &name))
            .map(|(n, _)| n)
    };
    best(true).or_else(|| best(false)).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Req(Vec<(&'static str, &'static str)>, Option<&'static str>);

    impl RequestView for Req {
        fn path(&self) -> &str {
            "/"
        }
        fn method(&self) -> &str {
            "GET"
        }
        fn header(&self, name: &str) -> Option<&str> {
            self.0.iter().find(|(k, _)| *k == name).map(|(_, v)| *v)
        }
        fn query(&self) -> Option<&str> {
            self.1
        }
    }

    #[test]
    fn keys_come_from_where_istio_reads_them() {
        let ip: IpAddr = [10, 0, 0, 7].into();
        let r = Req(
            vec![("x-user", "ann"), ("cookie", "a=1; session=\"s-42\"; b=2")],
            Some("u=ann&x=1"),
        );
        let h = |k: HashKey| request_hash(&k, &r, ip);
        assert_eq!(h(HashKey::Header("x-user".into())), Some(fnv(&[b"ann"])));
        assert_eq!(h(HashKey::QueryParameter("u".into())), Some(fnv(&[b"ann"])));
        let session = HashKey::Cookie {
            name: "session".into(),
            path: None,
            ttl_ms: None,
        };
        assert_eq!(h(session), Some(value_hash("s-42")));
        assert_eq!(h(HashKey::Header("x-none".into())), None);
        assert_eq!(h(HashKey::QueryParameter("none".into())), None);
        // An IPv4 client is the same key however the socket spelled it.
        let mapped: IpAddr = "::ffff:10.0.0.7".parse().unwrap();
        assert_eq!(
            request_hash(&HashKey::SourceIp, &r, mapped),
            h(HashKey::SourceIp)
        );
        assert_eq!(cookie("x=1;y=2", "y"), Some("2"));
        assert_eq!(cookie("xy=1", "x"), None);
        assert_eq!(query_parameter("flag&u=1", "flag"), Some(""));
    }

    #[test]
    fn a_key_keeps_its_item_and_a_departure_moves_only_its_own_keys() {
        let sites: Vec<String> = (0..5).map(|i| format!("site-{i}")).collect();
        let name = |s: &String| name_hash(s.as_bytes());
        let first = |items: Vec<String>, k: u64| order(items, k, name)[0].clone();
        let keys: Vec<u64> = (0..2000u64).map(|k| fnv(&[&k.to_be_bytes()])).collect();
        let before: Vec<String> = keys.iter().map(|k| first(sites.clone(), *k)).collect();
        // Stable: the same answer again, and every site gets a share.
        for (k, b) in keys.iter().zip(&before) {
            assert_eq!(&first(sites.clone(), *k), b);
        }
        for s in &sites {
            let n = before.iter().filter(|b| *b == s).count();
            assert!((300..=500).contains(&n), "{s}: {n} of 2000 keys");
        }
        // site-2 leaves: its keys move, no other key does.
        let fewer: Vec<String> = sites.iter().filter(|s| *s != "site-2").cloned().collect();
        for (k, b) in keys.iter().zip(&before) {
            let now = first(fewer.clone(), *k);
            if b != "site-2" {
                assert_eq!(&now, b, "a key of {b} moved");
            }
        }
        // pick skips what may not be used, and falls back to all when nothing may.
        let k = keys[0];
        let top = pick(&sites, k, name, |_| true);
        assert_eq!(sites[top], before[0]);
        let other = pick(&sites, k, name, |s| *s != before[0]);
        assert_ne!(other, top);
        assert_eq!(pick(&sites, k, name, |_| false), top);
    }

    #[test]
    fn made_cookies_and_the_hash_header_read_back() {
        let key = |ttl_ms| HashKey::Cookie {
            name: "s".into(),
            path: Some("/app".into()),
            ttl_ms,
        };
        assert_eq!(
            made_cookie(&key(Some(90_500)), "v1").as_deref(),
            Some("s=v1; Path=/app; Max-Age=91; HttpOnly")
        );
        assert_eq!(
            made_cookie(&key(Some(0)), "v1").as_deref(),
            Some("s=v1; Path=/app; HttpOnly")
        );
        assert_eq!(made_cookie(&key(None), "v1"), None);
        assert_eq!(made_cookie(&HashKey::SourceIp, "v1"), None);
        for h in [0, 1, u64::MAX, 0x0123_4567_89ab_cdef] {
            assert_eq!(parse_hash_header(&hash_header(h)), Some(h));
        }
        for bad in ["", "12", "0123456789abcdeg", "0123456789abcdef0"] {
            assert_eq!(parse_hash_header(bad), None, "{bad}");
        }
    }

    #[test]
    fn bad_names_are_refused() {
        for (k, ok) in [
            (HashKey::Header("x-user".into()), true),
            (HashKey::Header("X-User".into()), false),
            (HashKey::Header("bad header".into()), false),
            (HashKey::QueryParameter(String::new()), false),
            (
                HashKey::Cookie {
                    name: "s".into(),
                    path: Some("/app".into()),
                    ttl_ms: Some(0),
                },
                true,
            ),
            (
                HashKey::Cookie {
                    name: "s;x".into(),
                    path: None,
                    ttl_ms: None,
                },
                false,
            ),
            (
                HashKey::Cookie {
                    name: "s".into(),
                    path: Some("app; x".into()),
                    ttl_ms: None,
                },
                false,
            ),
        ] {
            assert_eq!(k.check().is_ok(), ok, "{k:?}");
        }
    }
}
