//! The browser client and the web console, compiled into the binary: `GET /v1/client.js`
//! (an ES module, no dependencies), `GET /v1/client.d.ts` (its types) and `GET /console`
//! (one HTML page built on the client). Nothing is built or fetched at run time; the files
//! live beside this module in `client/`.
//!
//! The client follows the CORS rules of every answer (module scripts are fetched with CORS,
//! so `allowed_origins` decides which other origins' pages may import it). The console is a
//! static page whose Content-Security-Policy lets it talk only to its own origin and forbids
//! framing; `console = false` removes it (404). It reads through the same API as everyone
//! else, with the token its operator pastes, so it never widens who may read what.

use http::{header, HeaderValue, Response, StatusCode};

use super::{full, ApiError, AppState, Body};

/// The client module.
pub const CLIENT_JS: &str = include_str!("client/client.js");
/// The client's TypeScript declarations.
pub const CLIENT_DTS: &str = include_str!("client/client.d.ts");
/// The console page.
pub const CONSOLE_HTML: &str = include_str!("client/console.html");

fn asset(body: &'static str, content_type: &'static str) -> Response<Body> {
    let mut resp = Response::new(full(body));
    *resp.status_mut() = StatusCode::OK;
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    // The binary may be upgraded under the same URL: revalidate rather than cache blindly.
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    resp
}

/// `GET /v1/client.js`.
pub fn client_js() -> Response<Body> {
    asset(CLIENT_JS, "text/javascript; charset=utf-8")
}

/// `GET /v1/client.d.ts`.
pub fn client_dts() -> Response<Body> {
    asset(CLIENT_DTS, "application/typescript; charset=utf-8")
}

/// `GET /console`: 404 when `console = false`.
pub fn console(state: &AppState) -> Result<Response<Body>, ApiError> {
    if !state.config.console {
        return Err(ApiError::not_found());
    }
    let mut resp = asset(CONSOLE_HTML, "text/html; charset=utf-8");
    let h = resp.headers_mut();
    // Own scripts and API only; never framed (a pasted token must not be clickjacked).
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'self'; script-src 'self' 'unsafe-inline'; style-src 'unsafe-inline'; \
             img-src 'self' data:; connect-src 'self' ws: wss:; frame-ancestors 'none'",
        ),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    Ok(resp)
}
