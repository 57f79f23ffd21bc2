//! The terminal page operators open in a browser: `GET /terminal/` (HTML, `terminal.js`), with xterm.js
//! (`xterm.mjs`, `xterm.css`) compiled into the binary, so the bridge needs no web server and
//! no CDN. The page takes the device and the operator's token from the URL fragment and opens
//! the proxy's `/terminal` WebSocket on the same origin. Static and secret-free: no
//! authentication (the WebSocket authenticates), no body read.

use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};

const PAGE: &str = include_str!("../assets/terminal.html");
const PAGE_JS: &str = include_str!("../assets/terminal.js");
const XTERM_JS: &str = include_str!("../assets/xterm/xterm.mjs");
const XTERM_CSS: &str = include_str!("../assets/xterm/xterm.css");

/// Same-origin everything (the WebSocket included), no framing, no sniffing, no Referer:
/// the page holds an operator's token for a moment.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; \
                   connect-src 'self'; img-src 'self' data:; frame-ancestors 'none'; \
                   base-uri 'none'; form-action 'none'";

fn asset(content_type: &'static str, body: &'static str) -> Response {
    let mut r = body.into_response();
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    r
}

pub async fn page() -> Response {
    asset("text/html; charset=utf-8", PAGE)
}

pub async fn page_js() -> Response {
    asset("text/javascript; charset=utf-8", PAGE_JS)
}

pub async fn xterm_js() -> Response {
    asset("text/javascript; charset=utf-8", XTERM_JS)
}

pub async fn xterm_css() -> Response {
    asset("text/css; charset=utf-8", XTERM_CSS)
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_page_loads_only_what_the_bridge_serves() {
        // Relative references only: the page works behind any prefix and loads nothing foreign.
        assert!(super::PAGE.contains("src=\"terminal.js\""));
        assert!(super::PAGE_JS.contains("from './xterm.mjs'"));
        assert!(super::PAGE.contains("href=\"xterm.css\""));
        for foreign in [
            "src=\"http",
            "href=\"http",
            "from 'http",
            "from \"http",
            "//cdn",
        ] {
            assert!(!super::PAGE.contains(foreign), "{foreign}");
        }
        assert!(super::XTERM_JS.contains("export{"));
    }
}
