//! HTTP/1.1 `Upgrade: h2c` at the egress (RFC 7540 §3.2; RFC 9113 deprecates it, and
//! clients such as curl's `--http2` and `nghttp -u` still send it). hyper serves h2 only
//! with prior knowledge, so the upgrade is done here:
//! 1. [`wanted`] (pure): an HTTP/1.1 request with `Upgrade: h2c`, `Connection` naming
//!    `Upgrade` and `HTTP2-Settings`, exactly one well-formed `HTTP2-Settings` header,
//!    and no body. Anything else is answered as HTTP/1.1, which the RFC allows (a
//!    server may ignore an upgrade).
//! 2. [`headers_frame`] (pure): the request as the HEADERS frame of stream 1, which the
//!    upgrade opens, encoded with HPACK literals that leave the dynamic table alone
//!    (so the client's own header blocks decode unchanged). A request whose headers do
//!    not fit one frame is not upgraded.
//! 3. The answer is `101 Switching Protocols`; on the upgraded connection [`after_101`]
//!    reads the client's preface and its first SETTINGS frame (bounded in size and
//!    time), and the h2 server then reads them, the synthesized HEADERS frame, and the
//!    rest of the connection. The request is answered on stream 1, as the RFC says.

use bytes::{BufMut, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite};

/// The h2 connection preface a client sends after the 101.
pub const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// The largest frame payload an h2 server accepts before its SETTINGS say otherwise
/// (SETTINGS_MAX_FRAME_SIZE's initial value).
pub const MAX_FRAME: usize = 16_384;

const HEADERS: u8 = 0x1;
const SETTINGS: u8 = 0x4;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;

/// Whether `parts` asks for an h2c upgrade that is honoured (see the module header).
/// `body_empty`: the request has no body. Pure.
pub fn wanted<B>(req: &http::Request<B>, body_empty: bool) -> bool {
    // Most requests name no upgrade: decided before any header is split.
    if req.version() != http::Version::HTTP_11
        || !body_empty
        || !req.headers().contains_key(http::header::UPGRADE)
    {
        return false;
    }
    let tokens = |name: http::header::HeaderName| {
        req.headers()
            .get_all(name)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(|t| t.trim().to_ascii_lowercase())
            .collect::<Vec<_>>()
    };
    let upgrade = tokens(http::header::UPGRADE);
    let connection = tokens(http::header::CONNECTION);
    let mut settings = req.headers().get_all("http2-settings").iter();
    let one_setting = match (settings.next(), settings.next()) {
        (Some(v), None) => v
            .as_bytes()
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'=')),
        _ => false,
    };
    upgrade.iter().any(|t| t == "h2c")
        && connection.iter().any(|t| t == "upgrade")
        && connection.iter().any(|t| t == "http2-settings")
        && one_setting
}

/// An HPACK integer with an `n`-bit prefix whose high bits are `first` (RFC 7541
/// §5.1). Pure.
fn integer(out: &mut BytesMut, first: u8, n: u32, mut v: usize) {
    let max = (1usize << n) - 1;
    if v < max {
        out.put_u8(first | v as u8);
        return;
    }
    out.put_u8(first | max as u8);
    v -= max;
    while v >= 128 {
        out.put_u8((v % 128) as u8 | 0x80);
        v /= 128;
    }
    out.put_u8(v as u8);
}

/// A "literal header field without indexing, new name" (RFC 7541 §6.2.2), strings not
/// Huffman-coded. Pure.
fn literal(out: &mut BytesMut, name: &[u8], value: &[u8]) {
    out.put_u8(0x00);
    integer(out, 0, 7, name.len());
    out.put_slice(name);
    integer(out, 0, 7, value.len());
    out.put_slice(value);
}

/// Headers that name the HTTP/1.1 connection, never sent in h2 (RFC 9113 §8.2.2).
fn connection_specific(name: &http::header::HeaderName) -> bool {
    matches!(
        name.as_str(),
        "connection"
            | "upgrade"
            | "http2-settings"
            | "keep-alive"
            | "proxy-connection"
            | "transfer-encoding"
            | "host"
    )
}

/// The upgraded request as stream 1's HEADERS frame (END_STREAM: it has no body), or
/// `None` when its header block exceeds [`MAX_FRAME`]. Pure.
pub fn headers_frame<B>(req: &http::Request<B>) -> Option<Bytes> {
    let mut block = BytesMut::new();
    let authority = req
        .headers()
        .get(http::header::HOST)
        .map(|h| h.as_bytes())
        .or_else(|| req.uri().authority().map(|a| a.as_str().as_bytes()));
    let path = req.uri().path_and_query().map_or("/", |pq| pq.as_str());
    literal(&mut block, b":method", req.method().as_str().as_bytes());
    literal(&mut block, b":scheme", b"http");
    if let Some(a) = authority {
        literal(&mut block, b":authority", a);
    }
    literal(&mut block, b":path", path.as_bytes());
    for (name, value) in req.headers() {
        if connection_specific(name) {
            continue;
        }
        // Only `te: trailers` may cross into h2.
        if name == http::header::TE && !value.as_bytes().eq_ignore_ascii_case(b"trailers") {
            continue;
        }
        literal(&mut block, name.as_str().as_bytes(), value.as_bytes());
        if block.len() > MAX_FRAME {
            return None;
        }
    }
    if block.len() > MAX_FRAME {
        return None;
    }
    let mut frame = BytesMut::with_capacity(9 + block.len());
    frame.put_uint(block.len() as u64, 3);
    frame.put_u8(HEADERS);
    frame.put_u8(END_STREAM | END_HEADERS);
    frame.put_u32(1);
    frame.put_slice(&block);
    Some(frame.freeze())
}

/// The upgraded connection for the h2 server: the client's preface and first SETTINGS
/// frame, read here (at most [`MAX_FRAME`] bytes of payload), then `headers` (stream
/// 1), then the rest of what the client sends. The caller bounds the time it takes.
pub async fn after_101<IO>(
    mut io: IO,
    headers: Bytes,
) -> std::io::Result<impl AsyncRead + AsyncWrite + Unpin + Send + 'static>
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let bad = |m: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, m.to_owned());
    let mut head = vec![0u8; PREFACE.len() + 9];
    io.read_exact(&mut head).await?;
    if &head[..PREFACE.len()] != PREFACE {
        return Err(bad("no h2 connection preface after the 101"));
    }
    let frame = &head[PREFACE.len()..];
    let len = usize::from(frame[0]) << 16 | usize::from(frame[1]) << 8 | usize::from(frame[2]);
    if frame[3] != SETTINGS || len > MAX_FRAME {
        return Err(bad("the preface is not followed by a SETTINGS frame"));
    }
    let mut prefix = BytesMut::with_capacity(head.len() + len + headers.len());
    prefix.put_slice(&head);
    prefix.resize(head.len() + len, 0);
    io.read_exact(&mut prefix[head.len()..]).await?;
    prefix.put_slice(&headers);
    let (r, w) = tokio::io::split(io);
    Ok(tokio::io::join(
        std::io::Cursor::new(prefix.freeze()).chain(r),
        w,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(headers: &[(&str, &str)]) -> http::Request<()> {
        let mut b = http::Request::builder()
            .method("GET")
            .uri("/a/b?c=1")
            .version(http::Version::HTTP_11);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(()).unwrap()
    }

    const UPGRADE: [(&str, &str); 4] = [
        ("host", "web.demo:8080"),
        ("connection", "Upgrade, HTTP2-Settings"),
        ("upgrade", "h2c"),
        ("http2-settings", "AAMAAABkAAQCAAAAAAIAAAAA"),
    ];

    #[test]
    fn only_a_well_formed_bodiless_upgrade_is_honoured() {
        assert!(wanted(&parts(&UPGRADE), true));
        // A body: answered as HTTP/1.1.
        assert!(!wanted(&parts(&UPGRADE), false));
        // Each missing piece, or two settings headers, or settings that are not base64url.
        for drop in ["connection", "upgrade", "http2-settings"] {
            let h: Vec<_> = UPGRADE
                .iter()
                .copied()
                .filter(|(k, _)| *k != drop)
                .collect();
            assert!(!wanted(&parts(&h), true), "without {drop}");
        }
        let mut two = UPGRADE.to_vec();
        two.push(("http2-settings", "AAMAAABk"));
        assert!(!wanted(&parts(&two), true));
        let mut bad = UPGRADE.to_vec();
        bad[3] = ("http2-settings", "not base64!");
        assert!(!wanted(&parts(&bad), true));
        let mut no_settings_token = UPGRADE.to_vec();
        no_settings_token[1] = ("connection", "upgrade");
        assert!(!wanted(&parts(&no_settings_token), true));
        // Another protocol, or h2 already.
        let mut ws = UPGRADE.to_vec();
        ws[2] = ("upgrade", "websocket");
        assert!(!wanted(&parts(&ws), true));
        let mut p = parts(&UPGRADE);
        *p.version_mut() = http::Version::HTTP_2;
        assert!(!wanted(&p, true));
    }

    #[test]
    fn integers_encode_as_rfc_7541_shows() {
        // C.1.1 to C.1.3.
        for (v, n, want) in [
            (10usize, 5u32, vec![0x0a]),
            (1337, 5, vec![0x1f, 0x9a, 0x0a]),
            (42, 8, vec![0x2a]),
            (127, 7, vec![0x7f, 0x00]),
        ] {
            let mut b = BytesMut::new();
            integer(&mut b, 0, n, v);
            assert_eq!(&b[..], &want[..], "{v} with a {n}-bit prefix");
        }
    }

    #[test]
    fn the_request_becomes_stream_one_without_connection_headers() {
        let mut h = UPGRADE.to_vec();
        h.push(("x-kept", "yes"));
        h.push(("te", "gzip"));
        let f = headers_frame(&parts(&h)).unwrap();
        let len = usize::from(f[0]) << 16 | usize::from(f[1]) << 8 | usize::from(f[2]);
        assert_eq!(len, f.len() - 9);
        assert_eq!((f[3], f[4]), (HEADERS, END_STREAM | END_HEADERS));
        assert_eq!(&f[5..9], &[0, 0, 0, 1]);
        // The block, decoded by hand: literals without indexing, new names.
        let mut fields = Vec::new();
        let mut b = &f[9..];
        while !b.is_empty() {
            assert_eq!(b[0], 0);
            let n = usize::from(b[1]);
            let name = std::str::from_utf8(&b[2..2 + n]).unwrap().to_owned();
            let v = usize::from(b[2 + n]);
            let value = std::str::from_utf8(&b[3 + n..3 + n + v])
                .unwrap()
                .to_owned();
            fields.push((name, value));
            b = &b[3 + n + v..];
        }
        let want: Vec<(String, String)> = [
            (":method", "GET"),
            (":scheme", "http"),
            (":authority", "web.demo:8080"),
            (":path", "/a/b?c=1"),
            ("x-kept", "yes"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        assert_eq!(fields, want);
        // Too large for one frame: not upgraded.
        let big = "x".repeat(MAX_FRAME);
        let mut h = UPGRADE.to_vec();
        h.push(("x-big", &big));
        assert!(headers_frame(&parts(&h)).is_none());
    }

    #[tokio::test]
    async fn after_the_101_the_server_reads_settings_then_stream_one() {
        let (mut client, server) = tokio::io::duplex(1 << 16);
        let settings = [0u8, 0, 6, SETTINGS, 0, 0, 0, 0, 0, 0, 3, 0, 0, 0, 100];
        let mut sent = PREFACE.to_vec();
        sent.extend_from_slice(&settings);
        sent.extend_from_slice(b"rest");
        tokio::io::AsyncWriteExt::write_all(&mut client, &sent)
            .await
            .unwrap();
        drop(client);
        let mut io = after_101(server, Bytes::from_static(b"HEADERS"))
            .await
            .unwrap();
        let mut got = Vec::new();
        io.read_to_end(&mut got).await.unwrap();
        let mut want = PREFACE.to_vec();
        want.extend_from_slice(&settings);
        want.extend_from_slice(b"HEADERSrest");
        assert_eq!(got, want);
        // Not a preface, or a first frame that is not SETTINGS: refused.
        for bad in [
            b"GET / HTTP/1.1\r\nHost: x\r\n\r\n.......".to_vec(),
            [PREFACE, &[0u8, 0, 0, HEADERS, 0, 0, 0, 0, 1]].concat(),
            [PREFACE, &[0xffu8, 0xff, 0xff, SETTINGS, 0, 0, 0, 0, 0]].concat(),
        ] {
            let (mut c, s) = tokio::io::duplex(1 << 16);
            tokio::io::AsyncWriteExt::write_all(&mut c, &bad)
                .await
                .unwrap();
            assert!(after_101(s, Bytes::new()).await.is_err());
        }
    }
}
