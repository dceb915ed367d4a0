//! hyper answers some requests itself, before any handler runs: a request head over the
//! buffer limit gets 431, a request it cannot parse gets 400, each with an empty body. The
//! contract wants every error as `{"error","message"}` JSON, so the connection's byte stream
//! is wrapped: a write that is exactly such a head (HTTP/1.1, 400, 414 or 431, no header but
//! hyper's `connection`, `content-length: 0` and `date`) is replaced by the same head with a
//! JSON body. The relay's own error answers always carry a body, and a reply route's bodiless
//! fallback of another status (a 404, say) passes as configured; HTTP/2 frames never start
//! with `HTTP/1.1 `. A head that answers a handler's response (counted as each is ready) is
//! never rewritten, whatever it looks like: the sink's `--status 400` without `--reply`, or a
//! reply route's bodiless 400 fallback, go out as they were made.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::server::AnsweredItself;

/// A connection whose bodiless 4xx answers from hyper get the contract's JSON body.
pub struct JsonErrors<S> {
    inner: S,
    /// A replacement being written: the bytes, how many went out, and how many bytes of
    /// the caller's buffer it stands for.
    rewrite: Option<(Vec<u8>, usize, usize)>,
    /// Told each such answer's status (for the metrics: no handler sees these requests).
    told: Option<AnsweredItself>,
    /// Handlers' responses ready and whose heads are not written yet.
    handled: Arc<AtomicUsize>,
}

impl<S> JsonErrors<S> {
    /// `handled` counts the handlers' responses as each is ready.
    pub fn new(inner: S, told: Option<AnsweredItself>, handled: Arc<AtomicUsize>) -> Self {
        JsonErrors {
            inner,
            rewrite: None,
            told,
            handled,
        }
    }
}

/// The answer that replaces `head`, when `head` is one of hyper's own bodiless 4xx heads.
pub fn rewrite(head: &[u8]) -> Option<Vec<u8>> {
    const EMPTY: &[u8] = b"\r\ncontent-length: 0\r\n";
    if !head.starts_with(b"HTTP/1.1 4") || !head.ends_with(b"\r\n\r\n") || head.len() < 12 {
        return None;
    }
    // Only what hyper writes itself: its statuses, its headers.
    if !matches!(&head[9..12], b"400" | b"414" | b"431") {
        return None;
    }
    let hypers = |line: &[u8]| {
        line == b"connection: close"
            || line == b"content-length: 0"
            || line.starts_with(b"date: ")
            || line.is_empty()
    };
    if !head
        .split(|&b| b == b'\n')
        .skip(1)
        .all(|l| hypers(l.strip_suffix(b"\r").unwrap_or(l)))
    {
        return None;
    }
    let at = head.windows(EMPTY.len()).position(|w| w == EMPTY)?;
    let (kind, message) = match &head[9..12] {
        b"431" => (
            "headers_too_large",
            "the request headers are larger than the server accepts",
        ),
        b"414" => ("uri_too_long", "the request target is too long"),
        _ => (
            "bad_request",
            "the request is not a valid HTTP request and could not be read",
        ),
    };
    let body = serde_json::json!({"error": kind, "message": message}).to_string();
    let mut out = Vec::with_capacity(head.len() + body.len() + 48);
    out.extend_from_slice(&head[..at + 2]);
    out.extend_from_slice(b"content-type: application/json\r\ncontent-length: ");
    out.extend_from_slice(body.len().to_string().as_bytes());
    out.extend_from_slice(&head[at + EMPTY.len() - 2..]);
    out.extend_from_slice(body.as_bytes());
    Some(out)
}

impl<S: AsyncWrite + Unpin> JsonErrors<S> {
    /// Drives a replacement in progress; `Some(n)` once written (n = bytes it stands for).
    fn drive(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<Option<usize>>> {
        let Some((bytes, written, stands_for)) = &mut self.rewrite else {
            return Poll::Ready(Ok(None));
        };
        while *written < bytes.len() {
            match ready!(Pin::new(&mut self.inner).poll_write(cx, &bytes[*written..])) {
                Ok(0) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Ok(n) => *written += n,
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
        let n = *stands_for;
        self.rewrite = None;
        Poll::Ready(Ok(Some(n)))
    }

    fn start(&mut self, buf: &[u8]) -> bool {
        // A final answer's head (not a `100 Continue`) for a handler's response. (A head
        // that does not begin its write, behind a pipelined answer still being written,
        // is not counted: hyper's own error later on that connection then goes bodiless.)
        if (buf.starts_with(b"HTTP/1.1 ") || buf.starts_with(b"HTTP/1.0 "))
            && !buf[9..].starts_with(b"1")
            && self
                .handled
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok()
        {
            return false;
        }
        match rewrite(buf) {
            Some(bytes) => {
                if let Some(told) = &self.told {
                    // `rewrite` took only heads with a three-digit status at 9..12.
                    let status = std::str::from_utf8(&buf[9..12])
                        .ok()
                        .and_then(|s| s.parse().ok());
                    told(status.unwrap_or(400));
                }
                self.rewrite = Some((bytes, 0, buf.len()));
                true
            }
            None => false,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for JsonErrors<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for JsonErrors<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        if this.rewrite.is_some() || this.start(buf) {
            return this.drive(cx).map_ok(|n| n.unwrap_or(0));
        }
        Pin::new(&mut this.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        let first = bufs.iter().find(|b| !b.is_empty());
        if this.rewrite.is_some() || first.is_some_and(|b| this.start(b)) {
            return this.drive(cx).map_ok(|n| n.unwrap_or(0));
        }
        Pin::new(&mut this.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        ready!(this.drive(cx))?;
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        ready!(this.drive(cx))?;
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::rewrite;

    #[test]
    fn hypers_bodiless_431_gets_a_json_body() {
        let head = b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-length: 0\r\ndate: Tue, 01 Dec 2026 10:00:00 GMT\r\n\r\n";
        let out = String::from_utf8(rewrite(head).unwrap()).unwrap();
        let (h, body) = out.split_once("\r\n\r\n").unwrap();
        assert!(h.starts_with("HTTP/1.1 431 "), "{h}");
        assert!(h.contains("content-type: application/json"), "{h}");
        assert!(
            h.contains(&format!("content-length: {}", body.len())),
            "{h}"
        );
        assert!(h.contains("date: Tue"), "{h}");
        let v: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(v["error"], "headers_too_large");
    }

    #[test]
    fn answers_with_a_body_or_not_4xx_pass_unchanged() {
        assert!(rewrite(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 12\r\n\r\n").is_none());
        assert!(rewrite(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n").is_none());
        assert!(rewrite(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n{}").is_none());
        // hyper's own: as it writes them, rewritten.
        let own = b"HTTP/1.1 400 Bad Request\r\nconnection: close\r\ncontent-length: 0\r\ndate: Tue, 01 Dec 2026 10:00:00 GMT\r\n\r\n";
        assert!(rewrite(own).is_some());
        // A reply route's bodiless fallback: another status, or a header hyper does not
        // write, passes as configured.
        let fallback = b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\ndate: Tue, 01 Dec 2026 10:00:00 GMT\r\n\r\n";
        assert!(rewrite(fallback).is_none());
        let typed = b"HTTP/1.1 400 Bad Request\r\ncontent-type: text/plain\r\ncontent-length: 0\r\ndate: Tue, 01 Dec 2026 10:00:00 GMT\r\n\r\n";
        assert!(rewrite(typed).is_none());
    }
}
