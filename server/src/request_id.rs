//! Request ids: a caller's `x-request-id` is kept only if it is short and
//! plain; otherwise the server makes one up.
//!
//! The request id is stored in every audit event a call writes, and the
//! audit log is append-only: an unbounded id let an outsider write up to
//! the HTTP/2 header limit (16 KiB) into a victim tenant's undeletable log
//! with every refused call (issue 23, item 8), and any bytes it liked (tabs,
//! markup, spreadsheet formulas) into exports. [`sanitize`] runs first on
//! both listeners: a request carrying exactly one `x-request-id` of 1 to
//! [`MAX_LEN`] characters of `[A-Za-z0-9._:-]` keeps it; any other (too
//! long, empty, another character, or the header repeated) is removed, and
//! the request-id layer behind it puts a fresh UUID in its place. The gRPC
//! response's `x-request-id` is the id the call used (and audited), so a
//! caller whose id was replaced learns the one to quote.

use http::Request;

/// The request id header.
pub const HEADER: &str = "x-request-id";

/// The longest caller-chosen request id kept.
pub const MAX_LEN: usize = 128;

/// Whether `value` is kept as a request id: 1 to [`MAX_LEN`] bytes of
/// ASCII letters, digits, `.`, `_`, `:` and `-`.
pub fn is_acceptable(value: &[u8]) -> bool {
    !value.is_empty()
        && value.len() <= MAX_LEN
        && value
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'))
}

/// Removes the caller's `x-request-id` from `request` unless it is
/// acceptable (and given once); the request-id layer then makes one up.
pub fn sanitize<B>(mut request: Request<B>) -> Request<B> {
    let headers = request.headers_mut();
    let mut values = headers.get_all(HEADER).iter();
    let kept = match (values.next(), values.next()) {
        (None, _) => return request,
        (Some(value), None) => is_acceptable(value.as_bytes()),
        (Some(_), Some(_)) => false,
    };
    if !kept {
        let length: usize = headers.get_all(HEADER).iter().map(|v| v.len()).sum();
        headers.remove(HEADER);
        metrics::counter!("vaultguard_request_ids_replaced_total").increment(1);
        tracing::debug!(length, "caller's x-request-id replaced");
    }
    request
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_ids(ids: &[&[u8]]) -> Request<()> {
        let mut request = Request::new(());
        for id in ids {
            request.headers_mut().append(
                HEADER,
                http::HeaderValue::from_bytes(id).expect("a header value"),
            );
        }
        request
    }

    fn kept(ids: &[&[u8]]) -> Option<Vec<u8>> {
        sanitize(with_ids(ids))
            .headers()
            .get(HEADER)
            .map(|v| v.as_bytes().to_vec())
    }

    #[test]
    fn plain_short_ids_are_kept_and_others_removed() {
        let longest = "a".repeat(MAX_LEN);
        for good in [
            "walk-5-AuthService.IssueToken",
            "f1592943-9ab5-473e-8d05-d3066e4c1a06",
            "trace:01J9_x.Y",
            longest.as_str(),
        ] {
            assert_eq!(kept(&[good.as_bytes()]).as_deref(), Some(good.as_bytes()));
        }
        let too_long = "a".repeat(MAX_LEN + 1);
        for bad in [
            too_long.as_bytes(),
            b"",
            b"a b",
            b"a\tb",
            b"<script>",
            b"=HYPERLINK(\"x\")",
            b"a,b",
            b"caf\xc3\xa9",
            b"\xff",
            b"a/b",
        ] {
            assert_eq!(kept(&[bad]), None, "{:?}", String::from_utf8_lossy(bad));
        }
        assert_eq!(kept(&[b"one", b"two"]), None, "repeated");
        assert_eq!(kept(&[]), None);
    }
}

/// Property tests of the request id check.
#[cfg(test)]
mod props {
    use proptest::prelude::*;

    use super::*;
    use crate::props::{PURE_CASES, config};

    proptest! {
        #![proptest_config(config(PURE_CASES))]

        #[test]
        fn a_kept_id_is_short_and_plain(value in prop::collection::vec(any::<u8>(), 0..300)) {
            if is_acceptable(&value) {
                prop_assert!(!value.is_empty() && value.len() <= MAX_LEN);
                let text = std::str::from_utf8(&value).unwrap();
                prop_assert!(text.chars().all(|c| c.is_ascii_alphanumeric() || ".:_-".contains(c)));
            }
        }

        #[test]
        fn plain_ids_up_to_the_limit_are_kept(value in "[A-Za-z0-9._:-]{1,128}") {
            prop_assert!(is_acceptable(value.as_bytes()));
        }
    }
}
