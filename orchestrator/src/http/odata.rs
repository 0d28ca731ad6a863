//! OData system query options: the subset of `$filter`, `$select`, `$top` and `$skiptoken` that
//! Graph supports on `deviceLocalCredentials`, parsed from the raw query string; and the one
//! paging every collection uses ([`page`], [`next_link`]): server-driven pages of `$top` items
//! (default [`DEFAULT_TOP`], at most [`MAX_TOP`]), in the collection's order, with an
//! `@odata.nextLink` whose `$skiptoken` is the last item's key, so a page starts after it
//! whatever was added or removed meanwhile.
//!
//! Next links are absolute, as Graph's are, over TLS: Microsoft's Graph SDKs follow only absolute
//! ones (msgraph-sdk's `PageIterator` refuses a relative link, and a request builder's
//! `with_url` sends it nowhere). Their origin is `http.public_url` when set, else the one the
//! client addressed ([`link_base`]); over plain HTTP without it they stay relative.
//!
//! Options this API does not implement (`$orderby`, `$count`, …) are refused with
//! `Request_UnsupportedQuery` rather than ignored, so a caller never mistakes an unfiltered or
//! unordered answer for what it asked. Parameters without a `$` are not OData's and are ignored.

use std::fmt::Write as _;

use axum::extract::{FromRequestParts, Query};
use axum::http::header;
use axum::http::request::Parts;
use axum::http::uri::Authority;

use super::error::ApiError;
use super::serve::LinkOrigin;

/// The default page size of a collection, as Graph's.
pub(super) const DEFAULT_TOP: usize = 100;
/// The largest page a caller may ask for.
pub(super) const MAX_TOP: usize = 1000;

/// The OData options of one request, as sent; each resource checks what it supports.
#[derive(Debug, Default)]
pub(super) struct QueryOptions {
    /// `$filter`, decoded.
    pub(super) filter: Option<String>,
    /// `$select`, decoded.
    pub(super) select: Option<String>,
    /// `$top`, decoded.
    pub(super) top: Option<String>,
    /// `$skiptoken`, decoded.
    pub(super) skip_token: Option<String>,
    /// Where the request went, `https://<authority>`, when [`link_base`] knows it: what
    /// [`next_link`] puts before the path. `None`: links are relative to the server.
    pub(super) link_base: Option<String>,
}

/// A `$filter` this API can evaluate: one equality on one property.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Filter {
    /// `deviceName eq '<name>'`.
    DeviceName(String),
    /// `id eq '<id>'`.
    Id(String),
}

/// A property of `deviceLocalCredentialInfo`, as named in `$select`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Property {
    /// `id`.
    Id,
    /// `deviceName`.
    DeviceName,
    /// `lastBackupDateTime`.
    LastBackupDateTime,
    /// `refreshDateTime`.
    RefreshDateTime,
    /// `credentials`: the passwords themselves.
    Credentials,
}

impl QueryOptions {
    /// The names of the options this API knows, for error messages.
    const SUPPORTED: &'static str = "$filter, $select, $top and $skiptoken";

    /// Fails unless only options in `allowed` are present; `resource` names where, for the message.
    pub(super) fn allow_only(&self, allowed: &[&str], resource: &str) -> Result<(), ApiError> {
        let present = [
            ("$filter", self.filter.is_some()),
            ("$select", self.select.is_some()),
            ("$top", self.top.is_some()),
            ("$skiptoken", self.skip_token.is_some()),
        ];
        match present
            .iter()
            .find(|(name, is_present)| *is_present && !allowed.contains(name))
        {
            Some((name, _)) => Err(ApiError::UnsupportedQuery(format!(
                "query option {name} is not supported on {resource}; supported: {}",
                allowed.join(", ")
            ))),
            None => Ok(()),
        }
    }

    /// The page size: `$top` when given (1 to [`MAX_TOP`]), else [`DEFAULT_TOP`].
    pub(super) fn page_size(&self) -> Result<usize, ApiError> {
        let Some(text) = &self.top else {
            return Ok(DEFAULT_TOP);
        };
        match text.trim().parse::<usize>() {
            Ok(top) if (1..=MAX_TOP).contains(&top) => Ok(top),
            _ => Err(ApiError::BadRequest(format!(
                "invalid $top {:?}: allowed: an integer from 1 to {MAX_TOP}",
                truncated(text)
            ))),
        }
    }

    /// The `$skiptoken`, if any, parsed by `parse` into the key to start after.
    pub(super) fn skip_token_as<T, E: std::fmt::Display>(
        &self,
        parse: impl FnOnce(&str) -> Result<T, E>,
    ) -> Result<Option<T>, ApiError> {
        self.skip_token
            .as_deref()
            .map(|token| parse(token).map_err(|err| ApiError::BadRequest(format!("invalid $skiptoken: {err}"))))
            .transpose()
    }

    /// The `$skiptoken` of a list ordered by history position (the stream sequence of the last
    /// entry of the page before), or 0 without one.
    pub(super) fn skip_token_position(&self) -> Result<u64, ApiError> {
        Ok(self
            .skip_token_as(|token| {
                token
                    .parse::<u64>()
                    .map_err(|_| format!("{token:?}: allowed: a history position"))
            })?
            .unwrap_or(0))
    }

    /// The `$filter`, if any, parsed.
    pub(super) fn parsed_filter(&self) -> Result<Option<Filter>, ApiError> {
        self.filter.as_deref().map(Filter::parse).transpose()
    }

    /// The properties named in `$select`, in order; empty when there is no `$select`.
    pub(super) fn selected(&self) -> Result<Vec<Property>, ApiError> {
        let Some(text) = &self.select else {
            return Ok(Vec::new());
        };
        text.split(',').map(|name| Property::parse(name.trim())).collect()
    }
}

impl<S: Send + Sync> FromRequestParts<S> for QueryOptions {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        let Query(pairs) = Query::<Vec<(String, String)>>::try_from_uri(&parts.uri)
            .map_err(|rejection| ApiError::BadRequest(rejection.body_text()))?;
        let mut options = Self {
            link_base: link_base(parts),
            ..Self::default()
        };
        for (key, value) in pairs {
            let slot = match key.as_str() {
                "$filter" => &mut options.filter,
                "$select" => &mut options.select,
                "$top" => &mut options.top,
                "$skiptoken" => &mut options.skip_token,
                other if other.starts_with('$') => {
                    return Err(ApiError::UnsupportedQuery(format!(
                        "query option {:?} is not supported; supported: {}",
                        truncated(other),
                        Self::SUPPORTED
                    )));
                }
                _ => continue,
            };
            if slot.replace(value).is_some() {
                return Err(ApiError::BadRequest(format!(
                    "query option {key} is given more than once"
                )));
            }
        }
        Ok(options)
    }
}

impl Filter {
    const SUPPORTED: &'static str = "supported: deviceName eq '<name>' and id eq '<id>'";

    /// Parses `<property> eq '<literal>'`, where the literal doubles its quotes as OData does.
    /// Property names and `eq` are matched case-insensitively.
    pub(super) fn parse(text: &str) -> Result<Self, ApiError> {
        let unsupported = || {
            ApiError::UnsupportedQuery(format!(
                "unsupported $filter {:?}: {}",
                truncated(text),
                Self::SUPPORTED
            ))
        };
        let (property, rest) = text.trim().split_once(char::is_whitespace).ok_or_else(unsupported)?;
        let (operator, literal) = rest
            .trim_start()
            .split_once(char::is_whitespace)
            .ok_or_else(unsupported)?;
        if !operator.eq_ignore_ascii_case("eq") {
            return Err(unsupported());
        }
        let value = string_literal(literal.trim()).ok_or_else(unsupported)?;
        if property.eq_ignore_ascii_case("deviceName") {
            Ok(Self::DeviceName(value))
        } else if property.eq_ignore_ascii_case("id") {
            Ok(Self::Id(value))
        } else {
            Err(unsupported())
        }
    }
}

impl Property {
    const ALL: [Self; 5] = [
        Self::Id,
        Self::DeviceName,
        Self::LastBackupDateTime,
        Self::RefreshDateTime,
        Self::Credentials,
    ];

    /// The property's Graph name.
    pub(super) fn as_str(self) -> &'static str {
        match self {
            Self::Id => "id",
            Self::DeviceName => "deviceName",
            Self::LastBackupDateTime => "lastBackupDateTime",
            Self::RefreshDateTime => "refreshDateTime",
            Self::Credentials => "credentials",
        }
    }

    /// The property named `name`, case-insensitively.
    fn parse(name: &str) -> Result<Self, ApiError> {
        Self::ALL
            .into_iter()
            .find(|property| property.as_str().eq_ignore_ascii_case(name))
            .ok_or_else(|| {
                ApiError::BadRequest(format!(
                    "invalid $select: deviceLocalCredentialInfo has no property {:?}; allowed: {}",
                    truncated(name),
                    Self::ALL.map(Self::as_str).join(", ")
                ))
            })
    }
}

/// One page of `items`, which are in the collection's order and start after the skip token: at
/// most `page_size` of them, and when more follow, the next link `link_after` makes from the last
/// one on the page.
pub(super) fn page<T>(
    items: impl IntoIterator<Item = T>,
    page_size: usize,
    link_after: impl FnOnce(&T) -> String,
) -> (Vec<T>, Option<String>) {
    let mut items = items.into_iter();
    let page: Vec<T> = items.by_ref().take(page_size).collect();
    let next_link = match (items.next(), page.last()) {
        (Some(_), Some(last)) => Some(link_after(last)),
        _ => None,
    };
    (page, next_link)
}

/// The link to the page of `path` after `skip_token`: the request's `$filter` and `$select`,
/// then `parameters` (a resource's own, percent-encoded here), then `$top` and `$skiptoken`;
/// absolute when the request's [`QueryOptions::link_base`] is known.
pub(super) fn next_link(
    path: &str,
    options: &QueryOptions,
    parameters: &[(&str, &str)],
    page_size: usize,
    skip_token: &str,
) -> String {
    let mut link = format!("{}{path}?", options.link_base.as_deref().unwrap_or_default());
    if let Some(filter) = &options.filter {
        link.push_str(&format!("$filter={}&", percent_encode(filter)));
    }
    if let Some(select) = &options.select {
        link.push_str(&format!("$select={}&", percent_encode(select)));
    }
    for (name, value) in parameters {
        link.push_str(&format!("{name}={}&", percent_encode(value)));
    }
    link.push_str(&format!("$top={page_size}&$skiptoken={}", percent_encode(skip_token)));
    link
}

/// Where a request's absolute links start ([`LinkOrigin`]): `http.public_url` when it is set;
/// else, over TLS, `https://` and the request target's authority (else its `Host` header);
/// `None` otherwise.
///
/// Over TLS only the client chose that authority, so a link on it leads where the client already
/// sends its token, and the scheme is known. Over plain HTTP the server may sit behind a
/// TLS-terminating proxy whose scheme and name it cannot know (`http.public_url` names them), so
/// there, and for a request without a valid authority, links stay relative.
fn link_base(parts: &Parts) -> Option<String> {
    match parts.extensions.get::<LinkOrigin>()? {
        LinkOrigin::Configured(public_url) => Some(public_url.to_string()),
        LinkOrigin::Addressed => {
            let authority = match parts.uri.authority() {
                Some(authority) => authority.clone(),
                None => parts
                    .headers
                    .get(header::HOST)?
                    .to_str()
                    .ok()?
                    .parse::<Authority>()
                    .ok()?,
            };
            // A Host never holds user information (RFC 9110, 7.2); one that does is not repeated.
            if authority.as_str().contains('@') {
                return None;
            }
            Some(format!("https://{authority}"))
        }
    }
}

/// Percent-encodes `text` for a query string: everything but RFC 3986's unreserved characters.
pub(super) fn percent_encode(text: &str) -> String {
    let mut encoded = String::with_capacity(text.len());
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~') {
            encoded.push(char::from(byte));
        } else {
            write!(encoded, "%{byte:02X}").expect("writing to a String cannot fail");
        }
    }
    encoded
}

/// The value of an OData string literal `'…'`, whose quotes inside are doubled (`''`).
fn string_literal(text: &str) -> Option<String> {
    let inner = text.strip_prefix('\'')?.strip_suffix('\'')?;
    let mut value = String::with_capacity(inner.len());
    let mut chars = inner.chars();
    while let Some(c) = chars.next() {
        if c == '\'' && chars.next() != Some('\'') {
            // A lone quote ends the literal early: something follows it.
            return None;
        }
        value.push(c);
    }
    Some(value)
}

/// At most 100 characters of caller input, for echoing in a message.
fn truncated(text: &str) -> String {
    text.chars().take(100).collect()
}

/// What a time query parameter must be.
pub(super) const TIME_FORMAT: &str = "an RFC 3339 time, such as 2026-11-24T13:05:00Z";

/// The time query parameter `name` (such as `since` or `at`), parsed; a 400 naming the format
/// otherwise.
pub(super) fn time_parameter(name: &str, text: &str) -> Result<chrono::DateTime<chrono::Utc>, ApiError> {
    chrono::DateTime::parse_from_rfc3339(text)
        .map(|time| time.with_timezone(&chrono::Utc))
        .map_err(|_| {
            ApiError::BadRequest(format!(
                "{name} {:?}: allowed: {TIME_FORMAT}",
                text.chars().take(100).collect::<String>()
            ))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn equality_filters_parse_with_doubled_quotes() {
        assert_eq!(
            Filter::parse("deviceName eq 'host-1'").unwrap(),
            Filter::DeviceName("host-1".to_owned())
        );
        assert_eq!(
            Filter::parse("  DeviceName  EQ  'o''brien' ").unwrap(),
            Filter::DeviceName("o'brien".to_owned())
        );
        assert_eq!(Filter::parse("id eq 'dev-1'").unwrap(), Filter::Id("dev-1".to_owned()));
        assert_eq!(
            Filter::parse("deviceName eq ''").unwrap(),
            Filter::DeviceName(String::new())
        );
    }

    #[test]
    fn other_filters_are_unsupported() {
        for text in [
            "",
            "deviceName",
            "deviceName ne 'x'",
            "startswith(deviceName, 'x')",
            "deviceName eq 'a' or id eq 'b'",
            "deviceName eq x",
            "deviceName eq 'a'b'",
            "lastBackupDateTime eq '2020-01-01'",
        ] {
            let err = Filter::parse(text).expect_err(text);
            assert!(matches!(err, ApiError::UnsupportedQuery(_)), "{text}: {err:?}");
            assert!(err.to_string().contains("deviceName eq '<name>'"), "{err}");
        }
    }

    #[test]
    fn top_is_bounded() {
        let options = |top: &str| QueryOptions {
            top: Some(top.to_owned()),
            ..QueryOptions::default()
        };
        assert_eq!(QueryOptions::default().page_size().unwrap(), DEFAULT_TOP);
        assert_eq!(options("1").page_size().unwrap(), 1);
        assert_eq!(options("1000").page_size().unwrap(), 1000);
        for bad in ["0", "1001", "-1", "ten", ""] {
            assert!(options(bad).page_size().is_err(), "{bad}");
        }
    }

    #[test]
    fn select_names_are_checked() {
        let options = QueryOptions {
            select: Some("id, credentials,DEVICENAME".to_owned()),
            ..QueryOptions::default()
        };
        assert_eq!(
            options.selected().unwrap(),
            vec![Property::Id, Property::Credentials, Property::DeviceName]
        );
        let options = QueryOptions {
            select: Some("id,password".to_owned()),
            ..QueryOptions::default()
        };
        let err = options.selected().expect_err("unknown property");
        assert!(err.to_string().contains("\"password\""), "{err}");
    }

    #[test]
    fn a_page_links_to_the_next_only_when_more_follow() {
        let link = |last: &u32| format!("after {last}");
        assert_eq!(page(1..=5, 2, link), (vec![1, 2], Some("after 2".to_owned())));
        assert_eq!(page(1..=4, 2, link), (vec![1, 2], Some("after 2".to_owned())));
        assert_eq!(page(3..=4, 2, link), (vec![3, 4], None));
        assert_eq!(page(5..=5, 2, link), (vec![5], None));
        assert_eq!(page(1..1, 2, link), (vec![], None));
    }

    #[test]
    fn next_links_keep_the_request_s_options() {
        let options = QueryOptions {
            filter: Some("deviceName eq 'a b'".to_owned()),
            ..QueryOptions::default()
        };
        assert_eq!(
            next_link("/v1.0/x", &options, &[("kind", "password_read")], 2, "dev 1"),
            "/v1.0/x?$filter=deviceName%20eq%20%27a%20b%27&kind=password_read&$top=2&$skiptoken=dev%201"
        );
        assert_eq!(
            next_link("/v1.0/x", &QueryOptions::default(), &[], 100, "7"),
            "/v1.0/x?$top=100&$skiptoken=7"
        );
    }

    #[test]
    fn next_links_are_absolute_when_the_request_s_origin_is_known() {
        let options = QueryOptions {
            link_base: Some("https://laps.example.org:8443".to_owned()),
            ..QueryOptions::default()
        };
        assert_eq!(
            next_link("/v1.0/x", &options, &[], 1, "dev-1"),
            "https://laps.example.org:8443/v1.0/x?$top=1&$skiptoken=dev-1"
        );
    }

    #[test]
    fn the_link_base_is_the_public_url_else_the_authority_a_client_addressed_over_tls() {
        let with_origin = |uri: &str, host: Option<&str>, origin: Option<LinkOrigin>| {
            let mut request = axum::http::Request::builder().uri(uri);
            if let Some(host) = host {
                request = request.header(header::HOST, host);
            }
            let (mut parts, ()) = request.body(()).unwrap().into_parts();
            if let Some(origin) = origin {
                parts.extensions.insert(origin);
            }
            parts
        };
        let parts = |uri: &str, host: Option<&str>, over_tls: bool| {
            with_origin(uri, host, over_tls.then_some(LinkOrigin::Addressed))
        };
        // `http.public_url`, whatever the client addressed (a proxy forwards to this server).
        let configured = LinkOrigin::Configured("https://laps.example.org".into());
        assert_eq!(
            link_base(&with_origin("/v1.0/devices", Some("127.0.0.1:8080"), Some(configured))).as_deref(),
            Some("https://laps.example.org")
        );
        assert_eq!(
            link_base(&parts("/v1.0/devices", Some("laps.example.org:8443"), true)).as_deref(),
            Some("https://laps.example.org:8443")
        );
        assert_eq!(
            link_base(&parts("/v1.0/devices", Some("[::1]:8443"), true)).as_deref(),
            Some("https://[::1]:8443")
        );
        // The request target's authority wins over Host, as RFC 9112 (3.2.2) says.
        assert_eq!(
            link_base(&parts("https://laps.example.org/v1.0/devices", Some("other"), true)).as_deref(),
            Some("https://laps.example.org")
        );
        // Plain HTTP, no Host, or a Host that is no authority: relative links.
        assert_eq!(
            link_base(&parts("/v1.0/devices", Some("laps.example.org"), false)),
            None
        );
        assert_eq!(link_base(&parts("/v1.0/devices", None, true)), None);
        for host in [
            "evil.example@laps.example.org",
            "laps example",
            "laps.example.org/path",
            "",
        ] {
            assert_eq!(link_base(&parts("/v1.0/devices", Some(host), true)), None, "{host:?}");
        }
    }

    #[test]
    fn query_values_are_percent_encoded() {
        assert_eq!(percent_encode("deviceName eq 'a&b'"), "deviceName%20eq%20%27a%26b%27");
        assert_eq!(percent_encode("dev-1_x.y~"), "dev-1_x.y~");
    }
}
