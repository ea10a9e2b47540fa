//! Cross-origin resource sharing for a route (Istio's `corsPolicy`), as the importing
//! gateway's egress applies it: Envoy's CORS filter. A request with an `Origin` the
//! policy allows gets `access-control-allow-origin` (that origin) and the policy's
//! credentials and exposed headers on its answer; a preflight (`OPTIONS` with `Origin`
//! and `Access-Control-Request-Method`) from such an origin is answered at the egress,
//! 200 with the allowed methods, headers and max age, and never forwarded. A preflight
//! from another origin is forwarded to the service (Istio's `unmatchedPreflights:
//! FORWARD`, the default) or answered 200 without CORS headers (`IGNORE`). An origin is
//! allowed when a matcher accepts it, or accepts `*` (Envoy's rule: `exact: "*"` allows
//! every origin). With credentials allowed, a lone `*` among the allowed methods or
//! headers is answered with what the preflight asked for (Gateway API's HTTPCORSFilter
//! rule: a browser reads `*` literally on a credentialed request). Pure.

use serde::{Deserialize, Serialize};

use crate::http_route::{Matcher, PolicyError, StringMatch, bad};

/// A route's CORS policy.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Cors {
    /// Origins allowed (any of them; Istio's `allowOrigins`, and its deprecated
    /// `allowOrigin` as exact matches).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allow_origins: Vec<StringMatch>,
    /// `access-control-allow-methods` of a preflight's answer.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allow_methods: Vec<String>,
    /// `access-control-allow-headers` of a preflight's answer.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allow_headers: Vec<String>,
    /// `access-control-expose-headers` of an allowed request's answer.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub expose_headers: Vec<String>,
    /// `access-control-max-age` of a preflight's answer, in seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_age_s: Option<u64>,
    /// `access-control-allow-credentials: true` on the answers.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub allow_credentials: bool,
    /// A preflight from an origin not allowed is answered 200 without CORS headers
    /// (Istio's `unmatchedPreflights: IGNORE`) instead of forwarded (`FORWARD`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub ignore_unmatched_preflights: bool,
}

/// Origins, methods and headers one policy may list, at most (every CORS request walks
/// the origins).
pub const MAX_CORS_ORIGINS: usize = 64;
pub const MAX_CORS_LIST: usize = 64;

/// What CORS reads of a request.
#[derive(Clone, Copy, Debug, Default)]
pub struct Request<'a> {
    pub method: &'a str,
    /// `Origin`.
    pub origin: Option<&'a str>,
    /// `Access-Control-Request-Method`.
    pub request_method: Option<&'a str>,
    /// `Access-Control-Request-Headers`.
    pub request_headers: Option<&'a str>,
}

/// What the egress does with a request under a route's CORS policy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Not a CORS request, or from an origin not allowed: as if there were no policy.
    Pass,
    /// A preflight from an allowed origin: answer 200 here with these headers.
    Preflight(Vec<(&'static str, String)>),
    /// A preflight from an origin not allowed, under `IGNORE`: answer 200 here without
    /// CORS headers.
    IgnoredPreflight,
    /// An allowed request: forward it, and add these headers to its answer.
    Allowed(Vec<(&'static str, String)>),
}

impl Cors {
    /// Checks the lists and compiles the origins (`f` makes field paths).
    pub(crate) fn compile(&self, f: &dyn Fn(&str) -> String) -> Result<Vec<Matcher>, PolicyError> {
        if self.allow_origins.len() > MAX_CORS_ORIGINS {
            return Err(bad(
                f("cors.allow_origins"),
                format!("at most {MAX_CORS_ORIGINS}"),
            ));
        }
        for (what, list) in [
            ("allow_methods", &self.allow_methods),
            ("allow_headers", &self.allow_headers),
            ("expose_headers", &self.expose_headers),
        ] {
            if list.len() > MAX_CORS_LIST {
                return Err(bad(
                    f(&format!("cors.{what}")),
                    format!("at most {MAX_CORS_LIST}"),
                ));
            }
            for (i, v) in list.iter().enumerate() {
                if !token(v) {
                    return Err(bad(
                        f(&format!("cors.{what}[{i}]")),
                        format!("{v:?} is not an HTTP token"),
                    ));
                }
            }
        }
        self.allow_origins
            .iter()
            .enumerate()
            .map(|(i, m)| m.compile(&f(&format!("cors.allow_origins[{i}]"))))
            .collect()
    }
}

/// An RFC 9110 token (a method or header name) of at most 256 bytes: what a policy's
/// methods and header names must be (parsers check their files with it too).
pub fn token(v: &str) -> bool {
    !v.is_empty()
        && v.len() <= 256
        && v.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

/// What `c` (its origins compiled as `origins`) makes of request `r`. Pure.
pub(crate) fn decide(c: &Cors, origins: &[Matcher], r: &Request<'_>) -> Decision {
    let Some(origin) = r.origin.filter(|o| !o.is_empty()) else {
        return Decision::Pass;
    };
    let request_method = r.request_method.filter(|m| !m.is_empty());
    let preflight = r.method == "OPTIONS" && request_method.is_some();
    let allowed = origins.iter().any(|m| m.test("*") || m.test(origin));
    if !allowed {
        return if preflight && c.ignore_unmatched_preflights {
            Decision::IgnoredPreflight
        } else {
            Decision::Pass
        };
    }
    let mut h = vec![("access-control-allow-origin", origin.to_owned())];
    if c.allow_credentials {
        h.push(("access-control-allow-credentials", "true".into()));
    }
    if !preflight {
        if !c.expose_headers.is_empty() {
            h.push(("access-control-expose-headers", c.expose_headers.join(",")));
        }
        return Decision::Allowed(h);
    }
    // With credentials a browser reads `*` as a name: answer with what was asked.
    let wildcard = |l: &[String]| c.allow_credentials && l.len() == 1 && l[0] == "*";
    let methods = if wildcard(&c.allow_methods) {
        request_method.map(str::to_owned)
    } else {
        (!c.allow_methods.is_empty()).then(|| c.allow_methods.join(","))
    };
    if let Some(m) = methods {
        h.push(("access-control-allow-methods", m));
    }
    let headers = if wildcard(&c.allow_headers) {
        r.request_headers
            .map(str::trim)
            .filter(|h| !h.is_empty())
            .map(str::to_owned)
    } else {
        (!c.allow_headers.is_empty()).then(|| c.allow_headers.join(","))
    };
    if let Some(v) = headers {
        h.push(("access-control-allow-headers", v));
    }
    if let Some(s) = c.max_age_s {
        h.push(("access-control-max-age", s.to_string()));
    }
    Decision::Preflight(h)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> Cors {
        Cors {
            allow_origins: vec![
                StringMatch::Exact("https://app.example.com".into()),
                StringMatch::Regex(r"https://.*\.dev\.example\.com".into()),
            ],
            allow_methods: vec!["GET".into(), "PUT".into()],
            allow_headers: vec!["x-custom".into(), "content-type".into()],
            expose_headers: vec!["x-served-by".into()],
            max_age_s: Some(86_400),
            allow_credentials: true,
            ignore_unmatched_preflights: false,
        }
    }

    fn run(c: &Cors, method: &str, origin: Option<&str>, acrm: Option<&str>) -> Decision {
        let origins = c.compile(&|x| x.to_owned()).unwrap();
        let r = Request {
            method,
            origin,
            request_method: acrm,
            request_headers: Some("x-asked"),
        };
        decide(c, &origins, &r)
    }

    #[test]
    fn preflights_are_answered_and_allowed_requests_get_their_headers() {
        let c = policy();
        let ao = |o: &str| ("access-control-allow-origin", o.to_owned());
        let cred = ("access-control-allow-credentials", "true".to_owned());
        let app = Some("https://app.example.com");
        let preflight = Decision::Preflight(vec![
            ao("https://app.example.com"),
            cred.clone(),
            ("access-control-allow-methods", "GET,PUT".into()),
            (
                "access-control-allow-headers",
                "x-custom,content-type".into(),
            ),
            ("access-control-max-age", "86400".into()),
        ]);
        let allowed = |o: &str| {
            Decision::Allowed(vec![
                ao(o),
                cred.clone(),
                ("access-control-expose-headers", "x-served-by".into()),
            ])
        };
        for (method, origin, acrm, want) in [
            // No Origin: not a CORS request.
            ("GET", None, None, Decision::Pass),
            ("OPTIONS", None, Some("PUT"), Decision::Pass),
            ("GET", Some(""), None, Decision::Pass),
            // A preflight from an allowed origin.
            ("OPTIONS", app, Some("PUT"), preflight),
            // OPTIONS without Access-Control-Request-Method is a request like any.
            ("OPTIONS", app, None, allowed("https://app.example.com")),
            ("OPTIONS", app, Some(""), allowed("https://app.example.com")),
            ("PUT", app, None, allowed("https://app.example.com")),
            // By regex, matched whole.
            (
                "GET",
                Some("https://a.dev.example.com"),
                None,
                allowed("https://a.dev.example.com"),
            ),
            (
                "GET",
                Some("https://a.dev.example.com.evil"),
                None,
                Decision::Pass,
            ),
            // Another origin: as without a policy (FORWARD).
            ("GET", Some("https://evil.example"), None, Decision::Pass),
            (
                "OPTIONS",
                Some("https://evil.example"),
                Some("PUT"),
                Decision::Pass,
            ),
        ] {
            assert_eq!(
                run(&c, method, origin, acrm),
                want,
                "{method} {origin:?} {acrm:?}"
            );
        }
        // IGNORE: another origin's preflight is answered here, without CORS headers.
        let ignore = Cors {
            ignore_unmatched_preflights: true,
            ..policy()
        };
        let evil = Some("https://evil.example");
        assert_eq!(
            run(&ignore, "OPTIONS", evil, Some("PUT")),
            Decision::IgnoredPreflight
        );
        assert_eq!(run(&ignore, "GET", evil, None), Decision::Pass);
        // A matcher that accepts `*` allows every origin, and the answer names it.
        let any = Cors {
            allow_origins: vec![StringMatch::Exact("*".into())],
            ..Cors::default()
        };
        assert_eq!(
            run(&any, "OPTIONS", evil, Some("GET")),
            Decision::Preflight(vec![ao("https://evil.example")])
        );
        // No origins: none is allowed.
        assert_eq!(run(&Cors::default(), "GET", app, None), Decision::Pass);
    }

    #[test]
    fn a_wildcard_with_credentials_is_answered_with_what_was_asked() {
        let app = Some("https://app.example.com");
        let star = |credentials| Cors {
            allow_origins: vec![StringMatch::Exact("*".into())],
            allow_methods: vec!["*".into()],
            allow_headers: vec!["*".into()],
            allow_credentials: credentials,
            ..Cors::default()
        };
        let ao = (
            "access-control-allow-origin",
            "https://app.example.com".into(),
        );
        let cred = ("access-control-allow-credentials", "true".to_owned());
        let with = |m: &str, h: &str| {
            vec![
                ao.clone(),
                cred.clone(),
                ("access-control-allow-methods", m.to_owned()),
                ("access-control-allow-headers", h.to_owned()),
            ]
        };
        assert_eq!(
            run(&star(true), "OPTIONS", app, Some("PATCH")),
            Decision::Preflight(with("PATCH", "x-asked"))
        );
        // Without credentials `*` means all, and is sent as it is.
        assert_eq!(
            run(&star(false), "OPTIONS", app, Some("PATCH")),
            Decision::Preflight(vec![
                ao.clone(),
                ("access-control-allow-methods", "*".into()),
                ("access-control-allow-headers", "*".into()),
            ])
        );
        // Nothing asked (no or empty Access-Control-Request-Headers): no header sent.
        let origins = star(true).compile(&|x| x.to_owned()).unwrap();
        for asked in [None, Some(""), Some("  ")] {
            let r = Request {
                method: "OPTIONS",
                origin: app,
                request_method: Some("PUT"),
                request_headers: asked,
            };
            assert_eq!(
                decide(&star(true), &origins, &r),
                Decision::Preflight(vec![
                    ao.clone(),
                    cred.clone(),
                    ("access-control-allow-methods", "PUT".into()),
                ]),
                "{asked:?}"
            );
        }
        // `*` beside other names is a name like any.
        let listed = Cors {
            allow_methods: vec!["GET".into(), "*".into()],
            ..star(true)
        };
        assert_eq!(
            run(&listed, "OPTIONS", app, Some("PATCH")),
            Decision::Preflight(with("GET,*", "x-asked"))
        );
    }

    #[test]
    fn a_policy_out_of_bounds_names_its_field() {
        let f = |x: &str| format!("routes[0].{x}");
        for (c, want) in [
            (
                Cors {
                    allow_origins: vec![StringMatch::Regex("(".into())],
                    ..Cors::default()
                },
                "routes[0].cors.allow_origins[0].regex",
            ),
            (
                Cors {
                    allow_origins: vec![StringMatch::Exact("a".into()); MAX_CORS_ORIGINS + 1],
                    ..Cors::default()
                },
                "routes[0].cors.allow_origins",
            ),
            (
                Cors {
                    allow_headers: vec!["ok".into(), "bad header".into()],
                    ..Cors::default()
                },
                "routes[0].cors.allow_headers[1]",
            ),
            (
                Cors {
                    allow_methods: vec!["GET\r\n".into()],
                    ..Cors::default()
                },
                "routes[0].cors.allow_methods[0]",
            ),
            (
                Cors {
                    expose_headers: vec!["x".into(); MAX_CORS_LIST + 1],
                    ..Cors::default()
                },
                "routes[0].cors.expose_headers",
            ),
        ] {
            let e = c.compile(&f).unwrap_err();
            assert_eq!(e.field, want, "{e}");
        }
    }
}
